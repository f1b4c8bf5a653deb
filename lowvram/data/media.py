"""Media decoding with PyAV: clips resampled to a frame rate, resized and centre-cropped; audio to LTX-2's log-mel.

Every failure the user can fix surfaces as `BadItem(reason)` so caching can skip and report it; no model code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# LTX-2's audio VAE input, as the official trainer computes it (torchaudio MelSpectrogram: hann window, center,
# reflect pad, magnitude (power 1), slaney mel scale and norm, f_max = sr/2, then log(clamp(1e-5))). The real VAE
# uses 64 mel bins; tiny ones take `mel_bins` from their config.
MEL_SAMPLE_RATE = 16000
MEL_N_FFT = 1024
MEL_HOP = 160
MEL_LOG_FLOOR = 1e-5


# What PyAV raises on damaged media: its FFmpegError (an OSError), and ValueError/IndexError for broken streams.
_DECODE_ERRORS = (OSError, ValueError, IndexError, EOFError)


class BadItem(Exception):
    """A dataset item that cannot be used; `str()` is the reason listed in the caching summary."""


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    frames: int  # frames available after resampling to the target fps (1 for a still image)
    duration_s: float
    has_video: bool
    has_audio: bool


# --------------------------------------------------------------------------------------------------------------------
# Probing


def probe(path: Path, fps: float, *, limit_frames: int | None = None) -> MediaInfo:
    """Size, resampled frame count and streams of a media file.

    Frame times come from demuxed packets (no decoding), and stop once `limit_frames` frames at `fps` are certain,
    so probing a long clip costs little. Damage the demuxer does not see surfaces when the clip is decoded.
    """
    import av

    _check_file(path)
    limit_s = None if limit_frames is None else (limit_frames + 1) / fps
    try:
        with av.open(str(path)) as container:
            has_audio = bool(container.streams.audio)
            if not container.streams.video:
                return MediaInfo(0, 0, 0, _container_duration(container), False, has_audio)
            vs = container.streams.video[0]
            width, height = vs.codec_context.width, vs.codec_context.height
            times = []
            for packet in container.demux(vs):
                if packet.pts is None or packet.size == 0:
                    continue
                times.append(float(packet.pts * packet.time_base))
                if limit_s is not None and len(times) > 2 and max(times) - min(times) > limit_s:
                    break
    except _DECODE_ERRORS as err:
        raise BadItem(f"cannot decode ({_short(err)})") from None
    if not times:
        raise BadItem("video stream holds no frame")
    if width <= 0 or height <= 0:
        raise BadItem("video stream has no frame size")
    if len(times) == 1:
        return MediaInfo(width, height, 1, 0.0, True, has_audio)
    times.sort()  # packets of B-frame streams arrive in decode order
    span = times[-1] - times[0] + (times[-1] - times[-2])
    return MediaInfo(width, height, _resampled_count(span, fps), span, True, has_audio)


def _resampled_count(span_s: float, fps: float) -> int:
    # Target frame k sits at k/fps and exists while it lies inside the source's span (the last source frame lasts
    # one source step). decode_video() uses the same rule.
    return max(1, math.ceil((span_s - _EPS) * fps))


_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Video


def decode_video(path: Path, *, fps: float, frames: int, width: int, height: int) -> torch.Tensor:
    """First `frames` frames at `fps` (each takes the latest source frame at or before its time), resized to cover
    WxH and centre-cropped. Returns float32 `[3, frames, height, width]` in [-1, 1] (the VAE's input range).
    """
    import av

    _check_file(path)
    targets = [k / fps for k in range(frames)]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    filled = 0
    prev, prev_img, prev_rel, step, start = None, None, 0.0, None, None

    def serve_prev() -> None:
        nonlocal filled, prev_img
        if prev_img is None:
            prev_img = _cover_crop(prev, width, height)
        out[filled] = prev_img
        filled += 1

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadItem("no video stream")
            for frame in container.decode(container.streams.video[0]):
                t = _frame_time(frame)
                start = t if start is None else start
                rel = t - start
                while prev is not None and filled < frames and targets[filled] < rel - _EPS:
                    serve_prev()
                if filled >= frames:
                    break
                if prev is not None:
                    step = rel - prev_rel
                prev, prev_img, prev_rel = frame, None, rel
            else:
                # after the last frame: it lasts one source step (a single-frame source serves one frame only)
                while (
                    prev is not None
                    and filled < frames
                    and (
                        (step is None and filled == 0)
                        or (step is not None and targets[filled] < prev_rel + step - _EPS)
                    )
                ):
                    serve_prev()
    except _DECODE_ERRORS as err:
        raise BadItem(f"cannot decode ({_short(err)})") from None
    if filled < frames:
        raise BadItem(f"only {filled} frames at {fps:g} fps, {frames} needed")
    video = torch.from_numpy(out).permute(3, 0, 1, 2).float()
    return video / 127.5 - 1.0


def _cover_crop(frame, width: int, height: int) -> np.ndarray:
    src_w, src_h = frame.width, frame.height
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    rgb = frame.to_ndarray(format="rgb24", width=new_w, height=new_h, interpolation="AREA")
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return rgb[top : top + height, left : left + width]


def decode_image(path: Path, *, width: int, height: int) -> torch.Tensor:
    """A still image as a one-frame clip `[3, 1, H, W]` in [-1, 1]."""
    return decode_video(path, fps=1.0, frames=1, width=width, height=height)


# --------------------------------------------------------------------------------------------------------------------
# Audio


def decode_audio(
    path: Path, *, start_s: float = 0.0, duration_s: float | None = None, channels: int = 2
) -> tuple[torch.Tensor, bool]:
    """The audio track resampled to 16 kHz, `[channels, samples]` float32; (zeros, False) when there is none.

    With `duration_s` the result is exactly that long: a track that ends early is zero-padded.
    """
    import av

    _check_file(path)
    n_target = None if duration_s is None else int(round(duration_s * MEL_SAMPLE_RATE))
    first = int(round(start_s * MEL_SAMPLE_RATE))
    enough = None if n_target is None else first + n_target
    layout = "stereo" if channels == 2 else "mono"
    chunks, got = [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return torch.zeros(channels, n_target or 0), False
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=MEL_SAMPLE_RATE)
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler keep its own continuous timeline
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    got += chunks[-1].shape[1]
                if enough is not None and got >= enough:
                    break  # a long track: stop decoding once the clip's span is covered
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
    except _DECODE_ERRORS as err:
        raise BadItem(f"cannot decode audio ({_short(err)})") from None
    if not chunks:
        return torch.zeros(channels, n_target or 0), False
    wave = torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32))
    wave = wave[:, first:]
    if n_target is not None:
        if wave.shape[1] < n_target:
            wave = torch.nn.functional.pad(wave, (0, n_target - wave.shape[1]))
        wave = wave[:, :n_target]
    return wave, True


def audio_duration_s(path: Path) -> float:
    """Duration of an audio file from its decoded samples (container metadata is often wrong for mp3/ogg)."""
    wave, has = decode_audio(path, channels=1)
    if not has or wave.shape[1] == 0:
        raise BadItem("no audio stream")
    return wave.shape[1] / MEL_SAMPLE_RATE


def mel_spectrogram(wave: torch.Tensor, mel_bins: int = 64) -> torch.Tensor:
    """`[C, samples]` 16 kHz -> log-mel `[C, T, mel_bins]` with T = 1 + samples // 160 (what the audio VAE eats)."""
    window = torch.hann_window(MEL_N_FFT, dtype=torch.float32)
    spec = torch.stft(
        wave.float(),
        MEL_N_FFT,
        hop_length=MEL_HOP,
        win_length=MEL_N_FFT,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    ).abs()  # [C, n_fft/2+1, T]
    mel = torch.einsum("fm,cft->cmt", slaney_mel_filterbank(MEL_N_FFT // 2 + 1, mel_bins, MEL_SAMPLE_RATE), spec)
    return torch.log(torch.clamp(mel, min=MEL_LOG_FLOOR)).transpose(1, 2).contiguous()


def slaney_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular mel filters `[n_freqs, n_mels]` on the Slaney scale with Slaney area norm (librosa's default)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    f_pts = torch.tensor([_mel_to_hz(float(m)) for m in m_pts], dtype=torch.float64)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0)
    enorm = 2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])
    return (fb * enorm[None, :]).float()


_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(f: float) -> float:
    return f / _F_SP if f < _MIN_LOG_HZ else _MIN_LOG_MEL + math.log(f / _MIN_LOG_HZ) / _LOGSTEP


def _mel_to_hz(m: float) -> float:
    return m * _F_SP if m < _MIN_LOG_MEL else _MIN_LOG_HZ * math.exp(_LOGSTEP * (m - _MIN_LOG_MEL))


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadItem(f"cannot read ({err.strerror})") from None
    if size == 0:
        raise BadItem("zero-byte file")


def _frame_time(frame) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * Fraction(frame.time_base))
    return float(frame.time or 0.0)


def _container_duration(container) -> float:
    return float(container.duration / 1_000_000) if container.duration else 0.0


def _short(err: Exception) -> str:
    # FFmpegError's str() repeats the file name; its strerror is the useful part
    text = getattr(err, "strerror", None) or (str(err).splitlines()[0] if str(err) else type(err).__name__)
    return text[:120]
