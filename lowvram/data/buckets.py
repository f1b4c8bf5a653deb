"""Buckets: the (width, height, frames) every item of a batch shares, chosen from a clip's size and length.

`aspect_ratio` keeps the clip's aspect at ~resolution² pixels and the dataset's frame count; `resolution_frames`
keeps each clip's own size (scaled down to fit) and length (WxH@F). It does not decode anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowvram.data.media import BadItem, MediaInfo
from lowvram.data.spec import DatasetSpec

MULTIPLE = 32  # LTX-2's VAE compresses 32x spatially
AUDIO_LATENT_FPS = 25  # 16 kHz / hop 160 / 4x audio VAE time compression


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    frames: int  # video frames (0 for audio-only)
    audio_latent_frames: int = 0  # audio-only items: the audio length in latent frames (25 per second)

    @property
    def key(self) -> str:
        if self.frames == 0:
            return f"audio@{self.audio_latent_frames}"
        return f"{self.width}x{self.height}@{self.frames}"


def floor_8k1(frames: int) -> int:
    return (frames - 1) // 8 * 8 + 1 if frames >= 1 else 0


def bucket_for_video(spec: DatasetSpec, info: MediaInfo, *, still: bool = False) -> Bucket:
    """The bucket of a clip or a still image; raises BadItem when a clip is too short or too long for the dataset."""
    video = spec.video
    if still:  # a still image trains as a one-frame video
        frames = 1
    else:
        if info.frames < video.effective_min_frames:
            raise BadItem(f"too short: {info.frames} frames at {video.frame_rate:g} fps, min_frames is "
                          f"{video.effective_min_frames}")  # fmt: skip
        if video.max_frames is not None and info.frames > video.max_frames:
            raise BadItem(f"too long: {info.frames} frames at {video.frame_rate:g} fps, max_frames is "
                          f"{video.max_frames}")  # fmt: skip
        frames = min(info.frames, video.num_frames)
        if video.bucket_strategy == "resolution_frames" and video.frame_interval:
            frames = max(1, frames // video.frame_interval * video.frame_interval + 1)
            frames = min(frames, info.frames)
        frames = floor_8k1(frames)
    width, height = bucket_size(spec, info.width, info.height)
    return Bucket(width, height, frames)


def bucket_size(spec: DatasetSpec, src_w: int, src_h: int) -> tuple[int, int]:
    if isinstance(spec.resolution, tuple):
        return spec.resolution
    area = spec.resolution**2
    if spec.video.bucket_strategy == "resolution_frames":
        # the clip's own size, scaled down (never up) to fit the area, floored to multiples of 32
        scale = min(1.0, math.sqrt(area / (src_w * src_h)))
        return (
            max(MULTIPLE, int(src_w * scale) // MULTIPLE * MULTIPLE),
            max(MULTIPLE, int(src_h * scale) // MULTIPLE * MULTIPLE),
        )
    aspect = src_w / src_h
    height = math.sqrt(area / aspect)
    return _round32(height * aspect), _round32(height)


def _round32(x: float) -> int:
    return max(MULTIPLE, int(round(x / MULTIPLE)) * MULTIPLE)


def bucket_for_audio(spec: DatasetSpec, duration_s: float) -> tuple[Bucket, float]:
    """Audio-only: the item's duration (rounded down to whole latent frames / duration_interval) and its bucket."""
    audio = spec.audio
    if audio.min_duration_seconds is not None and duration_s < audio.min_duration_seconds:
        raise BadItem(f"too short: {duration_s:.2f} s, min_duration_seconds is {audio.min_duration_seconds}")
    if audio.max_duration_seconds is not None:
        duration_s = min(duration_s, audio.max_duration_seconds)
    if audio.duration_interval:
        duration_s = math.floor(duration_s / audio.duration_interval + 1e-9) * audio.duration_interval
    latent_frames = int(math.floor(duration_s * AUDIO_LATENT_FPS + 1e-6))
    if latent_frames < 1:
        raise BadItem(f"too short: {duration_s:.2f} s of audio")
    return Bucket(0, 0, 0, latent_frames), latent_frames / AUDIO_LATENT_FPS
