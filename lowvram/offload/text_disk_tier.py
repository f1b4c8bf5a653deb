"""The text encoder's decoder layers streamed from the disk tier while captions are cached.

Gemma3-12B at int8 is ~12 GB: on a 16 GiB machine it fits neither beside the rest in RAM (pinned, as weight
streaming holds it) nor on a 12 GB card. Here every decoder layer lives in the disk tier's file: the quantized
loader writes each layer there as it passes it (offload/disk_tier.py `DiskTierLoader`, so the layers are never all in
RAM), and during encoding a worker thread reads them, in order, into a two-buffer pinned staging ring, from which
each is copied into one of two device slots just before it runs (the block-swap ring, forward only). Host RAM holds
the layers' staging ring and the weights outside the layers (embedding, vision tower, norms), which go to the
device with the rest of the encoder. The file is deleted when the phase ends. It decides nothing: the planner sets
`memory.text_encoder_on_disk`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lowvram.data.fingerprint import FINGERPRINT_SAMPLES_ATTR, tensor_sample
from lowvram.device import Backend
from lowvram.models.text_layers import decoder_layers
from lowvram.offload.disk_tier import DiskTierLoader, PrewrittenBlocks, StagedBlockSwap, apply_staged_block_swap

FILE_NAME = "text_encoder"  # disk-tier-text_encoder.safetensors beside the transformer's disk tier file


def layer_samples(text_encoder: nn.Module, indices) -> dict[str, bytes]:
    """The fingerprint samples (data/fingerprint.py) of decoder layers `indices`, taken while their weights are real:
    the text cache's key must depend on the weights, not on the placeholders they leave behind."""
    name, layers = decoder_layers(text_encoder)
    return {
        label: tensor_sample(label, p)
        for i in indices
        for label, p in layers[i].named_parameters(prefix=f"{name}.{i}", remove_duplicate=False)
    }


class _SamplingLoader(DiskTierLoader):
    """The disk tier loader that keeps each layer's fingerprint samples before writing it away."""

    samples: dict[str, bytes]

    def _write(self, index: int) -> None:
        self.samples.update(layer_samples(self.model, [index]))
        super()._write(index)


def text_disk_tier_loader(text_encoder_skeleton: nn.Module, folder: str | os.PathLike) -> DiskTierLoader:
    """A `progress` hook for the quantized Gemma load: each decoder layer goes to the disk tier's file as soon as
    the loader has filled it (its weights become placeholders; their fingerprint samples stay, in `.samples`)."""
    name, layers = decoder_layers(text_encoder_skeleton)
    loader = _SamplingLoader(text_encoder_skeleton, Path(folder), range(len(layers)), name, name=FILE_NAME)
    loader.samples = {}
    return loader


def apply_text_disk_tier(
    text_encoder: nn.Module,
    backend: Backend,
    folder: str | os.PathLike,
    *,
    prewritten: PrewrittenBlocks | None = None,
    samples: dict[str, bytes] | None = None,
) -> StagedBlockSwap:
    """Stream every decoder layer of `text_encoder` from the disk tier (forward only). `prewritten`: the layers the
    loader already wrote (`text_disk_tier_loader(...).finish()`); without it they are written now, layer by layer,
    and freed from RAM (`samples`: the prewritten layers' fingerprint samples, from the loader). Apply before
    `backend.place_module`; `release_text_disk_tier` when encoding is done."""
    name, layers = decoder_layers(text_encoder)
    owner_name, _, attr = name.rpartition(".")
    owner = text_encoder.get_submodule(owner_name) if owner_name else text_encoder
    n = len(layers)
    if samples is None:
        samples = layer_samples(text_encoder, range(n))
    swap = apply_staged_block_swap(
        owner,
        backend,
        blocks_to_swap=n,
        blocks_on_disk=n,
        disk_dir=folder,
        prewritten=prewritten,
        blocks_attr=attr,
        inference=True,
        file_name=FILE_NAME,
    )
    setattr(text_encoder, FINGERPRINT_SAMPLES_ATTR, samples)
    return swap


def release_text_disk_tier(swap: StagedBlockSwap) -> None:
    """End the streaming without bringing the layers back: stop the worker, unhook, delete the file (the encoder is
    freed next; its layers hold placeholders)."""
    for handle in swap._handles:
        handle.remove()
    swap._handles.clear()
    swap.close()
    for index in list(swap._bound):
        swap._unbind(index)
    swap._slots.clear()
    swap.staging.clear()
    if swap.disk_file is not None:
        swap.disk_file.close()
        if swap.owns_disk_file:
            swap.disk_file.path.unlink(missing_ok=True)


class TextDiskTier:
    """One text-cache phase's disk tier, as the run assembly drives it: `progress_for` goes to the loader (the
    quantized Gemma load writes its layers to the file as it reads them), `apply` after loading (an encoder built
    in memory, or loaded whole, is written now), `release` when encoding is done, `abort` when loading failed."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.loader: DiskTierLoader | None = None
        self.swap: StagedBlockSwap | None = None

    def progress_for(self, component: str, skeleton: nn.Module):
        if component != "text_encoder":
            return None
        self.loader = text_disk_tier_loader(skeleton, self.folder)
        return self.loader.progress

    def apply(self, text_encoder: nn.Module, backend: Backend) -> StagedBlockSwap:
        loader, self.loader = self.loader, None
        prewritten = loader.finish() if loader is not None else None
        samples = loader.samples if loader is not None else None
        self.swap = apply_text_disk_tier(text_encoder, backend, self.folder, prewritten=prewritten, samples=samples)
        return self.swap

    def release(self) -> None:
        if self.swap is not None:
            release_text_disk_tier(self.swap)
            self.swap = None

    def abort(self) -> None:
        if self.loader is not None:
            self.loader.abort()
            self.loader = None
        self.release()
