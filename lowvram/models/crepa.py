"""CREPA's trainable projection head and its loss term (the definition: lowvram/method/modes/crepa.py's docstring).

Here, beside the model classes, so the trainer (method/modes/crepa.py) and the planner (plan/modes.py, which measures
them on fake tensors) use the same code without the planner importing the trainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_NAME = "crepa_head"


class CrepaHead(nn.Sequential):
    """LayerNorm + Linear from the transformer's hidden size to the DINOv2 width (SimpleTuner's projector)."""

    def __init__(self, hidden_size: int, feature_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__(nn.LayerNorm(hidden_size, dtype=dtype), nn.Linear(hidden_size, feature_dim, dtype=dtype))


def head_params(hidden_size: int, feature_dim: int) -> int:
    """Trainable parameters of the head (LayerNorm weight + bias, Linear weight + bias)."""
    return 2 * hidden_size + hidden_size * feature_dim + feature_dim


def hidden_size_of(transformer_config) -> int:
    get = transformer_config.get if isinstance(transformer_config, dict) else lambda k: getattr(transformer_config, k)
    return int(get("num_attention_heads")) * int(get("attention_head_dim"))


def attach_head(transformer: nn.Module, feature_dim: int) -> CrepaHead:
    """A new head on `transformer.crepa_head`, in the dtype of the LoRA parameters (the loop makes them fp32 unless
    the optimizer keeps bf16 weights). Its initialisation draws from the global generator, after the LoRA's."""
    trainable = next((p for p in transformer.parameters() if p.requires_grad), None)
    dtype = trainable.dtype if trainable is not None else torch.float32
    head = CrepaHead(hidden_size_of(transformer.config), feature_dim, dtype=dtype)
    transformer.add_module(HEAD_NAME, head)
    return head


def frame_similarity(projected: torch.Tensor, features: torch.Tensor, distance: int, tau: float) -> torch.Tensor:
    """`sim(f)` [B, T] of the module docstring, for `projected` and `features` [B, T, N, D] (not yet normalized)."""
    h = F.normalize(projected.float(), dim=-1)
    y = F.normalize(features.float(), dim=-1)
    total = (h * y).sum(-1).mean(-1)
    frames = total.shape[1]
    d = min(distance, frames - 1)  # SimpleTuner's clamp: a clip shorter than d frames aligns its farthest pair
    if d > 0:
        w = math.exp(-d / tau)
        forward = (h[:, :-d] * y[:, d:]).sum(-1).mean(-1)  # frame f with the features of f + d
        backward = (h[:, d:] * y[:, :-d]).sum(-1).mean(-1)  # frame f with the features of f - d
        total = total + F.pad(w * forward, (0, d)) + F.pad(w * backward, (d, 0))
    return total


def crepa_term(projected: torch.Tensor, features: torch.Tensor, distance: int, tau: float) -> torch.Tensor:
    """The auxiliary loss before its weight: minus the frame-averaged similarity, averaged over the batch."""
    sim = frame_similarity(projected, features, distance, tau)
    return -(sim.sum(1) / sim.shape[1]).mean()
