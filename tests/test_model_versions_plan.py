"""The planner on each LTX-2 version's real classes at full size (fake tensors; measurements cached in .pytest_cache):
every built-in profile fits 832x480x17 batch 1 or says exactly what it lacks; the cache and the text cache are per
version; `lowvram plan --model-version` reaches it."""

from __future__ import annotations

import json

import pytest

from lowvram.config import load_config
from lowvram.plan import plan_run
from lowvram.plan.measure import model_configs
from lowvram.profiles import builtin_profile_names, load_profile

VERSIONS = ("2.0", "2.3", "2.5")


@pytest.fixture(scope="module")
def cache_root(request):
    # Measurements are keyed by config, shapes and library versions: reusing them across runs is exact.
    return request.config.cache.mkdir("lowvram-version-plans")


def ltx(version: str, batch: int = 1, **overrides):
    values = {
        "model.family": "ltx2",
        "model.version": version,
        "data.resolution": "832x480",
        "data.frames": 17,
        "train.batch_size": batch,
    }
    cfg, _ = load_config(None, {**values, **overrides})
    return cfg


def test_measurements_are_keyed_by_version():
    real = {v: model_configs("ltx2", v) for v in VERSIONS}
    assert len({c.family for c in real.values()}) == 3
    assert real["2.0"].family == "ltx2"  # 2.0 keeps its key: measurements cached before versions stay valid
    assert real["2.3"].transformer["gated_attn"] and real["2.5"].text_encoder["model_type"] == "gemma4_unified"
    assert len({model_configs("tiny", v).family for v in VERSIONS}) == 3


# 2.0 (the default version) is the same config test_plan_choose checks on every profile; not planned twice.
@pytest.mark.parametrize("version", [v for v in VERSIONS if v != "2.0"])
@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_builtin_profile_fits_each_version_at_batch_1_or_says_what_it_lacks(name, version, cache_root):
    from test_plan_choose import assert_fits_or_says_what_it_lacks  # tests/ is on sys.path (rootdir conftest)

    assert_fits_or_says_what_it_lacks(plan_run(ltx(version), load_profile(name), choose=True,
                                               cache_dir=cache_root / "plan"))  # fmt: skip


def test_text_cache_bytes_per_caption_follow_the_connector_widths(cache_root):
    per_item = {}
    for v in VERSIONS:
        plan = plan_run(ltx(v), load_profile("4090"), choose=True, cache_dir=cache_root / "plan")
        per_item[v] = plan.phases["text_cache"].disk_bytes_per_item
    # 1024 tokens x (video + audio width) x 2 B (bf16) + the 1024-byte mask
    assert per_item["2.0"] == 1024 * (3840 + 3840) * 2 + 1024
    assert per_item["2.3"] == per_item["2.5"] == 1024 * (4096 + 2048) * 2 + 1024


def test_plan_cli_takes_model_version(cli, cache_root):
    result = cli("plan", "--model-version", "2.3", "--profile", "4090", "--json",
                 env={"LOWVRAM_CACHE_DIR": str(cache_root)})  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["assumptions"][0].startswith("model: LTX-2.3")
    bad = cli("plan", "--model-version", "2.4", "--profile", "4090")
    assert bad.returncode == 2
    assert "valid versions are 2.0, 2.3, 2.5" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_one_block_of_each_release_composes_to_a_full_fake_run_within_2_percent(version):
    """The planner measures one block and composes 48: the 2.3/2.5 blocks (gates, prompt AdaLN) compose as 2.0's."""
    from lowvram.models.ltx2 import tiny_configs
    from lowvram.plan.budget import StepMeasure
    from lowvram.plan.measure import LoraSpec, TrainShape, measure_transformer_step

    flags = {k: v for k, v in tiny_configs(version)["transformer"].items() if k in (
        "gated_attn", "cross_attn_mod", "audio_gated_attn", "audio_cross_attn_mod", "use_prompt_embeddings",
        "perturbed_attn", "ff_bias", "use_keyframes_abs_pos_embedding")}  # fmt: skip
    reduced = dict(
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
        audio_in_channels=16, audio_out_channels=16, audio_num_attention_heads=4, audio_attention_head_dim=16,
        audio_cross_attention_dim=64, caption_channels=64, rope_type="split", **flags,
    )  # fmt: skip
    shape = TrainShape(batch=2, latent_frames=3, latent_height=6, latent_width=8, audio_tokens=9, text_tokens=64)
    lora = LoraSpec(rank=8, targets=("to_q", "to_k", "to_v", "to_out.0"))

    def run(layers):
        return measure_transformer_step(reduced, shape, lora, compute_dtype="fp32", checkpointing=True,
                                        num_layers=layers)  # fmt: skip

    one, full = run(1), run(3)
    step = StepMeasure(one["marks"], one["peaks"], one["flops"], one["lora_params_per_block"])
    predicted = step.activation_peak_bytes(3, one["lora_params_per_block"] * 4)
    assert predicted == pytest.approx(full["peak_bytes"], rel=0.02)
    assert full["lora_params_total"] == 3 * one["lora_params_per_block"]


def test_the_users_text_encoder_folder_sizes_the_plan_and_must_match_the_release(tmp_path, cache_root):
    from transformers import Gemma3Config, Gemma4UnifiedConfig

    from lowvram.errors import LowvramError
    from lowvram.plan import Settings, budget_settings

    # Only config.json is read: a Gemma 4 half as deep as the shipped Gemma-4-12B config, and a Gemma 3.
    Gemma4UnifiedConfig(text_config=dict(hidden_size=3840, num_hidden_layers=24, num_attention_heads=16,
                                         intermediate_size=15360, num_key_value_heads=8, head_dim=256)
                        ).save_pretrained(str(tmp_path / "gemma4"))  # fmt: skip
    Gemma3Config().save_pretrained(str(tmp_path / "gemma3"))
    profile = load_profile("4090")

    def text_encoder_bytes(cfg):
        plan = budget_settings(cfg, profile, Settings(precision="bf16"), cache_dir=cache_root / "plan")
        return plan.phases["text_cache"].vram["text encoder + connectors"]

    shipped = text_encoder_bytes(ltx("2.5"))
    own = text_encoder_bytes(ltx("2.5", **{"model.text_encoder_path": str(tmp_path / "gemma4")}))
    assert shipped - own > 8 * 2**30  # 24 fewer 3840-wide layers (~0.2B parameters each, bf16)
    with pytest.raises(LowvramError, match="LTX-2.5 reads a gemma4_unified text encoder") as e:
        plan_run(ltx("2.5", **{"model.text_encoder_path": str(tmp_path / "gemma3")}), profile,
                 cache_dir=cache_root / "plan")  # fmt: skip
    assert "\n" not in str(e.value)
