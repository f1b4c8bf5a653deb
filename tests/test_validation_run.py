"""Validation in a run (issue 19): a planned phase that refuses in one line, prompts cached at startup, clips with
sidecars, and no training randomness consumed (the LoRA is bit-identical with and without validation)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowvram.config import apply_overrides, load_config
from lowvram.errors import ConfigError


def _tiny_plan_cfg(**overrides):
    base = {"model.family": "tiny", "data.resolution": "64x64", "data.frames": 9, "data.max_text_tokens": 8,
            "train.mixed_precision": "fp32", "validation.enabled": True, "validation.resolution": "64x64",
            "validation.num_frames": 25}  # fmt: skip
    cfg, _ = load_config(None, {**base, **overrides})
    return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-cache")


def test_plan_has_a_validation_phase_and_refuses_a_shape_that_cannot_fit_in_one_line(cache_dir):
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    profile = load_profile("cpu")
    cfg = _tiny_plan_cfg()
    fits = plan_run(cfg, profile, choose=False, cache_dir=cache_dir)
    assert fits.fits and "validation" in fits.phases
    assert "validation" in fits.to_json()["phases"]
    need = {k: b.vram_peak_bytes - profile.reserve_bytes for k, b in fits.phases.items()}
    others = max(v for k, v in need.items() if k != "validation")
    assert need["validation"] > others  # the tiny VAE decode at 64x64x25 outweighs every other phase here
    # A card where every other phase fits but validation at this shape does not: refused before training, with the
    # longest clip that fits (17 frames: between the other phases' need and 25 frames' by construction).
    shorter = plan_run(apply_overrides(cfg, {"validation.num_frames": 17}), profile, choose=False, cache_dir=cache_dir)
    fits_17 = shorter.phases["validation"].vram_peak_bytes - profile.reserve_bytes
    usable = (max(others, fits_17) + need["validation"]) // 2
    small = profile.model_copy(update={"vram_bytes": profile.reserve_bytes + int(usable / 0.9)})
    plan = plan_run(cfg, small, choose=False, cache_dir=cache_dir)
    assert not plan.fits and plan.reason.startswith("validation at 64x64x25 needs"), plan.reason
    assert "\n" not in plan.reason and "validation.num_frames = 17 " in plan.reason
    suggested = 17
    smaller = plan_run(apply_overrides(cfg, {"validation.num_frames": suggested}), small, choose=False,
                       cache_dir=cache_dir)  # fmt: skip
    assert smaller.fits


def test_stated_validation_memory_settings_are_kept(cache_dir):
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    plan = plan_run(_tiny_plan_cfg(**{"validation.vae_tiling": True, "validation.offload_optimizer": True}),
                    load_profile("cpu"), choose=False, cache_dir=cache_dir)  # fmt: skip
    assert plan.settings["validation.vae_tiling"] is True and plan.settings["validation.offload_optimizer"] is True
    assert any("tiled" in k for k in plan.phases["validation"].vram) or plan.phases["validation"].vram


def test_validation_prompts_from_a_list_or_a_file(tmp_path):
    from lowvram.train.validation import texts_to_cache, validation_prompts

    cfg = _tiny_plan_cfg(**{"validation.prompts": ["a cat", "a dog"], "validation.negative_prompt": "blurry"})
    assert validation_prompts(cfg) == ["a cat", "a dog"]
    assert texts_to_cache(cfg) == ["a cat", "a dog", "blurry"]
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\n  second prompt \n", encoding="utf-8")
    assert validation_prompts(_tiny_plan_cfg(**{"validation.prompts": str(f)})) == ["first prompt", "second prompt"]
    with pytest.raises(ConfigError, match=r"^validation.prompts: cannot read .*missing.txt") as e:
        validation_prompts(_tiny_plan_cfg(**{"validation.prompts": str(tmp_path / "missing.txt")}))
    assert "\n" not in str(e.value)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompt"):
        validation_prompts(_tiny_plan_cfg(**{"validation.prompts": str(tmp_path / "empty.txt")}))


def _demo(out, **overrides):
    from lowvram.demo import default_demo_config

    return apply_overrides(default_demo_config(out), {"train.max_train_steps": 4, "checkpoint.every_n_steps": 0,
                                                      **overrides})  # fmt: skip


def test_validation_every_n_steps_leaves_the_lora_bit_identical_and_never_loads_gemma_again(tmp_path, monkeypatch):
    from lowvram.train import loop, run

    threads = torch.get_num_threads()
    loads = []
    real = run.load_encoders

    def recording(cfg, parts=run.ENCODER_PARTS, profile=None, **kwargs):
        loads.append(tuple(parts))
        return real(cfg, parts, profile, **kwargs)

    monkeypatch.setattr(run, "load_encoders", recording)
    try:
        assert run.run_train(_demo(tmp_path / "plain")) == 0
        loads.clear()
        with_validation = _demo(tmp_path / "val", **{
            "validation.enabled": True, "validation.every_n_steps": 2, "validation.resolution": "64x64",
            "validation.num_frames": 9, "validation.num_inference_steps": 2, "validation.guidance": 3.0,
            "validation.prompts": ["a red circle", "a blue square"], "validation.negative_prompt": "noise",
        })  # fmt: skip
        assert run.run_train(with_validation) == 0
    finally:
        torch.set_num_threads(threads)
    plain = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    validated = load_file(str(tmp_path / "val" / "lora.safetensors"))
    assert plain.keys() == validated.keys()
    assert all(torch.equal(plain[k], validated[k]) for k in plain)
    # The text encoder is loaded once, in the text-cache phase; validation loads only the VAEs and the vocoder.
    assert [p for p in loads if "text_encoder" in p] == [run.TEXT_PARTS]
    assert sorted(p.name for p in (tmp_path / "val" / "validation").iterdir()) == ["step-2", "step-4"]
    step = tmp_path / "val" / "validation" / "step-4"
    assert sorted(p.name for p in step.iterdir()) == ["00.json", "00.mp4", "01.json", "01.mp4"]
    sidecar = json.loads((step / "01.json").read_text())
    assert sidecar["prompt"] == "a blue square" and sidecar["negative_prompt"] == "noise"
    metrics = loop.read_metrics(tmp_path / "val")
    assert [("validation_seconds" in m) for m in metrics] == [False, True, False, True]
    phases = [json.loads(line) for line in (tmp_path / "val" / "memory.jsonl").read_text().splitlines()]
    assert [p["name"] for p in phases if p["type"] == "phase"].count("validation") == 2


def test_simpletuner_prompt_library_and_negative_prompt_are_mapped():
    from lowvram.config import from_simpletuner

    nested, notes = from_simpletuner({"validation_prompt_library": {"cat": "a cat", "dog": "a dog"},
                                      "validation_negative_prompt": "blurry"})  # fmt: skip
    assert nested["validation"] == {"prompts": ["a cat", "a dog"], "negative_prompt": "blurry"} and notes == []


def test_a_validation_phase_inside_train_keeps_both_peaks_apart(tmp_path):
    from lowvram.device import get_backend
    from lowvram.telemetry import MemoryMonitor

    sim = get_backend("sim")
    monitor = MemoryMonitor(tmp_path, sim)
    with sim.session():
        with monitor.phase("train"):
            step = torch.zeros(1000)  # 4000 bytes: the training step's peak
            del step
            with monitor.phase("validation"):
                sample = torch.zeros(3000)  # 12000 bytes: validation's own peak
                del sample
            after = torch.zeros(500)
            del after
    monitor.finish()
    peaks = {p.name: p.device_max_allocated_bytes for p in monitor.phases}
    assert peaks == {"train": 4000, "validation": 12000}


@pytest.mark.parametrize("mode", ["video", "audio"])
def test_single_modality_runs_render_their_modality_only(mode):
    from lowvram.device import get_backend
    from lowvram.models.ltx2 import build_tiny_components, encode_text
    from lowvram.train.validation import render_sample, sample_shape_for

    parts = build_tiny_components(seed=0)
    text = encode_text(parts, ["a cat"], 8)
    cfg = _tiny_plan_cfg(**{"train.mode": mode, "validation.num_frames": 9})
    shape = sample_shape_for(cfg, parts.transformer, parts)
    frames, wave = render_sample(parts.transformer, parts, text, text, shape, steps=2, guidance=3.0, seed=1,
                                 backend=get_backend("cpu"))  # fmt: skip
    assert (frames is None) == (mode == "audio") and (wave is None) == (mode == "video")
    if frames is not None:
        assert frames.shape == (9, 64, 64, 3) and frames.dtype == torch.uint8
    if wave is not None:
        assert wave.shape[0] == 2 and torch.isfinite(wave).all()
