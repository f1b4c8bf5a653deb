"""The planner's predicted device peak vs the simulated device's measured peak, per offload strategy, on tiny real runs.

The same planner `Settings` drive both sides: `lowvram.plan.predict_peak` (fake-tensor measurements of one block,
composed to the model's depth, plus the budget's weights and offload buffers) and `lowvram.offload.apply_memory_plan`
on the tiny LTX-2 transformer, whose LoRA step (forward + loss + backward) runs on `SimBackend`. The optimizer state
is priced separately (tests/test_plan_measure.py checks it against a real optimizer step) and left out of both sides.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from lowvram.device import get_backend
from lowvram.offload import apply_memory_plan
from lowvram.offload.harness import (
    lora_step,
    plan_batch,
    plan_settings,
    planner_step_peak_bytes,
    tiny_lora_transformer,
    tiny_plan_config,
    zero_grads,
)

TOLERANCE = 0.05  # |predicted - measured| / measured
STEPS = 2  # the second step runs with what the first one left (prefetch order, ring contents)

# (strategy as the harness names it, blocks, checkpointing, streamed share)
CASES = {
    "no_offload": ("none", 4, True, 1.0),
    "no_offload_no_ckpt": ("none", 4, False, 1.0),
    "streaming_all": ("streaming", 4, True, 1.0),
    "streaming_half": ("streaming", 4, True, 0.5),
    "streaming_no_ckpt": ("streaming", 4, False, 1.0),
    "block_swap_3_of_6": ("block_swap_3", 6, True, 1.0),
    "block_swap_5_of_6": ("block_swap_all_but_one", 6, True, 1.0),
    "group_block_level": ("group_block_level", 4, True, 1.0),
    "group_leaf_level": ("group_leaf_level", 4, True, 1.0),
    "activation_offload": ("activation_offload", 4, True, 1.0),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-cache")


def _settings(strategy: str, precision: str, blocks: int, checkpointing: bool, share: float):
    if strategy == "block_swap_3":
        from lowvram.plan import Settings

        return Settings(
            precision=precision, gradient_checkpointing=checkpointing, offload="block_swap", blocks_to_swap=3
        )
    return plan_settings(strategy, precision, checkpointing=checkpointing, num_blocks=blocks, share=share)


def predicted_and_measured(case: str, precision: str, cache_dir) -> tuple[int, int, object]:
    strategy, blocks, checkpointing, share = CASES[case]
    cfg = tiny_plan_config(precision)
    settings = _settings(strategy, precision, blocks, checkpointing, share)
    predicted = planner_step_peak_bytes(cfg, settings, num_layers=blocks, cache_dir=cache_dir)

    transformer = tiny_lora_transformer(precision, num_layers=blocks, rank=cfg.lora.rank)
    sim = get_backend("sim")
    memory = {k.split(".", 1)[1]: v for k, v in settings.dotted().items() if k.startswith("memory.")}
    applied = apply_memory_plan(transformer, SimpleNamespace(**memory), sim)  # also places what stays resident
    batch = plan_batch(transformer, cfg)
    for _ in range(STEPS):
        zero_grads(transformer)
        with sim.session():
            sim.reset_counters()
            lora_step(transformer, batch, sim)
    return predicted, sim.stats().peak_bytes, applied


def _check(case: str, precision: str, cache_dir, record_property) -> None:
    predicted, measured, applied = predicted_and_measured(case, precision, cache_dir)
    error = (predicted - measured) / measured
    record_property("measured_peak_bytes", measured)
    record_property("predicted_peak_bytes", predicted)
    print(f"\n{case} {precision}: measured {measured} predicted {predicted} error {error:+.3f} ({applied.describe()})")
    assert abs(error) <= TOLERANCE, f"{case}: predicted {predicted} vs measured {measured} ({error:+.1%})"


@pytest.mark.parametrize("case", list(CASES))
def test_planner_predicts_the_simulated_peak_within_5_percent_fp32(case, cache_dir, record_property):
    _check(case, "fp32", cache_dir, record_property)


@pytest.mark.matrix
@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("no_ckpt")])
def test_planner_predicts_the_simulated_peak_within_5_percent_int8(
    case, precision, cache_dir, record_property
):
    _check(case, precision, cache_dir, record_property)


def test_each_offload_strategy_lowers_the_predicted_and_the_measured_peak(cache_dir):
    """The prediction is not a constant: strategies that move weights off the device lower both sides."""
    base_predicted, base_measured, _ = predicted_and_measured("no_offload", "fp32", cache_dir)
    for case in ("streaming_all", "group_block_level", "group_leaf_level"):
        predicted, measured, _ = predicted_and_measured(case, "fp32", cache_dir)
        assert predicted < base_predicted and measured < base_measured, case


def test_planner_defaults_match_what_the_offload_code_runs():
    from lowvram.offload import memory_plan_refusal
    from lowvram.plan import Settings

    group = Settings(offload="group")
    assert group.group_use_stream is False  # diffusers' stream prefetch is refused in training
    memory = {k.split(".", 1)[1]: v for k, v in group.dotted().items() if k.startswith("memory.")}
    assert memory_plan_refusal(SimpleNamespace(**memory), training=True) is None


def test_swapping_one_or_two_blocks_saves_nothing_so_the_chooser_proposes_three_or_more(cache_dir):
    """The ring has min(2, N) slots: with 1 or 2 swapped blocks each sits in its own slot (as measured above)."""
    from lowvram.plan import Settings
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import _fixed_settings, _train_candidates, collect_measurements
    from lowvram.profiles import load_profile

    cfg = tiny_plan_config("fp32")
    none = planner_step_peak_bytes(cfg, Settings(precision="fp32"), num_layers=6, cache_dir=cache_dir)
    for k in (1, 2):
        swap = Settings(precision="fp32", offload="block_swap", blocks_to_swap=k)
        assert planner_step_peak_bytes(cfg, swap, num_layers=6, cache_dir=cache_dir) == none
    three = Settings(precision="fp32", offload="block_swap", blocks_to_swap=3)
    assert planner_step_peak_bytes(cfg, three, num_layers=6, cache_dir=cache_dir) < none

    profile = load_profile("4090")  # an accelerator: on the cpu profile nothing is offloaded at all
    m = replace(collect_measurements(cfg, profile, MeasureCache(cache_dir)), num_layers=6)
    candidates = _train_candidates(m, cfg, profile, False, _fixed_settings(cfg), vram_ok=2**40)
    swapped = {c.blocks_to_swap for c in candidates if c.offload == "block_swap"}
    assert swapped == {3, 4, 5, 6}
    assert all(not c.group_use_stream for c in candidates if c.offload == "group")
