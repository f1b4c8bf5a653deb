"""The planner's step down after an out-of-memory: the same run planned for less device memory.

Recovery (`train/recover.py`) receives this as a function from the run assembly; it does not import the planner.
A decision is any dataclass with `cfg`, `profile` and `predicted_vram_bytes` (the trainer's `MemoryDecision`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

# A re-plan must predict at most this share of the failed plan's training VRAM: less by a margin, not by a byte
# (the failed prediction was wrong by an unknown amount), yet in steps small enough not to skip the fastest plan
# that fits; a plan that still runs out steps down again. The tiny model's whole ladder spans 12% (no offload ->
# stream 50% -> 75% of block Linears), so a 15% step would find nothing there.
STEP_DOWN = 0.95
# Transformer memory settings a recovery may change: the planner chooses them afresh for the smaller budget.
RECOVERY_KEYS = ("ramtorch", "blocks_to_swap", "group_offload", "gradient_checkpointing", "activation_offload")


def plan_with_less_vram(decision: Any) -> Any | None:
    """A `MemoryDecision` whose training phase the planner predicts at <= STEP_DOWN x `decision`'s, or None.

    `decision` must carry the profile and the predicted training VRAM of the plan that ran out (without them there
    is no plan to step down from). The planner sees the same machine with less device memory: its safety margin and
    host RAM are unchanged, so a plan that would exhaust host RAM is not proposed.
    """
    from lowvram.config import apply_overrides
    from lowvram.plan import plan_run

    profile, failed = decision.profile, decision.predicted_vram_bytes
    if profile is None or not failed:
        return None
    cfg = decision.cfg
    margin = cfg.memory.vram_safety_margin
    target_bytes = int(failed * STEP_DOWN)
    smaller = profile.model_copy(update={"vram_bytes": profile.reserve_bytes + int(target_bytes / (1 - margin))})
    open_cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update=dict.fromkeys(RECOVERY_KEYS))})
    plan = plan_run(open_cfg, smaller, choose=False)
    train = plan.phases.get("train")
    # `plan.fits` also asks the caching phases to fit the smaller device; they ran already, so only training counts.
    if train is None or train.vram_peak_bytes - train.vram.get("reserve", 0) > plan.vram_usable_bytes:
        return None
    if train.vram_peak_bytes > target_bytes:
        return None
    chosen = {k: v for k, v in plan.settings.items() if k.startswith("memory.") and k != "memory.profile"}
    return replace(
        decision,
        cfg=apply_overrides(open_cfg, chosen),
        fits=True,
        plan=plan,
        predicted_vram_bytes=train.vram_peak_bytes,
        predicted_ram_bytes=train.ram_peak_bytes,
    )
