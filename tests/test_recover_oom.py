"""Out-of-memory recovery with the real planner on the simulated device: the device shrinks mid-run, the run keeps
the last completed step, the planner picks a plan needing less VRAM, training resumes there and loses no step.

(tests/test_train_recover.py covers the loop's side with the no-profile ladder and a fake planner.)
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from lowvram.config import RunConfig
from lowvram.device_sim import SimBackend
from lowvram.plan.replan import STEP_DOWN, plan_with_less_vram
from lowvram.profiles import HardwareProfile, Supports
from lowvram.train.batches import CachedBatches, CachedSample
from lowvram.train.checkpoint import list_checkpoints, verify_checkpoint
from lowvram.train.loop import fit, read_metrics
from lowvram.train.recover import fit_with_recovery
from lowvram.train.run import decide_memory

STEPS = 6
DROP_AFTER_STEP = 3


def plan_outside_the_simulated_device(decision):
    """The recovery's re-plan. Planning is host work: its fake-tensor measurement must not be charged to the
    simulated device it plans for (a real GPU has no dispatch mode to step outside of). The wiring loop -> recover ->
    planner stays real."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return plan_with_less_vram(decision)


def sim_profile() -> HardwareProfile:
    """A GPU far bigger than the tiny model needs, no driver reserve: the first plan keeps everything resident."""
    return HardwareProfile(
        name="sim", vendor="nvidia", vram_bytes=64 * 2**20, reserve_bytes=0, bf16_tflops=100.0,
        memory_bandwidth_gbps=1000.0, h2d_pinned_gbps=24.0, h2d_pageable_gbps=10.0, host_ram_bytes=64 * 2**30,
        supports=Supports(bf16=True, fp8=False, bitsandbytes=False, flash_attention=True, streams=True),
    )  # fmt: skip


def user_config(run_dir) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny", "precision": "fp32"},
            "data": {"resolution": "64x64", "frames": 17, "max_text_tokens": 8},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 1e-3, "lr_warmup_steps": 1},
            "train": {"batch_size": 2, "max_train_steps": STEPS, "seed": 3, "mixed_precision": "fp32"},
            # No periodic checkpoint: the step that survives is the one kept at the out-of-memory.
            "checkpoint": {"every_n_steps": 0, "keep_last": 2},
            # Stated off: the first plan keeps every activation (the recovery may turn checkpointing on).
            "memory": {"gradient_checkpointing": False},
            "output": {"output_dir": str(run_dir)},
        }
    )


def tiny_transformer() -> torch.nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_component("transformer", tiny_configs()["transformer"]).requires_grad_(False)


def batches() -> CachedBatches:
    """Samples of the shapes the config describes (64x64, 17 frames -> 3x2x2 latent tokens; 8 text tokens)."""
    config = tiny_transformer().config
    g = torch.Generator().manual_seed(1)
    samples = [
        CachedSample(
            video=torch.randn(12, config.in_channels, generator=g),
            audio=torch.randn(5, config.audio_in_channels, generator=g),
            text_video=torch.randn(8, 16, generator=g),
            text_audio=torch.randn(8, 16, generator=g),
            text_mask=torch.ones(8, dtype=torch.long),
            latent_frames=3,
            latent_height=2,
            latent_width=2,
        )
        for _ in range(4)
    ]
    return CachedBatches(samples, 2, seed=5)


def with_output(decision, run_dir):
    cfg = decision.cfg
    return replace(decision, cfg=cfg.model_copy(update={"output": cfg.output.model_copy(
        update={"output_dir": str(run_dir)})}))  # fmt: skip


def train_on_sim(decision, run_dir, sim=None, steps: int = STEPS) -> tuple[torch.nn.Module, int]:
    """A plain `fit` of `decision` on a fresh simulated device; returns the model and the device's peak bytes."""
    sim = sim or SimBackend()
    decision = with_output(decision, run_dir)
    cfg = decision.cfg.model_copy(update={"train": decision.cfg.train.model_copy(update={"max_train_steps": steps})})
    model = tiny_transformer()
    with sim.session():
        fit(cfg, model, batches(), run_dir=run_dir, backend=sim, decision=replace(decision, cfg=cfg))
    return model, sim.stats().peak_bytes


def lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def first_plan(tmp_path_factory):
    """The planner's plan for the sim profile (everything resident) and its measured peak on the simulated device."""
    run_dir = tmp_path_factory.mktemp("first")
    decision = decide_memory(user_config(run_dir), sim_profile(), force=False)
    return decision


def test_the_step_down_needs_less_vram_predicted_and_measured(first_plan, tmp_path):
    down = plan_with_less_vram(first_plan)
    assert down is not None and down.cfg.memory != first_plan.cfg.memory
    assert down.predicted_vram_bytes <= STEP_DOWN * first_plan.predicted_vram_bytes
    # The simulated device agrees with the planner's direction: the new plan really uses less.
    assert train_on_sim(down, tmp_path / "down", steps=2)[1] < train_on_sim(first_plan, tmp_path / "a", steps=2)[1]
    # And it steps down again from there, each time to less, until nothing smaller exists.
    ladder = [first_plan.predicted_vram_bytes, down.predicted_vram_bytes]
    while (down := plan_with_less_vram(down)) is not None:
        ladder.append(down.predicted_vram_bytes)
    assert ladder == sorted(ladder, reverse=True) and len(set(ladder)) == len(ladder)


def test_oom_mid_run_replans_with_the_planner_and_loses_no_step(first_plan, tmp_path):
    from rich.console import Console

    down = plan_with_less_vram(first_plan)
    _, down_peak = train_on_sim(down, tmp_path / "down", steps=2)
    reference, first_peak = train_on_sim(first_plan, tmp_path / "ref")
    budget = (down_peak + first_peak) // 2  # the old plan no longer fits, the step-down does
    run_dir = tmp_path / "run"
    decision = with_output(first_plan, run_dir)
    sim = SimBackend()

    def shrink_device(step: int) -> None:
        if step == DROP_AFTER_STEP:
            sim.set_budget(budget)  # as if another process took device memory
            sim.reset_counters()

    log = io.StringIO()
    with sim.session():
        model, _ = fit_with_recovery(
            decision, tiny_transformer(), batches(), reload=tiny_transformer, run_dir=run_dir, backend=sim,
            after_step=shrink_device, console=Console(file=log, width=300), replan=plan_outside_the_simulated_device,
        )  # fmt: skip
    out = log.getvalue()
    kept = f"out of memory in step {DROP_AFTER_STEP + 1}: step {DROP_AFTER_STEP} is kept; re-planned with less VRAM"
    assert kept in out
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{DROP_AFTER_STEP:08d}'}" in out
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))  # none lost, none repeated
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir))
    assert sim.stats().peak_bytes <= budget  # after the drop the new plan ran inside the smaller device
    # Same LoRA as the run that never ran out: the new plan changes where weights live, not the arithmetic.
    for name, value in lora(reference).items():
        torch.testing.assert_close(lora(model)[name], value)


def test_without_a_plan_to_step_down_from_there_is_no_step_down(first_plan):
    assert plan_with_less_vram(replace(first_plan, profile=None)) is None  # the CPU demo: no profile, no plan
    assert plan_with_less_vram(replace(first_plan, predicted_vram_bytes=None)) is None
