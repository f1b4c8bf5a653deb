"""Out of memory mid-run: the last completed step is kept, the memory settings are re-planned, training resumes."""

import pytest
import torch
from test_train_loop import tiny_samples, tiny_transformer  # tests/ is on sys.path (rootdir conftest)

from lowvram.config import RunConfig
from lowvram.device_sim import SimBackend
from lowvram.errors import LowvramError
from lowvram.train.batches import CachedBatches
from lowvram.train.loop import MemoryDecision, fit, read_metrics
from lowvram.train.recover import fit_with_recovery, smaller_memory_decision

STEPS = 5


def config(run_dir, **memory) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 1e-3},
            "train": {"batch_size": 2, "max_train_steps": STEPS, "seed": 0, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 0},
            "memory": memory,
            "output": {"output_dir": str(run_dir)},
        }
    )


def batches():
    return CachedBatches(tiny_samples(frames=3, h=4, w=4), 2, seed=0)


def peak_bytes(tmp_path, **memory) -> int:
    sim = SimBackend()
    cfg = config(tmp_path, **memory)
    with sim.session():
        fit(
            cfg,
            tiny_transformer(lora=False),
            batches(),
            run_dir=tmp_path,
            backend=sim,
            decision=MemoryDecision(cfg=cfg, fits=True),
        )
    return sim.stats().peak_bytes


def lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_out_of_memory_mid_run_replans_and_resumes_from_the_last_completed_step(tmp_path):
    import io

    from rich.console import Console

    without = peak_bytes(tmp_path / "calib0", gradient_checkpointing=False)
    with_ckpt = peak_bytes(tmp_path / "calib1", gradient_checkpointing=True)
    assert with_ckpt < without  # the rung recovery will take really needs less memory

    reference = tiny_transformer(lora=False)
    cfg = config(tmp_path / "ref", gradient_checkpointing=False)
    fit(cfg, reference, batches(), run_dir=tmp_path / "ref", decision=MemoryDecision(cfg=cfg, fits=True))

    sim = SimBackend()
    cfg = config(tmp_path / "run", gradient_checkpointing=False)
    lowered = (without + with_ckpt) // 2

    def shrink_device(step: int) -> None:
        if step == 2:
            sim.set_budget(lowered)  # as if another process took memory: step 3 no longer fits

    with sim.session():
        model, _ = fit_with_recovery(
            MemoryDecision(cfg=cfg, fits=True),
            tiny_transformer(lora=False),
            batches(),
            reload=lambda: tiny_transformer(lora=False),
            run_dir=tmp_path / "run",
            backend=sim,
            after_step=shrink_device,
            console=Console(file=(log := io.StringIO()), width=200),
        )
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, STEPS + 1))
    assert model.transformer_blocks[0].attn1.to_q.base_layer.weight is not None
    # The recovered run trained exactly the steps an uninterrupted run does (checkpointing is exact in fp32).
    for name, value in lora(reference).items():
        torch.testing.assert_close(lora(model)[name], value)
    out = log.getvalue()
    assert "out of memory in step 3: step 2 is kept; re-planned with less VRAM (checkpointing)" in out
    assert "resumed from" in out and "step-00000002" in out


def test_without_auto_recover_the_run_stops_with_one_line(tmp_path):
    sim = SimBackend()
    cfg = config(tmp_path)
    with sim.session(), pytest.raises(LowvramError, match="out of memory in step 2: continue with --resume latest"):
        fit_with_recovery(
            MemoryDecision(cfg=cfg, fits=True),
            tiny_transformer(lora=False),
            batches(),
            reload=lambda: tiny_transformer(lora=False),
            run_dir=tmp_path,
            backend=sim,
            auto_recover=False,
            # Room for what is alive now, not for step 2's activations.
            after_step=lambda step: sim.set_budget(sim.stats().live_bytes + 50_000),
        )


def test_the_ladder_without_a_profile_ends_when_nothing_needs_less():
    cfg = config("x", gradient_checkpointing=False)
    d = MemoryDecision(cfg=cfg, fits=True)
    steps = []
    while (d := smaller_memory_decision(d, num_blocks=8)) is not None:
        steps.append((d.cfg.memory.gradient_checkpointing, d.cfg.memory.blocks_to_swap))
    assert steps == [(True, None), (True, 2), (True, 4), (True, 6), (True, 7)]


def test_with_a_profile_the_planner_replans_for_less_vram_than_it_predicted(monkeypatch):
    import lowvram.plan
    from lowvram.plan.budget import PhaseBudget
    from lowvram.profiles import load_profile

    seen = {}

    class Plan:
        fits = True
        settings = {"memory.blocks_to_swap": 20, "memory.gradient_checkpointing": True}
        phases = {"train": PhaseBudget("train", {"weights": 15 * 2**30}, {"host": 40 * 2**30})}
        vram_usable_bytes = 18 * 2**30

    def fake_plan_run(cfg, profile, *, choose=True, **kw):
        seen.update(cfg=cfg, profile=profile, choose=choose)
        return Plan()

    monkeypatch.setattr(lowvram.plan, "plan_run", fake_plan_run)
    profile = load_profile("3090")
    cfg = config("x", blocks_to_swap=4, gradient_checkpointing=True)
    decision = MemoryDecision(cfg=cfg, fits=True, predicted_vram_bytes=20 * 2**30, profile=profile)
    from lowvram.plan.replan import plan_with_less_vram

    smaller = smaller_memory_decision(decision, num_blocks=48, replan=plan_with_less_vram)
    # The planner sees the same machine with less device memory: 95% of what the failed plan predicted, plus the
    # safety margin and the reserve it keeps back anyway.
    margin = cfg.memory.vram_safety_margin
    assert seen["profile"].vram_bytes == profile.reserve_bytes + int(int(20 * 2**30 * 0.95) / (1 - margin))
    assert seen["cfg"].memory.blocks_to_swap is None and not seen["choose"]  # the planner chooses them afresh
    assert smaller.cfg.memory.blocks_to_swap == 20 and smaller.predicted_vram_bytes == 15 * 2**30
