"""Optimizers and learning-rate schedules for the LoRA parameters: AdamW, bf16-state AdamW, 8-bit AdamW.

Plain functions that turn the `[optim]` config into torch objects; they know nothing about models or devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lowvram.errors import LowvramError, UsageError

OPTIMIZERS = ("adamw", "adamw_bf16", "adamw8bit")
SCHEDULES = ("constant", "linear", "cosine")


# --------------------------------------------------------------------------------------------------------------------
# bf16 AdamW


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round float32 `x` to bf16 up or down with probability given by the distance (unbiased in expectation).

    Adding uniform noise to the 16 bits bf16 drops, then truncating, is the standard trick; plain round-to-nearest
    loses small Adam updates entirely once they fall below half a bf16 ulp of the weight.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the low 16 bits (0xFFFF0000 as int32)
    return rounded.view(torch.float32).to(torch.bfloat16)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose moment estimates live in bf16 (half of fp32 AdamW's 8 bytes/param) with stochastic rounding.

    The update itself is computed in float32. Parameters stored in bf16 are also written back with stochastic
    rounding. Rounding noise is seeded from (seed, step, parameter index), so a resumed run is bit-identical
    without storing generator state.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded states to their parameter's dtype (the fp32 LoRA): a resumed run would hold fp32
        # moments, twice the memory this optimizer exists to save. They were bf16 values, so this cast is exact.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"].item())
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1 = 1 - beta1**step
                bc2 = 1 - beta2**step
                w = p.float()
                w.mul_(1 - group["lr"] * group["weight_decay"])
                w.addcdiv_(m, v.div(bc2).sqrt_().add_(group["eps"]), value=-group["lr"] / bc1)
                gen = torch.Generator(device=p.device).manual_seed(
                    (self.seed * 1_000_003 + step * 10_007 + index) % (2**63)
                )
                state["exp_avg"].copy_(stochastic_round_to_bf16(m, gen))
                state["exp_avg_sq"].copy_(stochastic_round_to_bf16(v, gen))
                if p.dtype == torch.bfloat16:
                    p.copy_(stochastic_round_to_bf16(w, gen))
                else:
                    p.copy_(w)
        return loss


# --------------------------------------------------------------------------------------------------------------------
# Builders


def build_optimizer(
    params: Iterable[torch.nn.Parameter], optim, *, bitsandbytes_supported: bool = True, seed: int = 0
) -> torch.optim.Optimizer:
    """The `[optim]` section -> an optimizer over `params` (the trainable LoRA parameters only)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise LowvramError("no trainable parameters: the LoRA targets matched no module (check lora.targets)")
    kwargs = dict(
        lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
    )
    if optim.optimizer == "adamw":
        # foreach=False: the per-tensor loop gives the same bits on every backend, which the resume test relies on.
        return torch.optim.AdamW(params, foreach=False, **kwargs)
    if optim.optimizer == "adamw_bf16":
        return AdamWBF16(params, seed=seed, **kwargs)
    if optim.optimizer == "adamw8bit":
        if not bitsandbytes_supported:
            raise LowvramError(
                "optim.optimizer 'adamw8bit' needs bitsandbytes kernels this machine's profile lacks: "
                "use 'adamw_bf16' (half the state memory of adamw)"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LowvramError("optim.optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise UsageError(f"unknown optimizer '{optim.optimizer}'; valid: {', '.join(OPTIMIZERS)}")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UsageError(f"unknown lr_scheduler '{schedule}'; valid: {', '.join(SCHEDULES)}")


class WarmupSchedule:
    """`lr_multiplier` as a picklable object, so LambdaLR's state_dict round-trips it."""

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str):
        lr_multiplier(0, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)  # validate early
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, schedule=self.schedule)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int):
    """A LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(optim.lr_warmup_steps, total_steps, optim.lr_scheduler)
    )
