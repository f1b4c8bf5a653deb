"""IC-LoRA (in-context control): the reference tokens and the loss on hand-computed tiny cases, their RoPE positions,
the loop's use of the mode, its config refusals, control-clip pairing and caching, and the planner's doubled shape
against the simulated device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lowvram.config import load_config
from lowvram.errors import ConfigError, LowvramError
from lowvram.method.modes import build_modes
from lowvram.method.modes.ic_lora import InContextControl, append_reference
from lowvram.method.objective import FlowInputs, ObjectiveConfig, flow_loss


def two_token_inputs(x0: float, noise: float, sigma: float, cond: float = 0.0) -> FlowInputs:
    """One sample, two target video tokens (2 latent frames of 1x1; the first clean when `cond`), one channel."""
    v0, vn = torch.full((1, 2, 1), x0), torch.full((1, 2, 1), noise)
    mask = torch.tensor([[1.0 - cond, 1.0]])
    noisy = (1 - sigma) * v0 + sigma * vn
    noisy[:, 0] = cond * v0[:, 0] + (1 - cond) * noisy[:, 0]
    return FlowInputs(
        video_noisy=noisy, audio_noisy=torch.zeros(1, 1, 1), video_target=vn - v0, audio_target=torch.zeros(1, 1, 1),
        video_sigma=torch.tensor([sigma]), audio_sigma=torch.tensor([0.0]), video_token_sigma=mask * sigma,
        video_loss_mask=mask, audio_loss_mask=torch.zeros(1, 1), latent_frames=2, latent_height=1, latent_width=1,
        isolate_modalities=True, train_video=True, train_audio=False,
        reference_video=torch.tensor([[[7.0], [-5.0]]]), reference_grid=(2, 1, 1),
    )  # fmt: skip


def test_reference_tokens_are_appended_clean_at_timestep_zero_and_outside_the_loss():
    inputs = two_token_inputs(x0=1.0, noise=3.0, sigma=0.5)
    out = InContextControl().prepare(inputs, predict=None, generator=torch.Generator())
    # target: (1-.5)*1 + .5*3 = 2 on both tokens; reference: its clean latents, unchanged
    assert out.video_noisy.flatten().tolist() == [2.0, 2.0, 7.0, -5.0]
    assert out.video_token_sigma.flatten().tolist() == [0.5, 0.5, 0.0, 0.0]
    assert out.video_timesteps.flatten().tolist() == [500.0, 500.0, 0.0, 0.0]
    assert out.video_loss_mask.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.video_sigma.tolist() == [0.5] and out.in_context == (2, 1, 1, 1) and out.reference_video is None
    # the loss: prediction 2.5 on the target (velocity target 3 - 1 = 2) -> 0.25, whatever the reference predicts
    cfg = ObjectiveConfig(mode="video")
    for ref_pred in (0.0, 100.0):
        pred = torch.tensor([[[2.5], [2.5], [ref_pred], [ref_pred]]])
        assert flow_loss(pred, torch.zeros(1, 1, 1), out, cfg).total.item() == pytest.approx(0.25)
    # a wrong target token counts: predictions 2.5 and 4 -> (0.25 + 4) / 2
    pred = torch.tensor([[[2.5], [4.0], [9.0], [9.0]]])
    assert flow_loss(pred, torch.zeros(1, 1, 1), out, cfg).total.item() == pytest.approx(2.125)


def test_a_clean_first_frame_stays_clean_and_only_the_noised_target_token_counts():
    out = InContextControl().prepare(two_token_inputs(1.0, 3.0, 0.5, cond=1.0), None, torch.Generator())
    assert out.video_noisy.flatten().tolist() == [1.0, 2.0, 7.0, -5.0]
    assert out.video_loss_mask.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    pred = torch.tensor([[[50.0], [2.5], [0.0], [0.0]]])  # only token 1 counts: (2.5 - 2)^2
    assert flow_loss(pred, torch.zeros(1, 1, 1), out, ObjectiveConfig(mode="video")).total.item() == pytest.approx(0.25)


@pytest.mark.bad_input
def test_control_latents_that_cannot_match_the_clip_are_refused_in_one_line():
    inputs = two_token_inputs(1.0, 3.0, 0.5)
    with pytest.raises(LowvramError, match="do not match the clip's 2x1x1"):
        append_reference(inputs, torch.zeros(1, 1, 1), (1, 1, 1), 1)
    with pytest.raises(LowvramError, match="no control latents"):
        InContextControl().prepare(replace(inputs, reference_video=None), None, torch.Generator())


def _tiny_transformer(layers: int = 2) -> torch.nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    cfg = {**tiny_configs()["transformer"], "num_layers": layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_component("transformer", cfg).eval().requires_grad_(False)


def test_reference_positions_are_the_official_grid_with_scaled_spatial_axes():
    from lowvram.models.ltx2 import reference_video_coords

    model = _tiny_transformer()
    grid = (2, 4, 6)
    coords = reference_video_coords(model, 1, grid, (2, 2, 3, 2), torch.device("cpu"), fps=25.0)
    target = model.rope.prepare_video_coords(1, *grid, torch.device("cpu"), fps=25.0)
    ref = model.rope.prepare_video_coords(1, 2, 2, 3, torch.device("cpu"), fps=25.0)
    assert coords.shape == (1, 3, 48 + 12, 2)
    assert torch.equal(coords[:, :, :48], target)
    assert torch.equal(coords[:, 0, 48:], ref[:, 0])  # time unchanged
    assert torch.equal(coords[:, 1:, 48:], ref[:, 1:] * 2)  # height and width cover the target's pixel space
    same = reference_video_coords(model, 1, grid, (2, 4, 6, 1), torch.device("cpu"), fps=25.0)
    assert torch.equal(same[:, :, 48:], target)  # at full size the reference sits on the target's positions


def test_the_transformer_attends_to_the_reference_and_the_target_stays_in_place():
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward

    model = _tiny_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, generator=g)
    text = TextEmbeddings(video=torch.randn(1, 8, 16, generator=g), audio=torch.randn(1, 8, 16, generator=g),
                          mask=torch.ones(1, 8, dtype=torch.long))  # fmt: skip

    def run(ref):
        v, _ = transformer_forward(
            model, video_tokens=torch.cat([x, ref], 1), audio_tokens=torch.zeros(1, 1, 4), text=text,
            video_sigma=torch.tensor([0.5]), audio_sigma=torch.zeros(1),
            video_token_sigma=torch.tensor([[0.5] * 4 + [0.0] * 4]), latent_frames=1, latent_height=2,
            latent_width=2, fps=25.0, isolate_modalities=True, in_context=(1, 2, 2, 1),
        )  # fmt: skip
        return v

    a, b = run(torch.randn(1, 4, 8, generator=g)), run(torch.randn(1, 4, 8, generator=g))
    assert a.shape == (1, 8, 8)
    assert not torch.allclose(a[:, :4], b[:, :4])  # the control changes the target's prediction


# --------------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_mode_built_only_when_enabled():
    cfg, _ = load_config(None, {})
    assert (cfg.ic_lora.enabled, cfg.ic_lora.control_dir, cfg.ic_lora.reference_downscale) == (False, "control", 1)
    assert build_modes(cfg) == ()
    on, _ = load_config(None, {"ic_lora.enabled": True, "scheduled_sampling.enabled": True})
    assert [m.name for m in build_modes(on)] == ["ic_lora", "scheduled_sampling"]  # the rollout sees the reference


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.mode": "audio"}, "train.mode = 'audio' has no video tokens"),
        ({"train.tread_routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]},
         "would route \\(drop\\) the IC-LoRA reference tokens"),
        ({"validation.enabled": True}, "without a control clip"),
        ({"ic_lora.reference_downscale": 2}, "multiples of 64 .* got 832x480"),
    ],
)  # fmt: skip
@pytest.mark.bad_input
def test_impossible_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, {"ic_lora.enabled": True, **overrides})
    assert "\n" not in str(err.value)
    load_config(None, {"ic_lora.enabled": True, "data.resolution": "768x512", "ic_lora.reference_downscale": 2})


# --------------------------------------------------------------------------------------------------------------------
# The plan


def _tiny_ic_config(**extra):
    from lowvram.config import apply_overrides
    from lowvram.offload.harness import tiny_plan_config

    return apply_overrides(tiny_plan_config("fp32"), {"ic_lora.enabled": True, **extra})


def test_the_plan_measures_the_doubled_sequence(tmp_path):
    from lowvram.config import apply_overrides
    from lowvram.plan.measure import MeasureCache, model_configs
    from lowvram.plan.plan import collect_measurements, run_shape

    cfg = _tiny_ic_config()
    plain = apply_overrides(cfg, {"ic_lora.enabled": False})
    shape, base = run_shape(cfg, model_configs("tiny")), run_shape(plain, model_configs("tiny"))
    assert shape.video_tokens == 2 * base.video_tokens and shape.in_context == (2, 2, 2, 1)
    assert base.key() == {k: v for k, v in base.__dict__.items() if k != "reference_hw"}  # plain keys unchanged
    m, p = (collect_measurements(c, _cpu(), MeasureCache(tmp_path)) for c in (cfg, plain))
    # the block's attention and per-token activations grow with the doubled sequence
    assert m.step[True].peaks["block_fwd"] > p.step[True].peaks["block_fwd"]
    assert m.step[True].flops["block_fwd"] > 1.5 * p.step[True].flops["block_fwd"]  # audio and text do not double
    assert m.latent_item_bytes > p.latent_item_bytes  # the control latents are cached too


def _cpu():
    from lowvram.profiles import load_profile

    return load_profile("cpu")


SIM_CASES = {  # (strategy as the offload harness names it, blocks, streamed share)
    "no_offload": ("none", 4, 1.0),
    "streaming_all": ("streaming", 4, 1.0),
    "block_swap_all_but_one": ("block_swap_all_but_one", 4, 1.0),
}


def _simulated_ic_step_peak(cfg, settings, blocks: int) -> int:
    """A real IC-LoRA training step (the mode's `prepare`, forward, the objective's loss, backward) of the tiny
    model on the simulated device, at the target shape the planner derives from `cfg` plus its control latents."""
    from lowvram.device import get_backend
    from lowvram.models.ltx2 import transformer_forward
    from lowvram.offload.harness import flow_inputs_on, planned_model_on

    sim = get_backend("sim")
    # the target grid (the planner's shape less the reference tokens)
    transformer, batch = planned_model_on(sim, cfg, settings, num_layers=blocks)
    with sim.session():
        sim.reset_counters()
        b, s_v = batch.video.shape[:2]
        text, inputs = flow_inputs_on(
            sim, batch, reference_video=sim.to_device(torch.randn(b, s_v, batch.video.shape[2])),
            reference_grid=(batch.frames, batch.height, batch.width),
        )  # fmt: skip
        inputs = InContextControl().prepare(inputs, None, torch.Generator())
        video_pred, audio_pred = transformer_forward(
            transformer, video_tokens=inputs.video_noisy, audio_tokens=inputs.audio_noisy, text=text,
            video_sigma=inputs.video_sigma, audio_sigma=inputs.audio_sigma, video_token_sigma=inputs.video_token_sigma,
            latent_frames=inputs.latent_frames, latent_height=inputs.latent_height, latent_width=inputs.latent_width,
            fps=25.0, in_context=inputs.in_context,
        )  # fmt: skip
        flow_loss(video_pred, audio_pred, inputs, ObjectiveConfig()).total.backward()
        return sim.stats().peak_bytes


@pytest.mark.parametrize("case", sorted(SIM_CASES))
def test_the_planned_ic_lora_step_peak_matches_the_simulated_device_within_5_percent(case, tmp_path_factory):
    from lowvram.offload.harness import plan_settings, planner_step_peak_bytes

    strategy, blocks, share = SIM_CASES[case]
    cache = tmp_path_factory.getbasetemp() / "ic-lora-plan-cache"
    cfg = _tiny_ic_config()
    settings = plan_settings(strategy, "fp32", checkpointing=True, num_blocks=blocks, share=share)
    predicted = planner_step_peak_bytes(cfg, settings, num_layers=blocks, cache_dir=cache)
    measured = _simulated_ic_step_peak(cfg, settings, blocks)
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


# --------------------------------------------------------------------------------------------------------------------
# In the loop


def _batches(with_reference: bool = True):
    from lowvram.train.batches import CachedBatches, CachedSample

    g = torch.Generator().manual_seed(123)
    samples = [
        CachedSample(
            video=torch.randn(12, 8, generator=g), audio=torch.randn(5, 4, generator=g),
            text_video=torch.randn(8, 16, generator=g), text_audio=torch.randn(8, 16, generator=g),
            text_mask=torch.ones(8, dtype=torch.long), latent_frames=3, latent_height=2, latent_width=2, fps=25.0,
            reference=torch.randn(12, 8, generator=g) if with_reference else None,
            reference_grid=(3, 2, 2) if with_reference else None,
        )  # fmt: skip
        for _ in range(3)
    ]
    return CachedBatches(samples, batch_size=2, seed=7)


def _config(run_dir, enabled=True):
    from lowvram.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "data": {"resolution": "64x64"},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 1e-3},
            "train": {"batch_size": 2, "max_train_steps": 2, "seed": 7, "mixed_precision": "fp32"},
            "ic_lora": {"enabled": enabled},
            "output": {"output_dir": str(run_dir)},
        }
    )


def test_the_loop_trains_on_target_plus_reference_tokens_and_exports_a_plain_lora(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowvram.train.loop import export_lora, fit

    model = _tiny_transformer(layers=4)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[1], kw["timestep"].clone())), with_kwargs=True
    )
    fit(_config(tmp_path / "a"), model, _batches(), run_dir=tmp_path / "a")
    assert len(seen) == 2
    for tokens, timestep in seen:
        assert tokens == 24  # 12 target + 12 reference tokens
        assert torch.all(timestep[:, 12:] == 0) and torch.all(timestep[:, :12] > 0)
    plain = _tiny_transformer(layers=4)
    fit(_config(tmp_path / "b", enabled=False), plain, _batches(with_reference=False), run_dir=tmp_path / "b")
    ic_file, plain_file = export_lora(model, tmp_path / "ic.safetensors", _config(tmp_path / "a")), export_lora(
        plain, tmp_path / "plain.safetensors", _config(tmp_path / "b", enabled=False))  # fmt: skip
    # the same LoRA layout as a plain LoRA (diffusers loads both alike), with the official trainer's metadata key
    assert load_file(str(ic_file)).keys() == load_file(str(plain_file)).keys()
    with safe_open(str(ic_file), "pt") as f:
        assert f.metadata()["reference_downscale_factor"] == "1"
    with safe_open(str(plain_file), "pt") as f:
        assert "reference_downscale_factor" not in f.metadata()
    from diffusers import LTX2InContextPipeline  # diffusers 0.42.1's IC-LoRA pipeline (there is no LTX2ICLoraPipeline)

    loaded = LTX2InContextPipeline.lora_state_dict(str(ic_file))
    assert len(loaded) == len(load_file(str(ic_file))) and all(k.startswith("transformer.") for k in loaded)
    with pytest.raises(LowvramError, match="no control latents"):
        fit(_config(tmp_path / "c"), _tiny_transformer(4), _batches(with_reference=False), run_dir=tmp_path / "c")


# --------------------------------------------------------------------------------------------------------------------
# Datasets: control clips paired by name, cached beside the clip's latents


def _ic_data(folder, control_dir=None, downscale: int = 1, resolution=(64, 64)):
    from types import SimpleNamespace

    from lowvram.data.spec import DataConfig, folder_dataset, with_ic_lora

    ic = SimpleNamespace(enabled=True, control_dir=control_dir or "control", reference_downscale=downscale)
    return with_ic_lora(DataConfig((folder_dataset(folder, resolution=resolution, frames=9),)), ic, "test")


def test_control_clips_are_paired_by_stem_and_cached_beside_the_clips_latents(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from lowvram.data.build import build_caches
    from lowvram.data.synthetic import make_synthetic_dataset
    from lowvram.models.ltx2 import build_tiny_components
    from lowvram.train.batches import DiskBatches

    clips = tmp_path / "clips"
    make_synthetic_dataset(clips, n_clips=3, width=64, height=64, frames=9, seed=0)
    make_synthetic_dataset(clips / "control", n_clips=3, width=64, height=64, frames=9, seed=5)
    (clips / "control" / "clip_002.mp4").unlink()  # one clip without its control clip
    for txt in (clips / "control").glob("*.txt"):
        txt.unlink()
    tiny = build_tiny_components(seed=0)
    summary = build_caches(_ic_data(clips, downscale=2), tiny, tmp_path / "cache", max_text_tokens=8)
    assert len(summary.items) == 2
    [skip] = summary.skipped  # one line at startup, naming the missing file
    assert skip.path.name == "clip_002.mp4"
    assert f"missing control clip {clips / 'control' / 'clip_002'}.*" in skip.reason
    entry = load_file(str(summary.items[0].latent_path))
    video, ref = entry["video_latents"], entry["reference_latents"]
    assert video.shape[1:] == (2, 2, 2) and ref.shape == (video.shape[0], 2, 1, 1)  # same frames, half the sides
    batch = next(DiskBatches(summary.items, 1, seed=0, fps=25.0))
    assert batch.reference.shape == (1, 2, video.shape[0]) and batch.reference_grid == (2, 1, 1)
    # the entry's key covers the control clip: a new control clip rebuilds it, the clip's other entries are reused
    shutil.copy(clips / "control" / "clip_001.mp4", clips / "control" / "clip_000.mp4")
    again = build_caches(_ic_data(clips, downscale=2), tiny, tmp_path / "cache", max_text_tokens=8)
    assert again.latents_rebuilt == {"stale": 1} and again.latents_reused == 1


def test_control_clips_that_cannot_match_are_skipped_with_the_reason(tmp_path):
    from lowvram.data.dataset import discover
    from lowvram.data.synthetic import make_synthetic_dataset

    clips = tmp_path / "clips"
    make_synthetic_dataset(clips, n_clips=2, width=64, height=64, frames=17)
    make_synthetic_dataset(clips / "control", n_clips=1, width=64, height=64, frames=9)  # too short
    make_synthetic_dataset(tmp_path / "wide", n_clips=2, width=128, height=64, frames=17)
    (tmp_path / "wide" / "clip_001.mp4").replace(clips / "control" / "clip_001.mp4")  # another aspect ratio
    from dataclasses import replace

    data = _ic_data(clips)
    data = replace(data, datasets=(replace(data.datasets[0], video=replace(data.datasets[0].video, num_frames=17)),))
    items, skipped = discover(data)
    assert items == []
    reasons = {s.path.name: s.reason for s in skipped}
    assert "has 9 frames at 25 fps, the clip trains 17" in reasons["clip_000.mp4"]
    assert "is 128x64, the clip 64x64: give it the clip's aspect ratio" in reasons["clip_001.mp4"]


def test_simpletuner_conditioning_datasets_pair_control_clips(tmp_path):
    from types import SimpleNamespace

    from lowvram.data.spec import parse_multidatabackend, with_ic_lora

    raw = [
        {"id": "clips", "instance_data_dir": "clips", "conditioning_data": ["canny"]},
        {"id": "canny", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "canny", "source_dataset_id": "clips"},
    ]  # fmt: skip
    data = parse_multidatabackend(raw, base_dir=tmp_path)
    [spec] = data.datasets
    assert spec.control_dir == tmp_path / "canny"
    on = SimpleNamespace(enabled=True, control_dir="control", reference_downscale=2)
    assert with_ic_lora(data, on, "m.json").datasets[0].control_downscale == 2
    with pytest.raises(ConfigError, match="dataset 'clips' links conditioning data: set ic_lora.enabled = true"):
        with_ic_lora(data, SimpleNamespace(enabled=False), "m.json")
    with pytest.raises(ConfigError, match="conditioning_type 'mask' is not supported"):
        parse_multidatabackend([raw[0], {**raw[1], "conditioning_type": "mask"}], base_dir=tmp_path)
    with pytest.raises(ConfigError, match="links conditioning dataset 'depth', which is not defined"):
        parse_multidatabackend([{**raw[0], "conditioning_data": "depth"}, raw[1]], base_dir=tmp_path)
    audio = [{"id": "sounds", "instance_data_dir": "s", "dataset_type": "audio"}]
    with pytest.raises(ConfigError, match="dataset 'sounds' is audio-only, which IC-LoRA cannot condition"):
        with_ic_lora(parse_multidatabackend(audio, base_dir=tmp_path), on, "m.json")
