"""Recovery from a device out-of-memory in training: keep the last completed step, re-plan with less VRAM, resume.

The next memory settings come from the real planner, for the training phase alone (the caches are built by then);
it never returns the failed plan again. It does not recover from out-of-memory outside a training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError
from lowvram.train.batches import BatchSource
from lowvram.train.loop import MemoryDecision, StepOutOfMemory, StepResult, _say, describe_memory, fit

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


def fit_with_recovery(
    decision: MemoryDecision,
    transformer: torch.nn.Module,
    batches: BatchSource,
    *,
    reload: Callable[[], torch.nn.Module],
    run_dir: Path,
    backend,
    console=None,
    auto_recover: bool = True,
    validate: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    on_new_transformer: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, list[StepResult]]:
    """`fit`, and when the device runs out of memory: keep the last completed step, re-plan with less VRAM, load a
    fresh transformer under the new settings and resume there. Returns the transformer that finished and its steps.
    """
    import gc

    from lowvram.config import apply_overrides

    while True:
        try:
            steps = fit(
                decision.cfg,
                transformer,
                batches,
                run_dir=run_dir,
                backend=backend,
                decision=decision,
                console=console,
                validate=validate,
                after_step=after_step,
            )
            return transformer, steps
        except StepOutOfMemory as oom:
            failed_step, intact = oom.step, oom.state_intact
        # Outside the except clause: the traceback, and with it the failed attempt's activations, are released.
        where = f"out of memory in step {failed_step + 1}"
        if not auto_recover:
            raise LowvramError(
                f"{where}: continue with --resume latest and less memory (a smaller train.batch_size or "
                f"memory.blocks_to_swap), or let --auto-recover re-plan"
            )
        smaller = smaller_memory_decision(decision, len(transformer.transformer_blocks))
        if smaller is None:
            raise LowvramError(
                f"{where} and no memory setting needs less VRAM: lower train.batch_size or data.resolution"
            )
        kept = f"step {failed_step} is kept" if intact else "the failed update is dropped"
        _say(
            console,
            f"[yellow]{where}: {kept}; re-planned with less VRAM ({describe_memory(smaller.cfg)}); "
            f"resuming from the newest checkpoint[/yellow]",
        )
        # Free the failed attempt (its strategies hold device memory) before the new one loads.
        del transformer
        gc.collect()
        backend.empty_cache()
        decision = replace(smaller, cfg=apply_overrides(smaller.cfg, {"checkpoint.resume": "latest"}))
        transformer = reload()
        if on_new_transformer is not None:
            on_new_transformer(transformer)




def smaller_memory_decision(decision: MemoryDecision, num_blocks: int) -> MemoryDecision | None:
    """The next memory settings that need less VRAM than `decision`'s, or None when there are none.

    With a profile the planner re-plans for less VRAM (`plan_with_less_vram`); without one, a fixed ladder:
    gradient checkpointing, then block swap of 1/4, 1/2, 3/4, all but one of the blocks.
    """

    cfg, memory = decision.cfg, decision.cfg.memory
    if decision.profile is not None:
        return plan_with_less_vram(decision)
    if memory.ramtorch or memory.group_offload:
        return None  # streaming and group offload already keep the weights off the device
    if memory.gradient_checkpointing is False and not memory.activation_offload:
        update = {"gradient_checkpointing": True}
    else:
        current = memory.blocks_to_swap or 0
        ladder = sorted({max(1, num_blocks // 4), max(1, num_blocks // 2), max(1, 3 * num_blocks // 4), num_blocks - 1})
        bigger = [k for k in ladder if current < k < num_blocks]
        if not bigger:
            return None
        update = {"blocks_to_swap": bigger[0], "gradient_checkpointing": True}
    return replace(decision, cfg=cfg.model_copy(update={"memory": memory.model_copy(update=update)}))
