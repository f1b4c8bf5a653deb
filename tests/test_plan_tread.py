"""TREAD in the planner: routed blocks measured through the trainer's TreadRouter, composed beside normal blocks."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest

from lowvram.config import apply_overrides, load_config
from lowvram.fakemem import LiveBytes, register_module_storages
from lowvram.plan import Settings, budget_settings, plan_run
from lowvram.plan.budget import StepMeasure, mixed_activation_points
from lowvram.plan.measure import LoraSpec, TrainShape, measure_transformer_step, resolve_tread_routes
from lowvram.profiles import load_profile

# The shapes of test_plan_measure's real-vs-fake check: 48 video tokens per clip, 24 after routing half of them.
B, F, H, W, A, TEXT = 2, 3, 4, 4, 9, 32
ROUTE = [SimpleNamespace(selection_ratio=0.5, start_layer_idx=1, end_layer_idx=-2)]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@functools.cache
def fake_step(checkpointing: bool, tread_ratio: float | None = None) -> StepMeasure:
    from lowvram.models.ltx2 import tiny_configs

    raw = measure_transformer_step(
        tiny_configs()["transformer"],
        TrainShape(B, F, H, W, A, TEXT),
        LoraSpec(4, TARGETS),
        compute_dtype="fp32",
        checkpointing=checkpointing,
        tread_ratio=tread_ratio,
    )
    return StepMeasure(raw["marks"], raw["peaks"], raw["flops"], raw["lora_params_per_block"])


def real_step_peak(checkpointing: bool, routes: list, num_layers: int = 4) -> int:
    """Peak bytes of one real CPU training step of the tiny model through the trainer's TreadRouter."""
    from lowvram.device import get_backend
    from lowvram.method.tread import TreadRouter
    from lowvram.offload.harness import lora_step, tiny_batch, tiny_lora_transformer

    model = tiny_lora_transformer("fp32", num_layers=num_layers, rank=4).train()  # the router only acts in training
    if checkpointing:
        model.enable_gradient_checkpointing()
    router = TreadRouter(model, routes) if routes else None
    live = LiveBytes()
    register_module_storages(live, model)
    with live:
        live.enter_section("step")
        batch = tiny_batch(model, batch=B, frames=F, height=H, width=W, audio_tokens=A, text_tokens=TEXT)
        lora_step(model, batch, get_backend("cpu"))
    if router is not None:
        router.remove()
    return live.peak_bytes


def predicted_peak(checkpointing: bool, routes: list, num_layers: int = 4) -> int:
    normal = fake_step(checkpointing)
    resolved = resolve_tread_routes(routes, num_layers)
    blocks = [
        next((fake_step(checkpointing, r) for s, e, r in resolved if s <= i <= e), normal) for i in range(num_layers)
    ]
    grads = normal.lora_params_per_block * 4
    return max(mixed_activation_points(normal, blocks, grads).values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_routed_composition_predicts_a_real_routed_tiny_step_within_5_percent(checkpointing):
    real = real_step_peak(checkpointing, ROUTE)
    assert predicted_peak(checkpointing, ROUTE) == pytest.approx(real, rel=0.05)
    if not checkpointing:  # the routed blocks keep half the video tokens' activations: visibly less in a real step
        assert real < 0.95 * real_step_peak(checkpointing, [])


def test_a_routed_block_keeps_less_and_computes_less():
    for ckpt in (False, True):
        normal, routed = fake_step(ckpt), fake_step(ckpt, 0.5)
        assert routed.flops["block_fwd"] < 0.7 * normal.flops["block_fwd"]
        assert routed.flops["block_bwd"] < 0.7 * normal.flops["block_bwd"]
    assert fake_step(False, 0.5).kept_per_block_bytes < 0.8 * fake_step(False).kept_per_block_bytes
    assert fake_step(True, 0.5).recomputed_per_block_bytes < 0.8 * fake_step(True).recomputed_per_block_bytes


def test_mixed_composition_of_identical_blocks_is_the_uniform_one():
    for ckpt in (False, True):
        normal = fake_step(ckpt)
        for n in (1, 2, 5, 48):
            grads = normal.lora_params_per_block * 4
            assert mixed_activation_points(normal, [normal] * n, grads) == normal.activation_points(n, grads)


def test_routes_resolve_like_the_router_and_bad_routes_are_refused():
    from lowvram.errors import LowvramError

    assert resolve_tread_routes(ROUTE, 48) == ((1, 46, 0.5),)
    with pytest.raises(LowvramError, match="outside the model's 4 blocks"):
        resolve_tread_routes([SimpleNamespace(selection_ratio=0.5, start_layer_idx=2, end_layer_idx=9)], 4)
    overlapping = [
        SimpleNamespace(selection_ratio=0.5, start_layer_idx=s, end_layer_idx=e) for s, e in ((0, 2), (2, 3))
    ]
    with pytest.raises(LowvramError, match="overlap"):
        resolve_tread_routes(overlapping, 4)


def tiny_cfg(routes: list[dict] | None):
    values = {
        "model.family": "tiny",
        "model.precision": "fp32",
        "model.text_encoder_precision": "fp32",
        "data.resolution": "128x128",
        "data.frames": 9,
        "data.max_text_tokens": 32,
        "train.batch_size": 2,
    }
    if routes:
        values["train.tread_routes"] = routes
    return load_config(None, values)[0]


ROUTE_DICT = {"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 0}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_plan_with_routes_predicts_less_vram_and_a_shorter_step(tmp_path, checkpointing):
    profile = load_profile("4070")
    settings = Settings(precision="fp32", text_encoder_precision="fp32", gradient_checkpointing=checkpointing)
    plain = budget_settings(tiny_cfg(None), profile, settings, cache_dir=tmp_path)
    routed = budget_settings(tiny_cfg([ROUTE_DICT]), profile, settings, cache_dir=tmp_path)
    plain_acts = plain.phases["train"].vram_peak_bytes
    routed_acts = routed.phases["train"].vram_peak_bytes
    assert routed_acts < plain_acts
    assert routed.step.compute_seconds < 0.9 * plain.step.compute_seconds
    assert routed.step.seconds < plain.step.seconds


def test_the_plan_explains_tread_and_its_json_round_trips(tmp_path):
    cfg = tiny_cfg([ROUTE_DICT])
    plan = plan_run(cfg, load_profile("4070"), choose=True, cache_dir=tmp_path)
    line = next(x for x in plan.explanation if x.startswith("TREAD routes 50% of video tokens around blocks 0..0"))
    assert "GiB (activations), compute -" in line
    data = json.loads(json.dumps(plan.to_json()))
    assert data["settings"]["train.tread_routes"] == [ROUTE_DICT]
    assert data["measured"]["tread_routes"] == [[0, 0, 0.5]]
    again = apply_overrides(cfg, {k: v for k, v in data["settings"].items() if v is not None})
    assert again.train.tread_routes == cfg.train.tread_routes
    # the warm plan (measurements from the cache) is the same plan
    assert plan_run(cfg, load_profile("4070"), choose=True, cache_dir=tmp_path).to_json() == plan.to_json()
