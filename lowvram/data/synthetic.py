"""Synthetic clips for the demo and the tests: real .mp4 files (H.264 or MPEG-4 video + AAC tone) with captions.

Moving coloured shapes whose caption says what moves where, so a LoRA has something learnable; not a benchmark set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowvram.fsutil import atomic_path, atomic_write_text

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
AUDIO_SAMPLE_RATE = 22050  # deliberately not 16 kHz so the pipeline's resampling is exercised


@dataclass(frozen=True)
class SyntheticClip:
    video_path: Path
    caption: str
    tone_hz: float


def make_synthetic_dataset(
    folder: str | Path,
    n_clips: int = 8,
    width: int = 64,
    height: int = 64,
    frames: int = 17,
    fps: int = 25,
    seed: int = 0,
    audio: bool = True,
) -> list[SyntheticClip]:
    """Write `n_clips` clips `clip_000.mp4` ... with same-name `.txt` captions into `folder`; return them."""
    import av

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    clips = []
    for i in range(n_clips):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        tone_hz = float(rng.choice([220.0, 330.0, 440.0, 660.0]))
        caption = f"a {colour} {shape} moving {motion}"
        path = folder / f"clip_{i:03d}.mp4"
        video = _render_frames(width, height, frames, COLOURS[colour], shape, motion)
        with atomic_path(path) as tmp:
            _write_mp4(tmp, video, fps, codec, tone_hz if audio else None)
        atomic_write_text(path.with_suffix(".txt"), caption + "\n")
        clips.append(SyntheticClip(path, caption, tone_hz))
    return clips


def _render_frames(width: int, height: int, frames: int, rgb, shape: str, motion: str) -> np.ndarray:
    size = max(4, min(width, height) // 4)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.full((frames, height, width, 3), 16, dtype=np.uint8)
    for f in range(frames):
        t = f / max(1, frames - 1)
        along_x = motion in ("left to right", "right to left")
        span = (width if along_x else height) - size
        pos = t * span if motion in ("left to right", "top to bottom") else (1 - t) * span
        cx = pos + size / 2 if along_x else width / 2
        cy = height / 2 if along_x else pos + size / 2
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
        else:
            mask = (np.abs(xx - cx) <= size / 2) & (np.abs(yy - cy) <= size / 2)
        out[f][mask] = rgb
    return out


def _write_mp4(path: Path, video: np.ndarray, fps: int, codec: str, tone_hz: float | None) -> None:
    import av

    frames, height, width, _ = video.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        vstream = container.add_stream(codec, rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            vstream.options = {"preset": "ultrafast", "crf": "18"}
        astream = None
        if tone_hz is not None:
            astream = container.add_stream("aac", rate=AUDIO_SAMPLE_RATE, layout="stereo")
        for f in range(frames):
            for packet in vstream.encode(av.VideoFrame.from_ndarray(video[f], format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            n = int(math.ceil(frames / fps * AUDIO_SAMPLE_RATE))
            t = np.arange(n) / AUDIO_SAMPLE_RATE
            wave = (0.4 * np.sin(2 * math.pi * tone_hz * t)).astype(np.float32)
            stereo = np.stack([wave, wave])  # planar float: one row per channel
            chunk = 1024
            for start in range(0, n, chunk):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(stereo[:, start : start + chunk]), format="fltp", layout="stereo"
                )
                frame.sample_rate = AUDIO_SAMPLE_RATE
                frame.pts = start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
