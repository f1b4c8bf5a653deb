"""LoRA on the LTX-2 transformer: peft injection on chosen modules, and export that ComfyUI and diffusers both load.

Exported files carry `lora_A` / `lora_B` only, with alpha folded into B (diffusers' LTX-2 loader rejects `.alpha`
keys), in bf16 unless asked otherwise (the official trainer's files are bf16); the adapter in memory keeps its
training dtype. It does not train, schedule, or checkpoint optimizer state (loop.py and checkpoint.py do).
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.errors import UsageError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Attention modules whose output only reaches the audio stream: left out when training video alone.
AUDIO_ONLY_MODULES = ("audio_attn1", "audio_attn2", "video_to_audio_attn")
LORA_FORMATS = ("comfy", "diffusers")
# dtype of the exported file: bf16 by default, as the official LTX-2 trainer saves its LoRA (ltx-trainer config
# `checkpoints.precision`, default "bfloat16", or "float32"): half the size of fp32.
LORA_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_LORA_DTYPE = "bf16"
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank, alpha (None = rank), dropout, target names/globs, whether audio-only modules,
    and how it is exported (key naming, file dtype)."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    include_audio: bool = True
    lora_format: str = "comfy"
    dtype: str = DEFAULT_LORA_DTYPE

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def as_spec(obj, **overrides) -> LoraSpec:
    """A LoraSpec from a LoraSpec, the config's lora section, or None (defaults); keywords override."""
    if obj is None:
        base = {}
    elif isinstance(obj, LoraSpec):
        base = dict(
            rank=obj.rank,
            alpha=obj.alpha,
            dropout=obj.dropout,
            targets=obj.targets,
            include_audio=obj.include_audio,
            lora_format=obj.lora_format,
            dtype=obj.dtype,
        )
    else:
        base = dict(rank=obj.rank, alpha=obj.alpha, dropout=obj.dropout, targets=tuple(obj.targets))
        if hasattr(obj, "include_audio"):
            base["include_audio"] = obj.include_audio
        if getattr(obj, "format", None) is not None:
            base["lora_format"] = obj.format
        if getattr(obj, "dtype", None) is not None:
            base["dtype"] = obj.dtype
    base.update(overrides)
    base["targets"] = tuple(base.get("targets", DEFAULT_TARGETS))
    return LoraSpec(**base)


def _matches(name: str, pattern: str) -> bool:
    # peft's rule (exact name or a dotted suffix) plus shell globs over the full module path.
    if name == pattern or name.endswith("." + pattern):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern)


def target_modules(transformer: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the Linear modules the spec selects; a target that selects nothing is a usage error."""
    linears = [n for n, m in transformer.named_modules() if _is_linear(m)]
    chosen: list[str] = []
    for pattern in spec.targets:
        hits = [n for n in linears if _matches(n, pattern)]
        if not hits:
            raise UsageError(
                f"LoRA target {pattern!r} matches no linear module of the transformer: use names like "
                f"'to_q' or globs like 'transformer_blocks.*.attn1.to_q'"
            )
        chosen.extend(h for h in hits if h not in chosen)
    if not spec.include_audio:
        chosen = [n for n in chosen if not any(f".{a}." in f".{n}." for a in AUDIO_ONLY_MODULES)]
    return chosen


def _is_linear(module: torch.nn.Module) -> bool:
    # Quantized layers (quanto, torchao, bitsandbytes) subclass nn.Linear, so peft can wrap them too.
    return isinstance(module, torch.nn.Linear)


def inject_lora(transformer: torch.nn.Module, spec=None, **overrides) -> list[str]:
    """Add a trainable LoRA adapter to the selected modules and freeze everything else. Returns the module names.

    Works on the meta device too (the planner measures the real model that way).
    """
    from peft import LoraConfig, inject_adapter_in_model

    spec = as_spec(spec, **overrides)
    names = target_modules(transformer, spec)
    export_names(names, spec.lora_format)  # a target the export could not name fails now, not after training
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        lora_dropout=spec.dropout,
        target_modules=names,
        init_lora_weights=True,  # B = 0: the adapted model starts exactly at the base model
    )
    on_meta = next(transformer.parameters()).is_meta
    # On meta, peft would otherwise allocate (and zero) every adapter in host RAM before moving it: ~0.9 GB, 30 s
    # for r=32 on the 19B model.
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    for name, p in transformer.named_parameters():
        p.requires_grad_(".lora_" in name)
    return names


def lora_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module path: peft LoRA layer} for every adapted module."""
    return {n: m for n, m in transformer.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Raw adapter weights `{module}.lora_A.weight` / `.lora_B.weight` (unscaled; for checkpoints and tests)."""
    out = {}
    for name, layer in lora_layers(transformer).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach()
    return out


def export_names(module_names: list[str], lora_format: str = "comfy") -> dict[str, str]:
    """{module path: exported key prefix} (keys are `{prefix}.lora_A.weight` / `.lora_B.weight`).

    "comfy": the official LTX-2 names (`diffusion_model.patchify_proj`, `diffusion_model.adaln_single.linear`, ...),
    taken from the checkpoint layout map, which is what ComfyUI and ltx-core look up; "diffusers": `transformer.` +
    the diffusers path. A module the official layout cannot name is a usage error (its weights would be skipped).
    """
    if lora_format not in LORA_FORMATS:
        raise UsageError(f"unknown LoRA format {lora_format!r}: use one of {', '.join(LORA_FORMATS)}")
    if lora_format == "diffusers":
        return {n: "transformer." + n for n in module_names}
    from lowvram.models.ltx2.layout import official_module_names

    official, unmapped = official_module_names("transformer", list(module_names))
    if unmapped:
        raise UsageError(
            f"LoRA target {unmapped[0]!r} ({len(unmapped)} module(s)) has no official LTX-2 name, so ComfyUI and "
            'ltx-core would skip it: leave it out of lora.targets or export with lora.format = "diffusers"'
        )
    return {n: "diffusion_model." + official[n].removeprefix("model.diffusion_model.") for n in module_names}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The exported file's dtype from its name ("bf16", "fp16", "fp32"); None is the default (bf16)."""
    if isinstance(name, torch.dtype):
        return name
    name = DEFAULT_LORA_DTYPE if name is None else name
    if name not in LORA_DTYPES:
        raise UsageError(f"unknown LoRA dtype {name!r}: use one of {', '.join(LORA_DTYPES)}")
    return LORA_DTYPES[name]


def exported_lora_tensors(
    transformer: torch.nn.Module, lora_format: str = "comfy", dtype: str | torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The export: alpha (peft's per-layer scaling) folded into B in float32, then cast to `dtype` (default bf16);
    keys in the official or diffusers naming. The adapter itself is not changed."""
    out_dtype = resolve_dtype(dtype)
    layers = lora_layers(transformer)
    if not layers:
        raise UsageError("the transformer has no LoRA adapter to export: inject_lora() first")
    prefix_of = export_names(list(layers), lora_format)
    out = {}
    for name, layer in layers.items():
        a = layer.lora_A[ADAPTER].weight.detach()
        b = layer.lora_B[ADAPTER].weight.detach().float() * layer.scaling[ADAPTER]
        out[f"{prefix_of[name]}.lora_A.weight"] = a.to("cpu", out_dtype).contiguous()
        out[f"{prefix_of[name]}.lora_B.weight"] = b.to("cpu", out_dtype).contiguous()
    return out


def export_lora(
    transformer: torch.nn.Module,
    path: str | Path,
    spec=None,
    *,
    lora_format: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the LoRA atomically as safetensors. `lora_format` / `dtype` default to the spec's (`format`, `dtype`),
    else "comfy" and bf16."""
    from lowvram.fsutil import save_safetensors_atomic

    fmt = lora_format or getattr(spec, "format", None) or getattr(spec, "lora_format", None) or "comfy"
    dtype = dtype if dtype is not None else getattr(spec, "dtype", None)
    tensors = exported_lora_tensors(transformer, fmt, dtype)
    rank = next(iter(lora_layers(transformer).values())).r[ADAPTER]
    metadata = {"lowvram_lora_format": fmt, "lowvram_rank": str(rank), "lowvram_alpha_folded_into_b": "true"}
    save_safetensors_atomic(tensors, path, metadata=metadata)
    return Path(path)


def count_lora_parameters(transformer: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" in n)
