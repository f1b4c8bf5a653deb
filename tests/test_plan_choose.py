"""`plan_run` on the real 19B LTX-2 (fake-tensor measurements, cached in .pytest_cache): choices and refusals."""

from __future__ import annotations

import json

import pytest

from lowvram.config import load_config
from lowvram.errors import LowvramError
from lowvram.plan import Settings, budget_settings, plan_run
from lowvram.profiles import builtin_profile_names, load_profile


@pytest.fixture(scope="module")
def cache_dir(request):
    # Measurements are keyed by config, shapes and library versions: reusing them across runs is exact.
    return request.config.cache.mkdir("lowvram-plan-measurements")


def ltx2(batch: int = 1, **overrides):
    values = {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17, "train.batch_size": batch}
    values.update(overrides)
    cfg, _ = load_config(None, values)
    return cfg


@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_builtin_profile_fits_batch_1_or_says_exactly_what_it_lacks(name, cache_dir):
    profile = load_profile(name)
    assert_fits_or_says_what_it_lacks(plan_run(ltx2(1), profile, choose=True, cache_dir=cache_dir))


def assert_fits_or_says_what_it_lacks(plan) -> None:
    """Every phase within the usable VRAM and host RAM with a step time, or one line naming the GiB missing."""
    if plan.fits:
        for phase in plan.phases.values():
            assert phase.vram_peak_bytes - phase.vram["reserve"] <= plan.vram_usable_bytes
            assert phase.ram_peak_bytes <= plan.ram_usable_bytes
        assert plan.step_seconds_estimate > 0
    else:
        assert "needs" in plan.reason and "GiB more" in plan.reason
        assert "\n" not in plan.reason


def test_4070_fits_19b_at_batch_2_because_streaming_hides_behind_compute(cache_dir):
    profile = load_profile("4070")
    plan = plan_run(ltx2(2), profile, choose=True, cache_dir=cache_dir)
    assert plan.fits
    train = plan.phases["train"]
    weights_bytes = 18.8e9  # the transformer is ~19B parameters: even int8 would not fit 12 GB
    assert train.vram_peak_bytes < profile.vram_bytes < weights_bytes
    assert plan.step.streamed_bytes > 0
    assert plan.step.offload_overhead < 0.10
    text = " ".join(plan.explanation)
    assert "GB per step" in text and "compute" in text and "side stream" in text


def test_a_config_that_pins_settings_is_evaluated_as_given(cache_dir):
    cfg = ltx2(
        2,
        **{
            "memory.blocks_to_swap": 0,
            "memory.ramtorch": False,
            "memory.group_offload": False,
            "memory.gradient_checkpointing": True,
        },
    )
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert not plan.fits  # bf16 19B without offload on 24 GB
    assert plan.settings["memory.blocks_to_swap"] == 0 and plan.settings["model.precision"] == "bf16"
    assert plan.reason.startswith("does not fit profile '3090'") and "train needs" in plan.reason
    swap = plan_run(ltx2(2, **{"memory.blocks_to_swap": 30}), load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert swap.settings["memory.blocks_to_swap"] == 30


def test_fp8_is_refused_in_one_line_on_a_profile_without_fp8(cache_dir):
    with pytest.raises(LowvramError, match=r"fp8-torchao .*lacks") as err:
        plan_run(ltx2(1, **{"model.precision": "fp8-torchao"}), load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert "\n" not in str(err.value)


def test_a_batch_that_fits_nowhere_says_how_much_more_and_what_to_try(cache_dir):
    tiny_gpu = load_profile("4070").model_copy(update={"name": "4gb", "vram_bytes": 4 * 2**30})
    plan = plan_run(ltx2(2), tiny_gpu, choose=True, cache_dir=cache_dir)
    assert not plan.fits
    assert "train needs" in plan.reason and "GiB more VRAM" in plan.reason and "; try " in plan.reason
    assert "\n" not in plan.reason
    with pytest.raises(LowvramError):
        plan.require_fit()


def test_block_swap_moves_exactly_its_blocks_off_the_device(cache_dir):
    cfg, profile = ltx2(1), load_profile("3090")
    base = budget_settings(cfg, profile, Settings(precision="int8-torchao"), cache_dir=cache_dir)
    swap = budget_settings(
        cfg, profile, Settings(precision="int8-torchao", offload="block_swap", blocks_to_swap=10), cache_dir=cache_dir
    )
    block = base.phases["train"].vram["transformer blocks"] / 48
    saved = base.phases["train"].vram_peak_bytes - swap.phases["train"].vram_peak_bytes
    assert saved == pytest.approx(8 * block)  # 10 blocks leave, a 2-slot ring comes in
    assert swap.phases["train"].ram["swapped blocks (pinned)"] == pytest.approx(10 * block)


def test_streaming_without_async_copies_adds_the_copy_time(cache_dir):
    cfg = ltx2(1)
    s = Settings(offload="block_swap", blocks_to_swap=48)
    gpu = load_profile("3090")
    no_streams = gpu.model_copy(update={"supports": gpu.supports.model_copy(update={"streams": False})})
    overlapped = budget_settings(cfg, gpu, s, cache_dir=cache_dir).step
    serial = budget_settings(cfg, no_streams, s, cache_dir=cache_dir).step
    assert serial.seconds == pytest.approx(overlapped.compute_seconds + serial.transfer_seconds, rel=1e-6)
    assert overlapped.seconds < serial.seconds


def test_plan_json_has_the_documented_keys(cache_dir):
    plan = plan_run(ltx2(1), load_profile("4090"), choose=True, cache_dir=cache_dir)
    data = json.loads(json.dumps(plan.to_json()))
    assert {"fits", "profile", "settings", "step_seconds_estimate", "phases"} <= set(data)
    assert set(data["phases"]) == {"text_cache", "latent_cache", "load", "train", "export"}
    for phase in data["phases"].values():
        assert {"vram_peak_bytes", "ram_peak_bytes", "disk_bytes_per_item", "components"} <= set(phase)
    # settings use the run config's dotted keys, so a plan's settings can be written back as a config
    load_config(None, {k: v for k, v in data["settings"].items() if v is not None})
    # a text cache item holds the connectors' two [1024, 3840] bf16 outputs (~15.7 MB), not Gemma's 188160-wide stack
    assert data["phases"]["text_cache"]["disk_bytes_per_item"] == pytest.approx(2 * 1024 * 3840 * 2, rel=0.01)


def test_tiny_family_budgets_exact_settings_for_the_simulated_device(cache_dir):
    cfg, _ = load_config(
        None,
        {
            "model.family": "tiny",
            "model.precision": "fp32",
            "train.mixed_precision": "fp32",
            "data.resolution": "64x64",
            "data.frames": 9,
            "data.max_text_tokens": 32,
        },
    )
    profile = load_profile("cpu")
    plain = budget_settings(cfg, profile, Settings(precision="fp32"), cache_dir=cache_dir)
    swapped = budget_settings(
        cfg, profile, Settings(precision="fp32", offload="block_swap", blocks_to_swap=2), cache_dir=cache_dir
    )
    assert plain.fits and plain.phases["train"].vram["activations + LoRA grads (peak)"] > 0
    assert swapped.phases["train"].ram["swapped blocks (pinned)"] == plain.phases["train"].vram["transformer blocks"]


def test_fsdp_over_two_gpus_budgets_half_the_blocks_per_gpu(cache_dir):
    one = budget_settings(ltx2(2), load_profile("a100-80g"), Settings(), cache_dir=cache_dir)
    two = plan_run(ltx2(2), load_profile("a100-80g"), choose=True, gpus=2, cache_dir=cache_dir)
    blocks = one.phases["train"].vram["transformer blocks"]
    assert two.phases["train"].vram["transformer blocks (1/2 shard)"] == pytest.approx(blocks / 2, abs=1)
    assert two.settings["model.precision"] == "bf16" and two.settings["memory.blocks_to_swap"] == 0
    assert any("FSDP2 over 2 GPUs" in a for a in two.assumptions)


def test_plan_carries_a_config_with_its_settings_and_a_summary_line(cache_dir):
    plan = plan_run(ltx2(2), load_profile("3090"), choose=True, cache_dir=cache_dir)
    assert plan.config.memory.blocks_to_swap == plan.settings["memory.blocks_to_swap"]
    assert plan.config.model.precision == plan.settings["model.precision"]
    line = plan.summary_line()
    assert line.startswith("fits '3090' with ") and "s/step" in line and "\n" not in line


def test_gradient_accumulation_keeps_one_set_of_lora_grads_between_micro_batches(cache_dir):
    s = Settings(offload="block_swap", blocks_to_swap=30)
    one = budget_settings(ltx2(1), load_profile("3090"), s, cache_dir=cache_dir)
    acc = budget_settings(
        ltx2(1, **{"train.gradient_accumulation_steps": 4}), load_profile("3090"), s, cache_dir=cache_dir
    )
    added = acc.phases["train"].vram_peak_bytes - one.phases["train"].vram_peak_bytes
    assert added == one.phases["train"].vram["LoRA parameters"]  # grads have the parameters' size and dtype


def test_the_seeds_lowest_vram_simpletuner_config_is_evaluated_as_given(cache_dir, tmp_path):
    """SimpleTuner's 7900XTX config turns on every VAE option at once: combinations are measured, not refused."""
    from test_config import SEED_7900XTX

    path = tmp_path / "config.json"
    path.write_text(json.dumps(SEED_7900XTX))
    cfg, notes = load_config(path)
    assert cfg.memory.vae_tiling and cfg.memory.vae_patch_conv and not cfg.memory.vae_temporal_roll
    assert any("vae_temporal_roll is off" in n for n in notes)
    plan = plan_run(cfg, load_profile("7900xtx"), choose=False, cache_dir=cache_dir)
    assert plan.fits and plan.settings["memory.ramtorch"] is True
    vae = [k for k in plan.phases["latent_cache"].vram if k.startswith("VAE encode activations")]
    assert vae == ["VAE encode activations (tiling+slicing+patch_conv)"]
