"""The planner's instrument: fake-tensor byte counting, one-block composition, cache, weight layouts."""

from __future__ import annotations

import functools

import pytest
import torch

from lowvram.fakemem import LiveBytes, fake_mode
from lowvram.plan.budget import StepMeasure, WeightGroup
from lowvram.plan.measure import LoraSpec, MeasureCache, TrainShape, measure_transformer_step

# The real LTX-2 block structure (video + audio self/cross attention, a/v cross attention, both FFs) at a width
# small enough to run a 4-block fake step in well under a second.
REDUCED = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=4,
    attention_head_dim=32,
    cross_attention_dim=128,
    audio_in_channels=16,
    audio_out_channels=16,
    audio_num_attention_heads=4,
    audio_attention_head_dim=16,
    audio_cross_attention_dim=64,
    caption_channels=64,
    rope_type="split",
)
SHAPE = TrainShape(batch=2, latent_frames=3, latent_height=6, latent_width=8, audio_tokens=9, text_tokens=64)
LORA = LoraSpec(rank=8, targets=("to_q", "to_k", "to_v", "to_out.0"))


@functools.cache
def measured(checkpointing: bool, num_layers: int = 1, attention: str = "flash") -> dict:
    return measure_transformer_step(
        REDUCED,
        SHAPE,
        LORA,
        compute_dtype="fp32",
        checkpointing=checkpointing,
        num_layers=num_layers,
        attention=attention,
    )


def step_of(raw: dict) -> StepMeasure:
    return StepMeasure(raw["marks"], raw["peaks"], raw["flops"], raw["lora_params_per_block"])


def test_live_bytes_counts_new_storages_once_and_sees_frees():
    with fake_mode():
        weight = torch.empty(1000)
        live = LiveBytes()
        live.ignore(weight)
        with live:
            live.enter_section("a")
            x = torch.empty(256, dtype=torch.float32)  # 1024 bytes
            view = x[:10]  # a view is not a new storage
            y = weight * 1.0  # 4000 bytes (the ignored input itself never counts)
            assert live.now() == 1024 + 4000
            del x, view
            assert live.now() == 4000
            live.enter_section("b")
            z = torch.empty(10, dtype=torch.bfloat16)
            del y, z
    assert live.peaks["a"] == 5024
    assert live.peaks["b"] == 4000 + 20


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_block_composes_to_a_full_fake_run_within_2_percent(checkpointing):
    one, full = measured(checkpointing), measured(checkpointing, num_layers=3)
    predicted = step_of(one).activation_peak_bytes(3, one["lora_params_per_block"] * 4)
    assert predicted == pytest.approx(full["peak_bytes"], rel=0.02)
    assert full["lora_params_total"] == 3 * one["lora_params_per_block"]
    # three blocks keep two more blocks' worth than one: the composition is not the one-block peak
    assert full["peak_bytes"] - one["peak_bytes"] >= 2 * step_of(one).kept_per_block_bytes * 0.98
    blocks_flops = sum(full["flops"].values()) - sum(one["flops"].values())
    per_block = one["flops"]["block_fwd"] + one["flops"]["block_bwd"]
    assert blocks_flops == pytest.approx(2 * per_block, rel=0.02)


def test_checkpointing_keeps_less_per_block_and_recompute_sees_the_uncheckpointed_bytes():
    plain, ckpt = measured(False), measured(True)
    s_plain, s_ckpt = step_of(plain), step_of(ckpt)
    assert s_ckpt.kept_per_block_bytes * 5 < s_plain.kept_per_block_bytes
    assert s_ckpt.recomputed_per_block_bytes == pytest.approx(s_plain.kept_per_block_bytes, rel=0.05)
    # the checkpointed backward recomputes the forward: one more forward's FLOPs
    assert ckpt["flops"]["block_bwd"] == pytest.approx(
        plain["flops"]["block_bwd"] + plain["flops"]["block_fwd"], rel=0.01
    )


def test_math_attention_materializes_quadratic_scores():
    flash, math_ = measured(False), measured(False, attention="math")
    s = SHAPE.batch * REDUCED["num_attention_heads"] * SHAPE.video_tokens**2 * 4  # one fp32 score matrix
    kept_flash = flash["marks"]["block_fwd_end"] - flash["marks"]["block_fwd_start"]
    kept_math = math_["marks"]["block_fwd_end"] - math_["marks"]["block_fwd_start"]
    assert kept_math - kept_flash >= s  # at least the video self-attention probabilities are kept for backward


def test_measure_cache_reuses_disk_entries_and_separates_keys(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"bytes": 123}

    assert MeasureCache(tmp_path).get("kind", {"a": 1}, compute) == {"bytes": 123}
    assert MeasureCache(tmp_path).get("kind", {"a": 1}, compute) == {"bytes": 123}
    assert len(calls) == 1
    MeasureCache(tmp_path).get("kind", {"a": 2}, compute)
    assert len(calls) == 2
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("precision", ["int8-torchao", "int8-quanto", "fp8-torchao", "nf4-bnb"])
def test_weight_group_bytes_match_the_trainers_real_quantization(precision):
    """The planner's split (quantizable Linears vs other params) priced by the quant layouts == real bytes after
    lowvram's own quantize_model, on a block-like module with an excluded layer."""
    from lowvram.plan.measure import _linear_groups
    from lowvram.quant.backends import quantize_model
    from lowvram.quant.layout import allocated_bytes

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "proj_in": torch.nn.Linear(64, 128),
            "norm": torch.nn.LayerNorm(128),
            "ff": torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)),
        }
    ).to(torch.bfloat16)
    exclude = ("proj_in",)
    group = WeightGroup(**_linear_groups(model, exclude, lambda n: True))
    assert group.bytes("bf16", "bf16") == allocated_bytes(model)
    quantize_model(model, precision, exclude)
    assert group.bytes(precision, "bf16") == allocated_bytes(model)


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for key, t in state.items():
            if torch.is_tensor(t) and key != "step" and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize(
    "name, dtype",
    [("adamw", torch.float32), ("adamw", torch.bfloat16), ("adamw_bf16", torch.bfloat16), ("adamw8bit", torch.float32)],
)
def test_optimizer_state_bytes_match_a_real_optimizer_step(name, dtype):
    from lowvram.config import OptimSection
    from lowvram.plan.budget import optimizer_state_bytes
    from lowvram.train.optim import build_optimizer

    torch.manual_seed(0)
    # LoRA-shaped tensors (A: r x in, B: out x r)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in ((16, 512), (512, 16), (16, 256))]
    opt = build_optimizer(params, OptimSection(optimizer=name))
    sum(p.float().sum() for p in params).backward()
    opt.step()
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    predicted = optimizer_state_bytes(name, sum(p.numel() for p in params), dtype_name)
    assert predicted == pytest.approx(_state_bytes(opt), rel=0.01)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_measurement_predicts_a_real_tiny_step_within_5_percent(checkpointing):
    """The instrument on fake tensors vs the same counting on a real CPU step of the tiny model (4 blocks)."""
    from lowvram.device import get_backend
    from lowvram.fakemem import register_module_storages
    from lowvram.models.ltx2 import tiny_configs
    from lowvram.offload.harness import lora_step, tiny_batch, tiny_lora_transformer

    b, f, h, w, a, length = 2, 3, 4, 4, 9, 32
    model = tiny_lora_transformer("fp32", num_layers=4, rank=4)
    if checkpointing:
        model.enable_gradient_checkpointing()
    live = LiveBytes()
    register_module_storages(live, model)
    with live:
        live.enter_section("step")
        batch = tiny_batch(model, batch=b, frames=f, height=h, width=w, audio_tokens=a, text_tokens=length)
        lora_step(model, batch, get_backend("cpu"))
    raw = measure_transformer_step(
        tiny_configs()["transformer"],
        TrainShape(b, f, h, w, a, length),
        LoraSpec(4, LORA.targets),
        compute_dtype="fp32",
        checkpointing=checkpointing,
    )
    predicted = step_of(raw).activation_peak_bytes(4, raw["lora_params_per_block"] * 4)
    assert predicted == pytest.approx(live.peak_bytes, rel=0.05)
