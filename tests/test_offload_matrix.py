"""The offload matrix on the tiny LTX-2 transformer and the simulated device (`pytest -m matrix`):
{no offload, streaming, block swap 1 / all but one, group offload block/leaf level, activation offload} x {fp32, int8
quanto, int8 torchao} x {checkpointing on, off}. Each case gives the baseline's LoRA gradients, touches no offloaded
weight (the simulated device raises if it does), races no stream (it raises StreamRaceError if one does: the detector
is on), and peaks within the planner's prediction (lowvram.plan.predict_peak for the same settings) + 5% -- or is
refused up front with one line."""

import functools

import pytest
import torch

from lowvram.device import get_backend
from lowvram.errors import UsageError
from lowvram.offload.harness import (
    PRECISIONS,
    apply_named_strategy,
    lora_grads,
    lora_step,
    plan_batch,
    plan_settings,
    planner_step_peak_bytes,
    tiny_lora_transformer,
    tiny_plan_config,
    zero_grads,
)

pytestmark = pytest.mark.matrix

STRATEGIES = [
    "streaming",
    "block_swap_1",
    "block_swap_all_but_one",
    "group_block_level",
    "group_leaf_level",
    "activation_offload",  # always checkpoints: its no-ckpt case is compared with the no-ckpt baseline
]
# Relative to the largest gradient entry. fp32 paths run the same kernels (measured: bit-identical). int8 backward
# multiplies by the dequantized weight where the library's own backward may order the math differently (measured:
# <= 5e-6 for torchao, 0 for quanto).
TOLERANCE = {"fp32": 1e-5, "int8-quanto": 1e-4, "int8-torchao": 1e-4}
REFUSED_WITHOUT_CHECKPOINTING = {
    "block_swap_1": "block swap needs gradient checkpointing",
    "block_swap_all_but_one": "block swap needs gradient checkpointing",
    "group_block_level": "saves no memory in training without gradient checkpointing",
    "group_leaf_level": "saves no memory in training without gradient checkpointing",
}
NUM_LAYERS = 4
STEPS = 2  # the second step runs with the prefetch order and ring contents the first one left


def _run(precision: str, strategy_name: str, checkpointing: bool):
    transformer = tiny_lora_transformer(precision, num_layers=NUM_LAYERS)
    sim = get_backend("sim")
    strategy = apply_named_strategy(strategy_name, transformer, sim, checkpointing=checkpointing)
    batch = plan_batch(transformer, tiny_plan_config(precision))
    sim.place_module(transformer)
    for _ in range(STEPS):
        zero_grads(transformer)
        with sim.session():
            sim.reset_counters()
            lora_step(transformer, batch, sim)
    frozen_grads = [n for n, p in transformer.named_parameters() if not p.requires_grad and p.grad is not None]
    return lora_grads(transformer), sim.stats(), strategy, frozen_grads


@functools.cache
def _baseline(precision: str, checkpointing: bool):
    return _run(precision, "none", checkpointing)


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-cache")


def _planner_prediction(strategy: str, precision: str, checkpointing: bool, cache_dir) -> int:
    settings = plan_settings(strategy, precision, checkpointing=checkpointing, num_blocks=NUM_LAYERS)
    return planner_step_peak_bytes(tiny_plan_config(precision), settings, num_layers=NUM_LAYERS, cache_dir=cache_dir)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_offload_case(strategy, precision, checkpointing, record_property, plan_cache):
    if not checkpointing and strategy in REFUSED_WITHOUT_CHECKPOINTING:
        transformer = tiny_lora_transformer(precision, num_layers=NUM_LAYERS)
        with pytest.raises(UsageError, match=REFUSED_WITHOUT_CHECKPOINTING[strategy]) as refused:
            apply_named_strategy(strategy, transformer, get_backend("sim"), checkpointing=False)
        assert "\n" not in str(refused.value)
        return
    expected, base, _, _ = _baseline(precision, checkpointing)
    grads, stats, strategy_obj, frozen_grads = _run(precision, strategy, checkpointing)

    assert grads.keys() == expected.keys() and len(grads) == 48 * NUM_LAYERS
    worst = max(float((grads[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)
    assert worst <= TOLERANCE[precision]
    assert frozen_grads == []
    assert strategy_obj.offloaded_bytes > 0 and stats.h2d_bytes > 0
    assert (stats.d2h_bytes > 0) == (strategy == "activation_offload")  # only activations go device -> host

    predicted = _planner_prediction(strategy, precision, checkpointing, plan_cache)
    record_property("peak_bytes", stats.peak_bytes)
    record_property("predicted_peak_bytes", predicted)
    record_property("baseline_peak_bytes", base.peak_bytes)
    print(
        f"\n{strategy} {precision} ckpt={checkpointing}: peak {stats.peak_bytes} predicted {predicted} "
        f"baseline {base.peak_bytes} ratio {stats.peak_bytes / predicted:.3f} grad err {worst:.1e}"
    )
    assert stats.peak_bytes <= 1.05 * predicted
    assert stats.peak_bytes >= 0.95 * predicted  # and the prediction is not a loose bound either
    base_predicted = _planner_prediction("none", precision, checkpointing, plan_cache)
    assert 0.95 * base_predicted <= base.peak_bytes <= 1.05 * base_predicted
    # block_swap_1: one swapped block sits in its one ring slot, by design it saves nothing. activation_offload with
    # checkpointing: at these tiny shapes the step's peak is not where block boundaries are held (measured: equal to
    # the baseline's, int8-quanto 288 bytes above it); its saving is tested in test_offload_strategies.py.
    if strategy != "block_swap_1" and not (strategy == "activation_offload" and checkpointing):
        assert stats.peak_bytes < base.peak_bytes


def test_baseline_is_deterministic():
    a, _, _, _ = _run("fp32", "none", True)
    b, _, _, _ = _baseline("fp32", True)
    assert all(torch.equal(a[k], b[k]) for k in a)
