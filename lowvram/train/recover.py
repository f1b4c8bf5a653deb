"""Recovery from a device out-of-memory in training: keep the last completed step, re-plan with less VRAM, resume.

The next memory settings come from the `replan` function the run assembly hands in (the real planner for the
training phase alone, `lowvram.plan.replan.plan_with_less_vram`: the caches are built by then; it never returns the
failed plan again), or without one from a fixed ladder. This module imports no planner. It does not recover from
out-of-memory outside a training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from lowvram.errors import LowvramError
from lowvram.train.batches import BatchSource
from lowvram.train.loop import MemoryDecision, StepOutOfMemory, StepResult, _say, describe_memory, fit

# The planner's step down (a MemoryDecision in, a smaller one or None out), given by the run assembly.
Replan = Callable[[MemoryDecision], MemoryDecision | None]

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
    replan: Replan | None = None,
) -> tuple[torch.nn.Module, list[StepResult]]:
    """`fit`, and when the device runs out of memory: keep the last completed step, re-plan with less VRAM, load a
    fresh transformer under the new settings and resume there. Returns the transformer that finished and its steps.

    `replan` steps a decision that has a profile down (the planner); without it, or without a profile, the ladder.
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
        smaller = smaller_memory_decision(decision, len(transformer.transformer_blocks), replan)
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




def smaller_memory_decision(
    decision: MemoryDecision, num_blocks: int, replan: Replan | None = None
) -> MemoryDecision | None:
    """The next memory settings that need less VRAM than `decision`'s, or None when there are none.

    With a profile and a `replan` the planner re-plans for less VRAM; otherwise a fixed ladder: gradient
    checkpointing, then block swap of 1/4, 1/2, 3/4, all but one of the blocks.
    """

    cfg, memory = decision.cfg, decision.cfg.memory
    if decision.profile is not None and replan is not None:
        return replan(decision)
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
