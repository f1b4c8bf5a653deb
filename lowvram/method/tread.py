"""TREAD token routing: a random share of video tokens skips a span of blocks while training, applied from outside.

It cuts the routed blocks' activation memory and compute; it never routes at inference.
"""

from __future__ import annotations

import torch

from lowvram.errors import LowvramError

# Block arguments that carry one entry per video token, and the axis it is on.
_VIDEO_TOKEN_ARGS = {"temb": 1, "temb_ca_scale_shift": 1, "temb_ca_gate": 1}
_VIDEO_TOKEN_ROPE = ("video_rotary_emb", "ca_video_rotary_emb")


def resolve_routes(routes: list, num_layers: int) -> tuple[tuple[int, int, float], ...]:
    """`(start, end, selection_ratio)` per route, negative indices counted from the end; bad routes refused."""
    out: list[tuple[int, int, float]] = []
    for r in routes:
        start = r.start_layer_idx % num_layers if r.start_layer_idx < 0 else r.start_layer_idx
        end = r.end_layer_idx % num_layers if r.end_layer_idx < 0 else r.end_layer_idx
        if not 0 <= start <= end < num_layers:
            raise LowvramError(
                f"TREAD route {r.start_layer_idx}..{r.end_layer_idx} is outside the model's {num_layers} blocks: "
                f"use indices in 0..{num_layers - 1} (or negative from the end)"
            )
        if any(start <= e and s <= end for s, e, _ in out):
            raise LowvramError("TREAD routes overlap: give each block range once")
        out.append((start, end, float(r.selection_ratio)))
    return tuple(sorted(out))


class TreadRouter:
    """TREAD: a random share of video tokens skips blocks `start..end`, rejoining unchanged after `end`.

    The routed blocks see fewer tokens, which cuts their activation memory and compute by about the share; the
    loss still covers every token. Token choice draws from the global CPU generator, which gradient checkpointing
    restores on recompute and training checkpoints save, so runs stay reproducible. Only active while training.
    """

    def __init__(self, transformer: torch.nn.Module, routes: list):
        import inspect

        blocks = transformer.transformer_blocks
        self.routes = resolve_routes(routes, len(blocks))
        self._signature = inspect.signature(blocks[0].forward)
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # start -> (full hidden, keep idx, S)
        self._handles = []
        for start, end, ratio in self.routes:
            for i in range(start, end + 1):
                self._handles.append(
                    blocks[i].register_forward_pre_hook(self._pre_hook(start, i == start, ratio), with_kwargs=True)
                )
            self._handles.append(blocks[end].register_forward_hook(self._post_hook(start)))
        self._transformer = transformer

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _active(self, module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _pre_hook(self, start: int, is_start: bool, ratio: float):
        def hook(module, args, kwargs):
            if not self._active(module):
                return None
            bound = self._signature.bind(*args, **kwargs)
            kw = dict(bound.arguments)
            if kw.get("self_attention_mask") is not None:
                raise LowvramError("TREAD cannot route tokens under a video self-attention mask: remove tread_routes")
            if is_start:
                hidden = kw["hidden_states"]
                b, s, _ = hidden.shape
                keep = max(1, round(s * (1.0 - ratio)))
                # One permutation per sample from the CPU generator (checkpoint recompute replays it exactly).
                idx = torch.stack([torch.randperm(s)[:keep].sort().values for _ in range(b)]).to(hidden.device)
                self._state[start] = (hidden, idx, s)
                kw["hidden_states"] = _take(hidden, idx, 1)
            _, idx, s = self._state[start]
            for name, axis in _VIDEO_TOKEN_ARGS.items():
                t = kw.get(name)
                if t is not None and t.shape[axis] == s:
                    kw[name] = _take(t, idx, axis)
            for name in _VIDEO_TOKEN_ROPE:
                rope = kw.get(name)
                if rope is not None and rope[0].shape[2] == s:
                    kw[name] = tuple(_take(t, idx, 2) for t in rope)
            return (), kw

        return hook

    def _post_hook(self, start: int):
        def hook(module, args, output):
            if not self._active(module) or start not in self._state:
                return None
            full, idx, _ = self._state[start]
            hidden, audio = output
            index = idx.unsqueeze(-1).expand(-1, -1, full.shape[-1])
            return full.scatter(1, index, hidden.to(full.dtype)), audio

        return hook


def _take(t: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-sample gather of token positions `idx` [B, K] along `axis` of `t` (batch first)."""
    view = [idx.shape[0]] + [1] * (t.dim() - 1)
    view[axis] = idx.shape[1]
    size = list(t.shape)
    size[axis] = idx.shape[1]
    return torch.gather(t, axis, idx.view(view).expand(size))
