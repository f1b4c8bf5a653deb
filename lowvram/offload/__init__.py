"""Offload strategies applied to modules from outside: the training loop never knows which one is active.

`apply_memory_plan` turns memory settings into strategies; each strategy also has its own plain entry. They move
tensors only through the device seam (`lowvram.device`), so they run the same on cuda, ROCm, cpu and the simulated
accelerator. Choosing the settings is the planner's job (lowvram.plan), not this package's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowvram.device import Backend
from lowvram.errors import UsageError
from lowvram.offload.activations import ActivationOffload, apply_activation_offload
from lowvram.offload.block_swap import BlockSwap, apply_block_swap, choose_swapped_blocks
from lowvram.offload.group import GroupOffload, apply_group_offload, group_offload_refusal
from lowvram.offload.phases import Phase, PhaseResult, offload_during_startup
from lowvram.offload.streaming import WeightStreaming, apply_weight_streaming

__all__ = [
    "ActivationOffload",
    "AppliedMemoryPlan",
    "BlockSwap",
    "GroupOffload",
    "Phase",
    "PhaseResult",
    "WeightStreaming",
    "apply_activation_offload",
    "apply_block_swap",
    "apply_group_offload",
    "apply_memory_plan",
    "apply_weight_streaming",
    "choose_swapped_blocks",
    "group_offload_refusal",
    "memory_plan_refusal",
    "offload_during_startup",
]


@dataclass
class AppliedMemoryPlan:
    """What `apply_memory_plan` did: the strategy objects and the bytes they moved off the device."""

    strategies: list[Any] = field(default_factory=list)
    gradient_checkpointing: bool = False

    @property
    def offloaded_bytes(self) -> int:
        return sum(getattr(s, "offloaded_bytes", 0) for s in self.strategies)

    @property
    def working_set_bytes(self) -> int:
        return sum(getattr(s, "working_set_bytes", 0) for s in self.strategies)

    def describe(self) -> str:
        names = [type(s).__name__ for s in self.strategies] or ["no offload"]
        ckpt = "checkpointing on" if self.gradient_checkpointing else "checkpointing off"
        return f"{', '.join(names)}; {ckpt}"


BLOCK_LINEARS = ("transformer_blocks.*",)


def _streaming_args(ramtorch: Any) -> dict[str, Any] | None:
    """`ramtorch` as the config holds it: true / a share of the blocks' Linears / comma-separated module globs."""
    if ramtorch is None or ramtorch is False:
        return None
    if ramtorch is True:
        return {"share": 1.0, "patterns": BLOCK_LINEARS}
    if isinstance(ramtorch, (int, float)):
        return None if ramtorch <= 0 else {"share": float(ramtorch), "patterns": BLOCK_LINEARS}
    return {"patterns": [p.strip() for p in str(ramtorch).split(",") if p.strip()]}


def memory_plan_refusal(settings: Any, *, training: bool = True) -> str | None:
    """One line saying why these memory settings cannot run, or None. Checked before anything is touched."""
    streaming = _streaming_args(getattr(settings, "ramtorch", None)) is not None
    swap = (getattr(settings, "blocks_to_swap", None) or 0) > 0
    group = bool(getattr(settings, "group_offload", None))
    ckpt = bool(getattr(settings, "gradient_checkpointing", None)) or bool(
        getattr(settings, "activation_offload", None)
    )
    chosen = [name for name, on in (("ramtorch", streaming), ("blocks_to_swap", swap), ("group_offload", group)) if on]
    if len(chosen) > 1:
        return f"{' and '.join(chosen)} both move the transformer's weights: choose one"
    if swap and training and not ckpt:
        return "block swap needs gradient checkpointing in training: enable memory.gradient_checkpointing"
    on_disk = getattr(settings, "blocks_on_disk", None) or 0
    if on_disk > (getattr(settings, "blocks_to_swap", None) or 0):
        return (
            f"memory.blocks_on_disk={on_disk} is more than memory.blocks_to_swap="
            f"{getattr(settings, 'blocks_to_swap', None) or 0}: only swapped blocks can live on disk"
        )
    if group:
        return group_offload_refusal(
            training=training, gradient_checkpointing=ckpt, use_stream=bool(settings.group_offload_use_stream)
        )
    return None


def apply_memory_plan(
    transformer: nn.Module,
    settings: Any = None,
    backend: Backend | None = None,
    *,
    memory: Any = None,
    plan: Any = None,
    training: bool = True,
    place: bool = True,
    prewritten: Any = None,
) -> AppliedMemoryPlan:
    """Apply the transformer's memory settings (fields of `lowvram.config.MemorySection`, as `settings` or `memory`)
    with `backend`, then place what stays resident on the device (`place=False` leaves that to the caller).

    Call after quantization and LoRA injection. Refusals raise `UsageError` with one line before any module is
    changed. `plan` (the planner's result) is accepted for the loop's call and not needed: the settings carry the
    decisions. `prewritten`: disk-tier blocks the loader already wrote (offload/disk_tier.py `DiskTierLoader`).
    `ramtorch_text_encoder` is for the text encoder: call `apply_weight_streaming(text_encoder, backend)`.
    """
    settings = settings if settings is not None else memory
    if settings is None or backend is None:
        raise TypeError("apply_memory_plan needs the memory settings and a device backend")
    reason = memory_plan_refusal(settings, training=training)
    if reason:
        raise UsageError(reason)
    applied = AppliedMemoryPlan()
    if getattr(settings, "activation_offload", None):
        applied.strategies.append(apply_activation_offload(transformer, backend))
        applied.gradient_checkpointing = True
    elif getattr(settings, "gradient_checkpointing", None):
        transformer.enable_gradient_checkpointing()
        applied.gradient_checkpointing = True
    stream_args = _streaming_args(getattr(settings, "ramtorch", None))
    if stream_args is not None:
        applied.strategies.append(apply_weight_streaming(transformer, backend, **stream_args))
    if (getattr(settings, "blocks_to_swap", None) or 0) > 0:
        tier = getattr(settings, "swap_tier", None) or "pinned"
        on_disk = getattr(settings, "blocks_on_disk", None) or 0
        if tier == "pinned" and not on_disk:
            applied.strategies.append(apply_block_swap(transformer, backend, blocks_to_swap=settings.blocks_to_swap))
        else:
            from lowvram.offload.disk_tier import apply_staged_block_swap

            applied.strategies.append(
                apply_staged_block_swap(
                    transformer,
                    backend,
                    blocks_to_swap=settings.blocks_to_swap,
                    blocks_on_disk=on_disk,
                    tier=tier,
                    disk_dir=getattr(settings, "disk_tier_dir", None),
                    prewritten=prewritten,
                )
            )
    if getattr(settings, "group_offload", None):
        applied.strategies.append(
            apply_group_offload(
                transformer,
                backend,
                offload_type=settings.group_offload_type,
                blocks_per_group=settings.group_offload_blocks_per_group,
                use_stream=settings.group_offload_use_stream,
                gradient_checkpointing=applied.gradient_checkpointing,
                training=training,
            )
        )
    if place:
        backend.place_module(transformer)
    return applied
