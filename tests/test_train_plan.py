"""4b: the train entry lets the planner decide what the config leaves open, and refuses what will not fit."""

import pytest

import lowvram.plan
from lowvram.config import RunConfig
from lowvram.errors import LowvramError
from lowvram.plan.budget import PhaseBudget
from lowvram.profiles import load_profile
from lowvram.train.run import decide_memory

GIB = 2**30


class FakePlan:
    def __init__(self, fits, settings, reason=None):
        self.fits, self.settings, self.reason = fits, settings, reason
        self.phases = {
            "text_cache": PhaseBudget("text_cache", {"weights": 3 * GIB}, {"host": 5 * GIB}),
            "latent_cache": PhaseBudget("latent_cache", {"vae": 4 * GIB}, {"host": 2 * GIB}),
            "train": PhaseBudget("train", {"weights": 10 * GIB, "activations": 2 * GIB}, {"host": 20 * GIB}),
        }
        self.rendered = False

    def render(self, console):
        self.rendered = True


@pytest.fixture
def planner(monkeypatch):
    calls = {}

    def install(plan):
        def fake_plan_run(cfg, profile, *, choose=True, **kw):
            calls.update(cfg=cfg, profile=profile, choose=choose)
            return plan

        monkeypatch.setattr(lowvram.plan, "plan_run", fake_plan_run)
        return calls

    return install


def ltx2_config(**memory) -> RunConfig:
    return RunConfig.model_validate({"model": {"family": "ltx2", "checkpoint": "x.safetensors"}, "memory": memory})


def test_settings_left_open_are_the_planners_and_stated_ones_stay(planner):
    cfg = ltx2_config(gradient_checkpointing=True)
    plan = FakePlan(
        True,
        {
            "memory.blocks_to_swap": 12,
            "memory.gradient_checkpointing": True,
            "memory.vae_tiling": True,
            "model.precision": "bf16",
        },
    )
    calls = planner(plan)
    decision = decide_memory(cfg, load_profile("3090"), force=False, console=None)
    assert calls["choose"] is False and calls["profile"].name == "3090"
    assert decision.cfg.memory.blocks_to_swap == 12 and decision.cfg.memory.vae_tiling is True
    assert decision.cfg.memory.gradient_checkpointing is True
    assert decision.predicted_vram_bytes == 12 * GIB and decision.predicted_ram_bytes == 20 * GIB
    assert decision.predicted_cache_vram_bytes == 4 * GIB and decision.predicted_cache_ram_bytes == 5 * GIB


def test_a_run_that_will_not_fit_is_refused_with_what_it_lacks(planner):
    planner(FakePlan(False, {}, reason="train needs 30.1 GiB of VRAM, the 3090 has 22.6 GiB usable"))
    with pytest.raises(LowvramError, match=r"30\.1 GiB.*--force"):
        decide_memory(ltx2_config(), load_profile("3090"), force=False)


def test_force_trains_anyway(planner):
    plan = FakePlan(False, {"memory.blocks_to_swap": 40}, reason="does not fit")
    planner(plan)
    decision = decide_memory(ltx2_config(), load_profile("3090"), force=True)
    assert not decision.fits and decision.cfg.memory.blocks_to_swap == 40


def test_the_plan_is_printed(planner):
    from rich.console import Console

    plan = FakePlan(True, {})
    planner(plan)
    decide_memory(ltx2_config(), load_profile("3090"), force=False, console=Console(quiet=True))
    assert plan.rendered


def test_the_tiny_demo_without_a_profile_needs_no_plan(planner):
    calls = planner(FakePlan(False, {}))
    decision = decide_memory(RunConfig.model_validate({"model": {"family": "tiny"}}), None, force=False)
    assert decision.fits and calls == {}


@pytest.mark.slow
def test_demo_dry_run_with_a_profile_uses_the_real_planner(tmp_path):
    from lowvram.demo import default_demo_config
    from lowvram.train.run import run_train

    assert run_train(default_demo_config(tmp_path), profile=load_profile("3090"), dry_run=True) == 0
