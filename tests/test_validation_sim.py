"""Validation on the simulated device: the planner's validation-phase peak vs what sampling + decode allocate there,
with the transformer under block swap (its training strategy) and the optimizer state on or off the device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lowvram.device import get_backend
from lowvram.offload import apply_memory_plan
from lowvram.offload.harness import tiny_lora_transformer, tiny_plan_config

TOLERANCE = 0.05
BLOCKS = 6


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-cache")


def _cfg():
    from lowvram.config import apply_overrides

    return apply_overrides(
        tiny_plan_config("fp32"),
        {"validation.enabled": True, "validation.resolution": "64x64", "validation.num_frames": 17,
         "validation.guidance": 3.0, "validation.num_inference_steps": 2},
    )  # fmt: skip


def tiny_text(cfg, seed):
    from lowvram.models.ltx2 import TextEmbeddings

    g = torch.Generator().manual_seed(seed)
    n = cfg.data.max_text_tokens
    return TextEmbeddings(video=torch.randn(1, n, 16, generator=g), audio=torch.randn(1, n, 16, generator=g),
                          mask=torch.ones(1, n, dtype=torch.int64))  # fmt: skip


def trained_setup_on_sim(cfg, settings, num_layers: int):
    """A tiny LoRA transformer under `settings`' offload on the simulated device, its AdamW state as a step leaves
    it (on the device), and the tiny VAEs: what a validation render finds mid-training."""
    from lowvram.models.ltx2 import build_tiny_components

    transformer = tiny_lora_transformer("fp32", num_layers=num_layers, rank=cfg.lora.rank)
    parts = build_tiny_components(seed=0)
    sim = get_backend("sim")
    memory = {k.split(".", 1)[1]: v for k, v in settings.dotted().items() if k.startswith("memory.")}
    apply_memory_plan(transformer, SimpleNamespace(**memory), sim)
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora)
    for p in lora:  # AdamW's state as a step leaves it, on the device
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": sim.to_device(torch.zeros_like(p)),
                              "exp_avg_sq": sim.to_device(torch.zeros_like(p))}  # fmt: skip
    return transformer, parts, sim, optimizer


def measured_and_predicted(cache_dir, *, offload_optimizer: bool, tiling: bool = False):
    from lowvram.plan import Settings
    from lowvram.plan.plan import predict_validation_peak
    from lowvram.plan.validation import validation_peak_bytes
    from lowvram.profiles import load_profile
    from lowvram.train.validation import optimizer_off_device, render_sample, sample_shape_for

    cfg = _cfg()
    settings = Settings(precision="fp32", offload="block_swap", blocks_to_swap=3)
    budget = predict_validation_peak(cfg, load_profile("cpu"), settings, num_layers=BLOCKS, cache_dir=cache_dir,
                                     offload_optimizer=offload_optimizer, vae_tiling=tiling)  # fmt: skip
    predicted = validation_peak_bytes(budget)

    transformer, parts, sim, optimizer = trained_setup_on_sim(cfg, settings, BLOCKS)
    text, negative = tiny_text(cfg, 1), tiny_text(cfg, 2)
    shape = sample_shape_for(cfg, transformer, parts)
    with optimizer_off_device(optimizer, sim) if offload_optimizer else torch.no_grad():
        with sim.session():
            sim.reset_counters()
            frames, wave = render_sample(transformer, parts, text, negative, shape, steps=2, guidance=3.0, seed=42,
                                         backend=sim, tiling=tiling)  # fmt: skip
            measured = sim.stats().peak_bytes
    assert frames.shape == (17, 64, 64, 3) and wave is not None and wave.shape[0] == 2
    return measured, predicted


@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_validation_under_block_swap_stays_within_5_percent_of_the_predicted_peak(cache_dir, offload_optimizer):
    measured, predicted = measured_and_predicted(cache_dir, offload_optimizer=offload_optimizer)
    error = (predicted - measured) / measured
    print(f"\nvalidation offload_optimizer={offload_optimizer}: measured {measured} predicted {predicted} {error:+.3f}")
    assert abs(error) <= TOLERANCE, f"predicted {predicted} vs measured {measured} ({error:+.1%})"


def test_optimizer_state_off_the_device_lowers_both_sides(cache_dir):
    kept = measured_and_predicted(cache_dir, offload_optimizer=False)
    off = measured_and_predicted(cache_dir, offload_optimizer=True)
    assert off[0] < kept[0] and off[1] < kept[1]
