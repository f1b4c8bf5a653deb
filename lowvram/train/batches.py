"""What the training loop consumes: cached, packed, normalized latents and connector outputs, batched by bucket.

In-memory samples (tests) and the on-disk caches (real runs) behind one resumable `BatchSource`; it never encodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lowvram.errors import LowvramError


@dataclass(frozen=True)
class CachedSample:
    """One cached training item, exactly what the transformer reads (nothing left to encode)."""

    video: torch.Tensor | None  # [S_v, C] packed, normalized video latents
    audio: torch.Tensor | None  # [S_a, C_a] packed, normalized audio latents (None: clip without sound)
    text_video: torch.Tensor  # [L, D] connector output for the video stream
    text_audio: torch.Tensor  # [L, D] connector output for the audio stream
    text_mask: torch.Tensor  # [L]
    latent_frames: int
    latent_height: int
    latent_width: int
    fps: float = 25.0

    @property
    def bucket(self) -> tuple:
        """Samples batch together only when every shape matches."""
        v = None if self.video is None else tuple(self.video.shape)
        a = None if self.audio is None else tuple(self.audio.shape)
        return (v, a, tuple(self.text_video.shape), self.latent_frames, self.latent_height, self.latent_width, self.fps)


@dataclass(frozen=True)
class LatentBatch:
    video: torch.Tensor | None  # [B, S_v, C]
    audio: torch.Tensor | None  # [B, S_a, C_a]
    text_video: torch.Tensor
    text_audio: torch.Tensor
    text_mask: torch.Tensor
    latent_frames: int
    latent_height: int
    latent_width: int
    fps: float
    audio_present: torch.Tensor | None = None  # [B] bool


class BatchSource(Protocol):
    """An endless, resumable stream of batches: `position()` after a batch, `seek(position)` to continue there."""

    def __next__(self) -> LatentBatch: ...

    def position(self) -> dict[str, Any]: ...

    def seek(self, position: dict[str, Any]) -> None: ...

    def batches_per_epoch(self) -> int: ...


class CachedBatches:
    """Batches of same-shape cached samples in a seeded order that changes every epoch.

    The order of an epoch is a pure function of (seed, epoch), so a data position is just (epoch, batch index):
    resuming replays the same batches without storing any sampler state. A bucket's leftover samples that do not
    fill a batch wait for the next epoch's order (they are not dropped forever, just this epoch).
    """

    def __init__(self, samples: list[CachedSample], batch_size: int, seed: int):
        if not samples:
            raise LowvramError("the dataset produced no usable samples: check data.dataset_dir and the caching summary")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._plan = self._epoch_plan(0)
        if not self._plan:
            raise LowvramError(
                f"no bucket has {batch_size} samples of the same shape: lower train.batch_size or add clips"
            )

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.samples), generator=g).tolist()
        open_batches: dict[tuple, list[int]] = {}
        plan: list[list[int]] = []
        for i in order:
            group = open_batches.setdefault(self.samples[i].bucket, [])
            group.append(i)
            if len(group) == self.batch_size:
                plan.append(group)
                open_batches[self.samples[i].bucket] = []
        return plan

    def batches_per_epoch(self) -> int:
        return len(self._plan)

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, Any]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self._plan = self._epoch_plan(self.epoch)

    def __iter__(self) -> Iterator[LatentBatch]:
        return self

    def __next__(self) -> LatentBatch:
        if self.index >= len(self._plan):
            self.epoch, self.index = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        items = [self.samples[i] for i in self._plan[self.index]]
        self.index += 1
        return collate(items)


def collate(items: list[CachedSample]) -> LatentBatch:
    first = items[0]
    has_video = first.video is not None
    with_audio = [s for s in items if s.audio is not None]
    audio = None
    audio_present = None
    if with_audio:
        # A clip without sound borrows zeros of the batch's audio shape; its audio loss is masked.
        shape = with_audio[0].audio.shape
        audio = torch.stack(
            [s.audio if s.audio is not None else torch.zeros(shape, dtype=with_audio[0].audio.dtype) for s in items]
        )
        audio_present = torch.tensor([s.audio is not None for s in items])
    return LatentBatch(
        video=torch.stack([s.video for s in items]) if has_video else None,
        audio=audio,
        text_video=torch.stack([s.text_video for s in items]),
        text_audio=torch.stack([s.text_audio for s in items]),
        text_mask=torch.stack([s.text_mask for s in items]),
        latent_frames=first.latent_frames,
        latent_height=first.latent_height,
        latent_width=first.latent_width,
        fps=first.fps,
        audio_present=audio_present,
    )


class DiskBatches:
    """The data pipeline's cached batches (`lowvram.data.batches`), packed for the transformer.

    Its order depends only on (items, batch size, seed, position), so the data position is one integer.
    """

    def __init__(self, items: list, batch_size: int, *, seed: int, fps: float):
        from lowvram.data.batches import epoch_plan

        self.items, self.batch_size, self.seed, self.fps = items, batch_size, seed, fps
        self._per_epoch = len(epoch_plan(items, batch_size, seed, 0)) if items else 0
        self.seek({"position": 0})

    def batches_per_epoch(self) -> int:
        return self._per_epoch

    def position(self) -> dict[str, Any]:
        return {"position": self._next, "epoch": self._next // max(1, self._per_epoch)}

    def seek(self, position: dict[str, Any]) -> None:
        from lowvram.data.batches import iterate_batches

        self._next = int(position["position"])
        self._it = iterate_batches(self.items, self.batch_size, seed=self.seed, start_position=self._next)

    def __iter__(self) -> Iterator[LatentBatch]:
        return self

    def __next__(self) -> LatentBatch:
        from lowvram.models.ltx2.forward import pack_audio_latents, pack_video_latents

        b = next(self._it)
        self._next = b.position + 1
        video = None if b.video_latents is None else pack_video_latents(b.video_latents)
        f, h, w = (1, 1, 1) if b.video_latents is None else tuple(b.video_latents.shape[2:])
        return LatentBatch(
            video=video,
            audio=pack_audio_latents(b.audio_latents),
            text_video=b.text_video,
            text_audio=b.text_audio,
            text_mask=b.text_mask,
            latent_frames=f,
            latent_height=h,
            latent_width=w,
            fps=self.fps,
            audio_present=b.audio_mask > 0,
        )
