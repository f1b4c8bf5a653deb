"""What training over several GPUs (FSDP2 under torchrun) supports: the facts both the planner (`plan --gpus N`)
and the trainer (`train --nproc N`) check before any weight loads.

It lives below both: `lowvram.plan` and `lowvram.train.distributed` import it; it imports neither.
"""

from __future__ import annotations

from lowvram.errors import UsageError

# Measured on the tiny model, 2 gloo ranks, torch 2.13: torchao int8/fp8 fail inside fully_shard (their tensor
# subclasses lack aten.split / new_zeros), bitsandbytes nf4 fails ("quant_state is required"), and quanto int8
# shards but comes back as plain float shards: it trains with full-precision memory while claiming int8.
_QUANT_REFUSAL = (
    "model.precision {p} cannot be sharded by FSDP2 (torchao and bitsandbytes weights fail to shard, quanto's are "
    "silently dequantized): use model.precision bf16 with --nproc, whose sharding divides the weights by the GPU count"
)


def check_distributed_supported(cfg, nproc: int) -> None:
    """Refuse, in one line, what does not run under FSDP2 over `nproc` processes (GPUs). Call before weights load.

    Used by `lowvram train --nproc N` (and under torchrun) and by `lowvram plan --gpus N`.
    """
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give 1 or more processes")
    if nproc == 1:
        return
    many = f"{nproc} GPUs (--nproc/--gpus {nproc})"
    if cfg.scheduled_sampling.enabled:
        # Every rank would roll the whole batch out (the rollout runs before the rows are split).
        raise UsageError(f"scheduled_sampling.enabled = true does not run on {many}: train it on one GPU")
    if cfg.model.precision not in ("bf16", "fp32"):
        raise UsageError(_QUANT_REFUSAL.format(p=cfg.model.precision))
    m = cfg.memory
    moved = [
        name
        for name, on in (
            ("blocks_to_swap", (m.blocks_to_swap or 0) > 0),
            ("ramtorch", bool(m.ramtorch)),
            ("group_offload", bool(m.group_offload)),
        )
        if on
    ]
    if moved:
        raise UsageError(
            f"memory.{moved[0]} moves the weights FSDP2 shards: leave it unset with {many} "
            f"(each GPU then holds 1/{nproc} of the base plus the blocks being computed)"
        )
    if cfg.optim.optimizer != "adamw":
        # Both keep per-parameter state in layouts that do not understand sharded (DTensor) parameters.
        raise UsageError(
            f"optim.optimizer '{cfg.optim.optimizer}' does not run on FSDP2's sharded LoRA: use 'adamw' "
            f"with {many} (its state is sharded too, 1/{nproc} per GPU)"
        )
    if cfg.optim.max_grad_norm <= 0:
        raise UsageError(f"optim.max_grad_norm must be > 0 with {many} (the global norm is taken while clipping)")
    if cfg.train.tread_routes:
        raise UsageError(f"TREAD routes are not supported with {many}: remove train.tread_routes")
    if cfg.validation.enabled:
        raise UsageError(
            f"validation clips are not rendered with {many}: set validation.enabled = false and "
            f"render from the exported LoRA"
        )
    if cfg.train.batch_size < nproc:
        raise UsageError(
            f"train.batch_size {cfg.train.batch_size} is smaller than {many}: each GPU trains its "
            f"share of a batch, so use a batch of at least {nproc}"
        )
