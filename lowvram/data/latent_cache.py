"""Latent cache: normalized VAE posterior means (video, and audio with a has-audio mask) in one safetensors per sample.

An entry is keyed by its source file (size, mtime, first-MB hash), the decode settings and the VAE fingerprints;
a stale or corrupt entry is rebuilt, and writes are atomic. It does not pick VAE memory options (the planner does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.data import media
from lowvram.data.buckets import AUDIO_LATENT_FPS
from lowvram.data.dataset import Item
from lowvram.data.fingerprint import module_fingerprint, read_metadata, source_fingerprint
from lowvram.fsutil import save_safetensors_atomic
from lowvram.vae import VaeOptions, encode_video

LATENT_FORMAT = 1  # bump when the stored layout changes: every entry then reads as stale


@dataclass(frozen=True)
class LatentEncoders:
    """What the latent cache runs: the video VAE and the audio VAE.

    With `audio_enabled` False (a video-only run) the audio VAE only gives the shape of the all-zero, masked audio
    latents every entry still carries, so batches keep one layout.
    """

    video_vae: object | None
    audio_vae: object | None
    video_fingerprint: str = ""
    audio_fingerprint: str = ""
    audio_enabled: bool = True

    @classmethod
    def from_components(cls, components, *, audio: bool = True) -> LatentEncoders:
        video_vae, audio_vae = components.video_vae, components.audio_vae
        return cls(
            video_vae,
            audio_vae,
            module_fingerprint(video_vae) if video_vae is not None else "",
            module_fingerprint(audio_vae) if audio_vae is not None and audio else "",
            audio_enabled=audio and audio_vae is not None,
        )


def latent_cache_disk_bytes_per_item(
    width: int,
    height: int,
    frames: int,
    *,
    fps: float = 25.0,
    latent_channels: int = 128,
    audio_channels: int = 8,
    audio_mel_latent_bins: int = 16,
    dtype_bytes: int = 2,
) -> int:
    """Disk bytes of one latent entry for the real model: video [128, (F-1)/8+1, H/32, W/32] + audio [8, T, 16]
    (T = 25 latent frames per second of clip) in the VAE dtype, the mask and the safetensors header."""
    video = latent_channels * ((frames - 1) // 8 + 1) * (height // 32) * (width // 32)
    audio = audio_channels * max(1, round(frames / fps * AUDIO_LATENT_FPS)) * audio_mel_latent_bins
    header_bytes = 1024  # 3 tensor entries and our metadata (caption, source path, key), rounded up
    return (video + audio) * dtype_bytes + 1 + header_bytes


def latent_path(cache_dir: Path, item: Item) -> Path:
    where = hashlib.sha256(str(item.path.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / "latents" / item.dataset_id / f"{item.path.stem}-{where}.safetensors"


def entry_key(item: Item, encoders: LatentEncoders) -> str:
    """Everything an entry depends on, hashed. Changing any of it makes the stored entry stale."""
    parts = {
        "format": LATENT_FORMAT,
        "source": source_fingerprint(item.path),
        "audio_source": source_fingerprint(item.audio_path) if item.audio_path and encoders.audio_enabled else None,
        "audio_enabled": encoders.audio_enabled,
        "kind": item.kind,
        "bucket": [item.bucket.width, item.bucket.height, item.bucket.frames, item.bucket.audio_latent_frames],
        "fps": item.fps,
        "duration_s": round(item.duration_s, 6),
        "crop": "cover-center",
        "mel": [media.MEL_SAMPLE_RATE, media.MEL_N_FFT, media.MEL_HOP, "slaney"],
        "video_vae": encoders.video_fingerprint if item.kind != "audio" else None,
        "audio_vae": encoders.audio_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def required_keys(item: Item) -> tuple[str, ...]:
    return ("audio_latents", "audio_mask") if item.kind == "audio" else ("video_latents", "audio_latents", "audio_mask")


def entry_state(path: Path, item: Item, key: str) -> str:
    """'fresh' (reuse), 'missing', 'stale' (settings or source changed) or 'corrupt' (unreadable/truncated)."""
    if not path.exists():
        return "missing"
    meta = read_metadata(path, required_keys(item))
    if meta is None:
        return "corrupt"
    return "fresh" if meta.get("key") == key else "stale"


# --------------------------------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_items(
    items: list[Item], encoders: LatentEncoders, vae_options: VaeOptions, dtype: torch.dtype | None = None
) -> list[dict[str, torch.Tensor]]:
    """Latents of items of ONE bucket, encoded in VAE batches of `vae_options.batch_size`. Raises media.BadItem."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in items]
    if items[0].kind != "audio":
        b = items[0].bucket
        vae = encoders.video_vae
        param = next(vae.parameters())
        clips = [
            media.decode_video(it.path, fps=it.fps if it.kind == "video" else 1.0, frames=b.frames, width=b.width,
                               height=b.height)
            for it in items
        ]  # fmt: skip
        video = torch.stack(clips).to(param.device, param.dtype)
        latents = encode_video(vae, video, vae_options)
        latents = _normalize_video(latents, vae)
        for i in range(len(items)):
            out[i]["video_latents"] = latents[i].to("cpu", dtype or latents.dtype).contiguous()
    for i, it in enumerate(items):
        audio, has_audio = _encode_audio(it, encoders)
        out[i]["audio_latents"] = audio.to("cpu", dtype or audio.dtype).contiguous()
        out[i]["audio_mask"] = torch.tensor([1 if has_audio else 0], dtype=torch.int8)
    return out


def audio_latent_frames(item: Item) -> int:
    if item.bucket.audio_latent_frames:
        return item.bucket.audio_latent_frames
    return max(1, int(round(item.duration_s * AUDIO_LATENT_FPS)))


def _encode_audio(item: Item, encoders: LatentEncoders) -> tuple[torch.Tensor, bool]:
    """Normalized audio latents `[C, T, M]` and whether the item really has audio (else zeros, loss masked)."""
    vae = encoders.audio_vae
    frames = audio_latent_frames(item)
    if vae is None:  # no audio VAE at all: an empty placeholder, masked
        return torch.zeros(0, frames, 0), False
    if not encoders.audio_enabled:
        shape = (vae.config.latent_channels, frames, vae.config.mel_bins // vae.mel_compression_ratio)
        return torch.zeros(shape, dtype=next(vae.parameters()).dtype), False
    mel_frames = frames * vae.temporal_compression_ratio
    mel_bins = vae.config.mel_bins
    channels = vae.config.in_channels
    param = next(vae.parameters())
    if item.audio_path is None:
        has_audio = False
        mel = torch.full((channels, mel_frames, mel_bins), float(torch.log(torch.tensor(media.MEL_LOG_FLOOR))))
    else:
        wave, has_audio = media.decode_audio(item.audio_path, duration_s=frames / AUDIO_LATENT_FPS, channels=channels)
        mel = media.mel_spectrogram(wave, mel_bins)
        # 1 + samples/hop frames come out (centred STFT); LTX-2 takes 4 mel frames per latent frame, 25 per second
        mel = _fit_time(mel, mel_frames)
    latents = vae.encode(mel[None].to(param.device, param.dtype)).latent_dist.mode()[0]  # [C, T, M]
    latents = latents[:, :frames]
    if latents.shape[1] < frames:
        raise media.BadItem(f"audio VAE returned {latents.shape[1]} latent frames, {frames} expected")
    return _normalize_audio(latents, vae), has_audio


def _fit_time(mel: torch.Tensor, frames: int) -> torch.Tensor:
    if mel.shape[1] >= frames:
        return mel[:, :frames]
    pad = mel[:, -1:].expand(-1, frames - mel.shape[1], -1)
    return torch.cat([mel, pad], dim=1)


def _normalize_video(latents: torch.Tensor, vae) -> torch.Tensor:
    from lowvram.models.ltx2.forward import normalize_video_latents

    return normalize_video_latents(latents, vae)


def _normalize_audio(latents: torch.Tensor, vae) -> torch.Tensor:
    from lowvram.models.ltx2.forward import normalize_audio_latents, pack_audio_latents, unpack_audio_latents

    packed = normalize_audio_latents(pack_audio_latents(latents[None]), vae)
    return unpack_audio_latents(packed, latents.shape[-1])[0]


def save_entry(path: Path, tensors: dict[str, torch.Tensor], item: Item, key: str) -> None:
    meta = {
        "key": key,
        "caption": item.caption,
        "bucket": item.bucket.key,
        "source": str(item.path),
        "dataset_id": item.dataset_id,
        "kind": item.kind,
    }
    save_safetensors_atomic(tensors, path, meta)
