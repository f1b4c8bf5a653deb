"""Validation adapters stacked on the LoRA being trained, for the validation render only, then removed.

How: a forward hook on each adapted Linear adds `scale * (alpha / rank) * B (A x)` to its output (the trained LoRA's
peft layer's output where training adapts it, the plain Linear where it does not), and is removed after the set's
render. Why not peft's second adapter or a fused copy:
- peft's `inject_adapter_in_model` / `delete_adapter` add and drop modules and parameters inside the model being
  trained: the block swap ring, the streaming buffers, FSDP2's shards and the optimizer hold references to that
  tree, and a training run must come out of validation bit-identical. A hook touches no parameter and no module.
- a fused copy (W + s B A) needs a second copy of every adapted base weight, or a write into the base weights that
  block swap / streaming keep on the host (and that quantized layers cannot take back exactly).
- diffusers' `load_lora_weights` belongs to its pipelines, which validation does not use (models/sampling.py says
  why).
The adapter's tensors stay on the host in the file's dtype; each layer call copies its own A and B to where its
input is (the device, under any offload strategy) in the input's dtype: the device holds one layer's adapter at a
time, the worst of which the plan budgets (`ResolvedSet.delta_bytes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F


def load_adapter_tensors(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, factor)} on the host; factor = scale * alpha / rank (1 * scale when the file has no
    alpha: lowvram's own export folds alpha into B, as ComfyUI reads files without alpha)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(adapter.file), framework="pt") as f:
        for m in adapter.modules:
            alpha = float(f.get_tensor(m.alpha_key).item()) / m.rank if m.alpha_key else 1.0
            out[m.module] = (f.get_tensor(m.a_key), f.get_tensor(m.b_key), adapter.scale * alpha)
    return out


def _delta_hook(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], backend=None):
    def hook(module, args, output):
        x = args[0]
        # Through the device seam when given (the simulated device charges the copies), else to the input's device.
        move = backend.to_device if backend is not None else (lambda t: t.to(x.device, non_blocking=True))
        for a, b, factor in pairs:
            a_dev = move(a).to(x.dtype)
            b_dev = move(b).to(x.dtype)
            delta = F.linear(F.linear(x, a_dev), b_dev)
            del a_dev, b_dev
            if torch.is_grad_enabled():
                output = output + factor * delta.to(output.dtype)
            else:  # sampling (no grad): in place, so only the delta exists beside the layer's output
                output.add_(delta.to(output.dtype), alpha=factor)
            del delta
        return output

    return hook


@contextlib.contextmanager
def stacked(transformer: torch.nn.Module, adapter_set, backend=None) -> Iterator[None]:
    """The set's adapters added to the transformer's output for the block; nothing of the model is changed."""
    per_module: dict[str, list] = {}
    for adapter in adapter_set.adapters:
        for module, pair in load_adapter_tensors(adapter).items():
            per_module.setdefault(module, []).append(pair)
    handles = []
    try:
        for name, pairs in per_module.items():
            handles.append(transformer.get_submodule(name).register_forward_hook(_delta_hook(pairs, backend)))
        yield
    finally:
        for h in handles:
            h.remove()
        per_module.clear()


def render_validation_sets(cfg, job, vaes, transformer, step_dir: Path, **kwargs) -> list[Path]:
    """Every render of this validation: the plain one (`step_dir/NN.mp4`) when no adapter is configured, else one
    per adapter set (`step_dir/<label>/NN.mp4`, its sidecar naming the set, adapters, scales, guidance, steps)."""
    from lowvram.train.validation import render_validation

    if not job.adapter_sets:
        return render_validation(cfg, job, vaes, transformer, step_dir, **kwargs)
    written = []
    for s in job.adapter_sets:
        with stacked(transformer, s, kwargs.get("backend")):
            written += render_validation(cfg, job, vaes, transformer, Path(step_dir) / s.label, steps=s.steps,
                                         guidance=s.guidance, extra_sidecar=s.sidecar(), **kwargs)  # fmt: skip
    return written
