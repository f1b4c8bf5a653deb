"""Batches over cached items: each from one bucket, in a seeded order, resumable at any batch position.

The order of batch N depends only on (items, batch_size, seed, N), so a resumed run continues exactly where it
stopped. It loads safetensors from disk; it does not move tensors to a device (the loop does).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.errors import LowvramError


@dataclass(frozen=True)
class CachedItem:
    """One cached training sample: where its latents and caption embedding live, and its bucket."""

    latent_path: Path
    text_path: Path
    bucket: str  # "WxH@F" or "audio@T"
    caption: str
    dataset_id: str
    repeats: int = 1


@dataclass(frozen=True)
class Batch:
    position: int  # global batch index (resume from position + 1)
    epoch: int
    bucket: str
    captions: list[str]
    video_latents: torch.Tensor | None  # [B, C, F', H', W'] normalized (None for audio-only buckets)
    audio_latents: torch.Tensor  # [B, C_a, T_a, M_a] normalized (unpacked); zeros where audio_mask is 0
    audio_mask: torch.Tensor  # [B] 1 = the clip has audio, 0 = mask its audio loss
    text_video: torch.Tensor  # [B, L, D] connector outputs for the video stream
    text_audio: torch.Tensor  # [B, L, D] connector outputs for the audio stream
    text_mask: torch.Tensor  # [B, L]
    latent_paths: list[Path]


def epoch_plan(
    items: list[CachedItem], batch_size: int, seed: int, epoch: int, drop_last: bool = False
) -> list[list[int]]:
    """Batches (lists of item indices) of one epoch: repeats applied, shuffled within buckets, batch order shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_bucket[it.bucket] += [i] * it.repeats
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            if len(chunk) == batch_size or not drop_last:
                batches.append(chunk)
    rng.shuffle(batches)
    return batches


def iterate_batches(
    items: list[CachedItem],
    batch_size: int,
    *,
    seed: int = 0,
    start_position: int = 0,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Endless batches from position `start_position` on (epoch after epoch)."""
    if not items:
        raise LowvramError("no cached items to train on; run caching first")
    if batch_size < 1:
        raise LowvramError(f"batch size must be >= 1, got {batch_size}")
    per_epoch = len(epoch_plan(items, batch_size, seed, 0, drop_last))
    if per_epoch == 0:
        raise LowvramError(f"no bucket holds {batch_size} items (drop_last): lower the batch size")
    position = start_position
    text_memo: dict[Path, dict[str, torch.Tensor]] = {}
    while True:
        epoch, offset = divmod(position, per_epoch)
        plan = epoch_plan(items, batch_size, seed, epoch, drop_last)
        for index in plan[offset:]:
            yield load_batch([items[i] for i in index], position, epoch, text_memo)
            position += 1


def load_batch(members: list[CachedItem], position: int = 0, epoch: int = 0, text_memo=None) -> Batch:
    from safetensors.torch import load_file

    text_memo = {} if text_memo is None else text_memo
    lat = [load_file(str(m.latent_path)) for m in members]
    texts = []
    for m in members:
        if m.text_path not in text_memo:
            if len(text_memo) > 256:  # captions repeat; a bounded memo keeps host RAM flat
                text_memo.clear()
            text_memo[m.text_path] = load_file(str(m.text_path))
        texts.append(text_memo[m.text_path])
    has_video = "video_latents" in lat[0]
    return Batch(
        position=position,
        epoch=epoch,
        bucket=members[0].bucket,
        captions=[m.caption for m in members],
        video_latents=torch.stack([x["video_latents"] for x in lat]) if has_video else None,
        audio_latents=torch.stack([x["audio_latents"] for x in lat]),
        audio_mask=torch.cat([x["audio_mask"] for x in lat]).float(),
        text_video=torch.stack([t["video"] for t in texts]),
        text_audio=torch.stack([t["audio"] for t in texts]),
        text_mask=torch.stack([t["mask"] for t in texts]).long(),
        latent_paths=[m.latent_path for m in members],
    )
