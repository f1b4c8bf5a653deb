"""CREPA (cross-frame representation alignment): an auxiliary loss aligning one block's video hidden states with a
frozen DINOv2's features of the same frame and its neighbours.

The definition (CREPA paper Eq. 6, as SimpleTuner's `helpers/training/crepa.py` trains it): the hidden states of
block `block_index` are projected by a trainable head (LayerNorm + Linear, hidden size -> DINOv2 width), both sides
are L2-normalized per token, and per latent frame f

    sim(f) = cos(h_f, y_f) + exp(-d / tau) * (cos(h_f, y_{f+d}) + cos(h_f, y_{f-d}))   (neighbours that exist)

with cos the mean over a frame's tokens of the per-token cosine similarity. The term is -mean_batch(sum_f sim(f) / F)
and the step's loss is flow loss + weight * term. The DINOv2 features come from the latent cache (computed at caching
time, resampled onto the latent grid: data/crepa_features.py); DINOv2 itself is never loaded while training.

The head is a submodule of the transformer (`crepa_head`), so the optimizer, checkpoints and resume carry it like the
LoRA; the exported LoRA file does not hold it (inference never runs it). The hidden states are taken by a forward
hook on the block, which the offload strategies keep (they hook blocks or patch Linears, never replace a block).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lowvram.errors import LowvramError
from lowvram.models.crepa import HEAD_NAME, CrepaHead, attach_head, crepa_term, frame_similarity, head_params

__all__ = ["HEAD_NAME", "Crepa", "CrepaHead", "HiddenCapture", "attach_head", "check_crepa", "crepa_term",
           "frame_similarity", "head_params"]  # fmt: skip

def check_crepa(cfg, num_layers: int, version: str = "") -> None:
    """Refuse, in one line, a CREPA setting this model cannot train (call before caching or loading)."""
    from lowvram.errors import ConfigError
    from lowvram.method.tread import resolve_routes

    c = cfg.crepa
    if not c.enabled:
        return
    if c.block_index >= num_layers:
        model = f"LTX-{version}" if version else "this model"
        raise ConfigError(
            f"crepa.block_index = {c.block_index} is out of range: {model} has {num_layers} blocks "
            f"(0..{num_layers - 1}): lower crepa.block_index"
        )
    for start, end, _ in resolve_routes(cfg.train.tread_routes, num_layers) if cfg.train.tread_routes else ():
        if start <= c.block_index <= end:
            raise ConfigError(
                f"crepa.block_index = {c.block_index} lies in the TREAD route over blocks {start}..{end}, which drops "
                "video tokens there: align a block outside the routes, or move the route"
            )


class HiddenCapture:
    """A forward hook on one block keeping its video output, only while armed (the no-grad rollout forwards before
    and the checkpoint recomputes during backward do not overwrite or keep it)."""

    def __init__(self, block: nn.Module):
        self.armed = False
        self.hidden: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.armed and torch.is_grad_enabled():
            self.hidden = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor | None:
        hidden, self.hidden, self.armed = self.hidden, None, False
        return hidden


class Crepa:
    """The CREPA mode: `prepare` arms the capture before the training forward, `finish` adds the weighted term."""

    name = "crepa"

    def __init__(self, transformer: nn.Module, *, block_index: int, weight: float, adjacent_distance: int,
                 temporal_decay: float):  # fmt: skip
        blocks = transformer.transformer_blocks
        if not 0 <= block_index < len(blocks):
            raise LowvramError(
                f"crepa.block_index = {block_index} is out of range: this transformer has blocks 0..{len(blocks) - 1}"
            )
        head = getattr(transformer, HEAD_NAME, None)
        if head is None:
            raise LowvramError("crepa.enabled = true but the transformer has no CREPA head (attach_head first)")
        self.head = head
        self.block_index = block_index
        self.weight, self.distance, self.tau = weight, adjacent_distance, temporal_decay
        self.capture = HiddenCapture(blocks[block_index])

    def prepare(self, inputs, predict, generator):
        self.capture.armed = True
        return inputs

    def finish(self, parts, inputs, batch):
        hidden = self.capture.take()
        if batch.video is None or not inputs.train_video:
            return parts  # an audio-only bucket: no frames to align
        features = getattr(batch, "crepa_features", None)
        if features is None:
            raise LowvramError(
                "crepa.enabled = true but the cached batch has no DINOv2 features: run `lowvram cache` with CREPA on"
            )
        if hidden is None:
            raise LowvramError(f"CREPA captured no hidden states from block {self.block_index} in this forward")
        # The clip's own tokens only: IC-LoRA appends its clean control tokens after them (modes/ic_lora.py), and
        # those have no DINOv2 features to align with.
        hidden = hidden[:, : features.shape[1] * features.shape[2]]
        term = crepa_term(self.project(hidden, inputs), features.to(hidden.device), self.distance, self.tau)
        return replace(parts, total=parts.total + self.weight * term)

    def project(self, hidden: torch.Tensor, inputs) -> torch.Tensor:
        """The head's output [B, T, N, D] for the block's video hidden states [B, T*N, hidden] (tokens frame-major:
        pack_video_latents)."""
        b, s, _ = hidden.shape
        t = inputs.latent_frames
        param = self.head[1].weight
        out = self.head(hidden.to(param.dtype))
        return out.view(b, t, s // t, out.shape[-1])
