"""Each offload strategy on the simulated device: LoRA gradients equal the no-offload run, no offloaded weight is
read, frozen weights get no gradient, and combinations that cannot work are refused up front with one line."""

from types import SimpleNamespace

import pytest
import torch

from lowvram.device import get_backend
from lowvram.errors import UsageError
from lowvram.offload import (
    Phase,
    apply_activation_offload,
    apply_block_swap,
    apply_group_offload,
    apply_memory_plan,
    apply_weight_streaming,
    choose_swapped_blocks,
    memory_plan_refusal,
    offload_during_startup,
)
from lowvram.offload.harness import lora_grads, lora_step, tiny_batch, tiny_lora_transformer, zero_grads
from lowvram.offload.weights import tensor_bytes


def _run(transformer, backend, batch, steps=2):
    backend.place_module(transformer)
    for _ in range(steps):
        zero_grads(transformer)
        with backend.session():
            backend.reset_counters()
            lora_step(transformer, batch, backend)
    return lora_grads(transformer), backend.stats()


@pytest.fixture(scope="module")
def baseline_ckpt():
    transformer = tiny_lora_transformer("fp32")
    transformer.enable_gradient_checkpointing()
    return _run(transformer, get_backend("sim"), tiny_batch(transformer))


def _assert_same(grads, expected, rtol=1e-5):
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        assert (grads[name] - expected[name]).abs().max() <= rtol * scale, name


def test_streaming_gives_baseline_lora_grads_and_no_frozen_weight_grad(baseline_ckpt):
    transformer = tiny_lora_transformer("fp32")
    transformer.enable_gradient_checkpointing()
    sim = get_backend("sim")
    streaming = apply_weight_streaming(transformer, sim)
    grads, stats = _run(transformer, sim, tiny_batch(transformer))
    _assert_same(grads, baseline_ckpt[0])
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)
    assert stats.peak_bytes < baseline_ckpt[1].peak_bytes - streaming.offloaded_bytes // 2
    assert stats.d2h_bytes == 0  # frozen weights are never copied back


def test_streaming_prefetches_from_the_second_step_on():
    transformer = tiny_lora_transformer("fp32", num_layers=2)
    sim = get_backend("sim", h2d_gbps=1.0, tflops=1e-4)  # slow enough that compute can hide copies
    streaming = apply_weight_streaming(transformer, sim)
    batch = tiny_batch(transformer)
    sim.place_module(transformer)
    stalls = []
    for _ in range(2):
        with sim.session():
            sim.reset_counters()
            lora_step(transformer, batch, sim)
        stalls.append(sim.stats().stall_s)
    # Step 1 copies every weight on the compute stream; step 2 only the first, the rest arrive on the side stream.
    assert stalls[1] < stalls[0] / 5
    assert len(streaming._trace) > len(streaming.weights)  # forward and backward fetches were both recorded


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_streaming_moves_quantized_weights_in_quantized_form(precision):
    transformer = tiny_lora_transformer(precision, num_layers=1)
    sim = get_backend("sim")
    streaming = apply_weight_streaming(transformer, sim, patterns="transformer_blocks.*")
    quantized = [w for w in streaming.weights if type(w.host).__name__ != "Tensor"]
    assert quantized, "the blocks' Linears should be quantized"
    for w in quantized:
        assert w.nbytes < w.host.numel() * 2  # int8 data + row scales, not 4 bytes per weight
    batch = tiny_batch(transformer)
    _run(transformer, sim, batch, steps=1)
    fetches_per_step = len(streaming._recording)
    assert sim.stats().h2d_bytes <= sum(w.nbytes for w in streaming.weights) * fetches_per_step


def test_streaming_share_picks_layers_spread_through_the_model():
    transformer = tiny_lora_transformer("fp32")
    everything = apply_weight_streaming(tiny_lora_transformer("fp32"), get_backend("sim")).names()
    half = apply_weight_streaming(transformer, get_backend("sim"), share=0.5).names()
    assert len(half) == len(everything) // 2
    assert half == everything[1::2]


def test_streaming_refuses_a_pattern_that_matches_nothing():
    with pytest.raises(UsageError, match="matched no frozen Linear"):
        apply_weight_streaming(tiny_lora_transformer("fp32", num_layers=1), get_backend("sim"), patterns="nope.*")


def test_block_swap_gives_baseline_lora_grads_and_copies_host_to_device_only(baseline_ckpt):
    transformer = tiny_lora_transformer("fp32")
    transformer.enable_gradient_checkpointing()
    sim = get_backend("sim")
    swap = apply_block_swap(transformer, sim, blocks_to_swap=3)
    grads, stats = _run(transformer, sim, tiny_batch(transformer))
    _assert_same(grads, baseline_ckpt[0])
    assert stats.d2h_bytes == 0
    assert stats.h2d_bytes > 0
    assert stats.peak_bytes <= baseline_ckpt[1].peak_bytes - swap.offloaded_bytes + swap.working_set_bytes
    for index in swap.swapped:  # between steps the swapped blocks hold stand-ins or ring views, never own copies
        for p in transformer.transformer_blocks[index].parameters():
            if not p.requires_grad:
                assert p.untyped_storage().nbytes() in (p.element_size(), swap._slots[0].numel())


def test_block_swap_refuses_without_checkpointing():
    with pytest.raises(UsageError, match="needs gradient checkpointing"):
        apply_block_swap(tiny_lora_transformer("fp32", num_layers=2), get_backend("sim"), blocks_to_swap=1)


def test_choose_swapped_blocks_spread_and_last():
    assert choose_swapped_blocks(8, 4, "spread") == (1, 3, 5, 7)
    assert choose_swapped_blocks(8, 3, "last") == (5, 6, 7)
    assert choose_swapped_blocks(48, 48, "spread") == tuple(range(48))
    with pytest.raises(UsageError, match="0..8"):
        choose_swapped_blocks(8, 9)


@pytest.mark.parametrize("precision", ["fp32", "int8-quanto"])
def test_group_offload_leaf_level_is_correct_in_training(precision):
    # quanto's Linear saves the Parameter itself for backward: diffusers' own offload makes backward read the
    # offloaded tensor (diffusers #12610). The adapter's rebinding keeps the saved copy valid.
    expected_model = tiny_lora_transformer(precision, num_layers=2)
    expected_model.enable_gradient_checkpointing()
    expected, _ = _run(expected_model, get_backend("sim"), tiny_batch(expected_model))
    transformer = tiny_lora_transformer(precision, num_layers=2)
    transformer.enable_gradient_checkpointing()
    sim = get_backend("sim")
    apply_group_offload(transformer, sim, offload_type="leaf_level")
    grads, _ = _run(transformer, sim, tiny_batch(transformer))
    _assert_same(grads, expected, rtol=1e-4)


def test_group_offload_keeps_one_block_onloaded_through_checkpoint_recompute():
    # Non-reentrant checkpointing stops recompute early, so diffusers' post-forward offload never runs in backward.
    transformer = tiny_lora_transformer("fp32")
    transformer.enable_gradient_checkpointing()
    sim = get_backend("sim")
    group = apply_group_offload(transformer, sim, offload_type="block_level")
    _run(transformer, sim, tiny_batch(transformer), steps=1)
    onloaded_blocks = [g for g in group.groups if g.onloaded and group._leader_name(g) != ""]
    assert len(onloaded_blocks) <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gradient_checkpointing=False), "saves no memory in training without gradient checkpointing"),
        (dict(gradient_checkpointing=True, use_stream=True), "prefetches in forward order"),
    ],
)
def test_group_offload_refuses_what_cannot_work(kwargs, message):
    transformer = tiny_lora_transformer("fp32", num_layers=1)
    before = {n: p.data_ptr() for n, p in transformer.named_parameters()}
    with pytest.raises(UsageError, match=message):
        apply_group_offload(transformer, get_backend("sim"), **kwargs)
    assert before == {n: p.data_ptr() for n, p in transformer.named_parameters()}  # refused before touching


def test_activation_offload_keeps_block_boundaries_on_the_host():
    def run(offload: bool):
        transformer = tiny_lora_transformer("fp32", num_layers=4)
        sim = get_backend("sim")
        strategy = apply_activation_offload(transformer, sim) if offload else None
        if not offload:
            transformer.enable_gradient_checkpointing()
        batch = tiny_batch(transformer, frames=4, height=8, width=8, audio_tokens=64)
        grads, stats = _run(transformer, sim, batch)
        return grads, stats, strategy

    expected, base, _ = run(False)
    grads, stats, strategy = run(True)
    _assert_same(grads, expected)
    assert strategy.chain_positions == {0, 1}  # video and audio hidden states chain block to block
    assert stats.d2h_bytes == strategy.offloaded_bytes > 0
    assert stats.peak_bytes < base.peak_bytes
    # Within the analytic prediction + 5%: boundaries already consumed in backward were freed in the baseline too.
    assert stats.peak_bytes <= 1.05 * (base.peak_bytes - strategy.offloaded_bytes + strategy.working_set_bytes)


def test_startup_phasing_peak_is_the_largest_phase_not_the_sum():
    def phase(name, n):
        return Phase(name, load=lambda: torch.nn.Linear(n, n), use=lambda m: float(m(torch.ones(1, n)).detach().sum()))

    phases = [phase("text_cache", 64), phase("latent_cache", 32), phase("train", 48)]
    phased_sim, unphased_sim = get_backend("sim"), get_backend("sim")
    with phased_sim.session():
        phased = offload_during_startup(phases, phased_sim)
    with unphased_sim.session():
        offload_during_startup(phases, unphased_sim, phased=False)
    weights = [(n * n + n) * 4 for n in (64, 32, 48)]
    assert [r.name for r in phased] == ["text_cache", "latent_cache", "train"]
    assert max(r.peak_device_bytes for r in phased) < sum(weights)
    assert max(r.peak_device_bytes for r in phased) == phased[0].peak_device_bytes
    assert unphased_sim.stats().peak_bytes >= sum(weights)
    assert phased_sim.stats().live_bytes == 0  # everything left the device


def test_startup_phasing_reports_each_phase_to_telemetry():
    from lowvram.telemetry import MemoryMonitor

    sim = get_backend("sim")
    monitor = MemoryMonitor(backend=sim)
    phases = [Phase(n, load=lambda: torch.nn.Linear(8, 8), use=lambda m: None) for n in ("text_cache", "train")]
    with sim.session():
        offload_during_startup(phases, sim, monitor=monitor)
    records = monitor.finish()
    assert [r.name for r in records] == ["text_cache", "train"]
    assert all(r.device_max_allocated_bytes == (8 * 8 + 8) * 4 for r in records)


def _memory(**kw):
    base = dict(
        ramtorch=None,
        blocks_to_swap=None,
        group_offload=None,
        group_offload_type="block_level",
        group_offload_blocks_per_group=1,
        group_offload_use_stream=False,
        gradient_checkpointing=True,
        activation_offload=None,
    )
    return SimpleNamespace(**{**base, **kw})


def test_apply_memory_plan_dispatches_from_settings(baseline_ckpt):
    from lowvram.config import MemorySection

    transformer = tiny_lora_transformer("fp32")
    sim = get_backend("sim")
    plan = apply_memory_plan(transformer, MemorySection(blocks_to_swap=2, gradient_checkpointing=True), sim)
    assert [type(s).__name__ for s in plan.strategies] == ["BlockSwap"]
    assert plan.gradient_checkpointing and transformer.is_gradient_checkpointing
    grads, _ = _run(transformer, sim, tiny_batch(transformer))
    _assert_same(grads, baseline_ckpt[0])


@pytest.mark.parametrize(
    "settings, message",
    [
        (_memory(ramtorch=True, blocks_to_swap=2), "ramtorch and blocks_to_swap both move"),
        (_memory(blocks_to_swap=2, gradient_checkpointing=False), "block swap needs gradient checkpointing"),
        (_memory(group_offload=True, gradient_checkpointing=False), "saves no memory"),
    ],
)
def test_memory_plan_refusals_are_one_line(settings, message):
    reason = memory_plan_refusal(settings)
    assert message in reason and "\n" not in reason
    with pytest.raises(UsageError, match=message):
        apply_memory_plan(tiny_lora_transformer("fp32", num_layers=1), settings, get_backend("sim"))


def test_weights_tensor_bytes_counts_quantized_leaves():
    transformer = tiny_lora_transformer("int8-quanto", num_layers=1)
    q = transformer.transformer_blocks[0].attn1.to_q.base_layer.weight
    assert tensor_bytes(q) == q.shape[0] * q.shape[1] + q.shape[0] * 4


def test_activation_offload_composes_with_block_swap(baseline_ckpt):
    from lowvram.config import MemorySection

    transformer = tiny_lora_transformer("fp32")
    sim = get_backend("sim")
    plan = apply_memory_plan(transformer, MemorySection(blocks_to_swap=3, activation_offload=True), sim)
    assert [type(s).__name__ for s in plan.strategies] == ["ActivationOffload", "BlockSwap"]
    grads, stats = _run(transformer, sim, tiny_batch(transformer))
    _assert_same(grads, baseline_ckpt[0])
    assert stats.d2h_bytes > 0 and stats.h2d_bytes > 0


def test_bitsandbytes_4bit_weights_are_refused_not_silently_copied():
    from lowvram.quant.backends import quantize_model

    transformer = tiny_lora_transformer("fp32", num_layers=2)
    quantize_model(transformer, "nf4-bnb", ["*lora*", "proj_*", "*embed*", "*norm*", "caption_*", "av_cross*"])
    transformer.enable_gradient_checkpointing()
    with pytest.raises(UsageError, match="block swap cannot move Params4bit"):
        apply_block_swap(transformer, get_backend("sim"), blocks_to_swap=2)
    with pytest.raises(UsageError, match="group offload cannot move Params4bit"):
        apply_group_offload(transformer, get_backend("sim"))
    streaming = apply_weight_streaming(transformer, get_backend("sim"))  # streams the rest, leaves 4-bit resident
    assert all("Params4bit" not in type(w.host).__name__ for w in streaming.weights)
