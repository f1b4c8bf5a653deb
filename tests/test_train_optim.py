"""Optimizers and LR schedules for the LoRA parameters."""

import math

import pytest
import torch

from lowvram.config import OptimSection
from lowvram.errors import LowvramError
from lowvram.train.optim import (
    AdamWBF16,
    build_lr_scheduler,
    build_optimizer,
    lr_multiplier,
    stochastic_round_to_bf16,
)


def test_warmup_is_linear_then_constant():
    m = [lr_multiplier(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(6)]
    assert m == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_and_cosine_decay_to_zero_at_the_last_step():
    assert lr_multiplier(2, warmup_steps=2, total_steps=10, schedule="linear") == 1.0
    assert lr_multiplier(6, warmup_steps=2, total_steps=10, schedule="linear") == pytest.approx(0.5)
    assert lr_multiplier(10, warmup_steps=2, total_steps=10, schedule="linear") == 0.0
    assert lr_multiplier(6, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(4, warmup_steps=2, total_steps=10, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25))
    )


def test_scheduler_sets_the_optimizer_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimSection(learning_rate=1e-3, lr_warmup_steps=2, lr_scheduler="linear")
    opt = build_optimizer([p], cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # decays to 0 at step total_steps


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbouring_bf16_values():
    x = torch.full((20000,), 1.0 + 2**-10)  # between bf16 neighbours 1.0 and 1.0078125
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-4)
    exact = torch.tensor([1.5, -2.0, 0.0])
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator()).float(), exact)


def test_adamw_bf16_matches_fp32_adamw_closely_and_keeps_bf16_state():
    torch.manual_seed(0)
    w0 = torch.randn(64)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    ours = AdamWBF16([b], lr=1e-2, weight_decay=0.1)
    for i in range(5):
        g = torch.randn(64, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert ours.state[b]["exp_avg"].dtype == torch.bfloat16
    assert torch.allclose(a, b, atol=2e-3)
    assert not torch.equal(a.detach(), w0)


def test_adamw_bf16_is_deterministic_per_seed():
    def run():
        p = torch.nn.Parameter(torch.ones(32, dtype=torch.bfloat16))
        opt = AdamWBF16([p], lr=1e-3, seed=5)
        for _ in range(3):
            p.grad = torch.full((32,), 0.5, dtype=torch.bfloat16)
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(), run())


def test_adamw8bit_refused_where_the_profile_lacks_bitsandbytes():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(LowvramError, match="adamw_bf16"):
        build_optimizer([p], OptimSection(optimizer="adamw8bit"), bitsandbytes_supported=False)


def test_adamw8bit_steps_with_8bit_state():
    p = torch.nn.Parameter(torch.randn(8192))
    opt = build_optimizer([p], OptimSection(optimizer="adamw8bit", learning_rate=1e-2))
    before = p.detach().clone()
    p.grad = torch.randn(8192)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert not torch.equal(before, p.detach())


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(LowvramError, match="lora.targets"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], OptimSection())
