"""Validation workflows (issue 19): I2V from a reference image or a dataset's first frame, S2V from an audio file or a
dataset's cached audio latents; the conditioned latents held by the sampler, clips + sidecars written, references
priced by the plan, and every bad input refused in one line before caching."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lowvram.config import apply_overrides, from_simpletuner, load_config
from lowvram.errors import ConfigError, LowvramError
from lowvram.vae import VaeOptions

BASE = {"model.family": "tiny", "data.resolution": "64x64", "data.frames": 9, "data.max_text_tokens": 8,
        "train.mixed_precision": "fp32", "validation.enabled": True, "validation.resolution": "64x64",
        "validation.num_frames": 9, "validation.guidance": 3.0}  # fmt: skip


def _cfg(**overrides):
    cfg, _ = load_config(None, {**BASE, **overrides})
    return cfg


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from matplotlib.image import imsave

    imsave(path, (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))
    return path


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(np.float32) * 0.5
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray((wave * 32767).astype(np.int16).T.reshape(1, -1), format="s16",
                                           layout="stereo")  # fmt: skip
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def parts():
    from lowvram.models.ltx2 import build_tiny_components

    return build_tiny_components(seed=0)


def _denoise(parts, cfg, inputs):
    from lowvram.models.ltx2 import encode_text
    from lowvram.models.sampling import denoise
    from lowvram.train.validation import sample_shape_for

    text = encode_text(parts, ["a cat"], 8)
    shape = sample_shape_for(cfg, parts.transformer, parts)
    with torch.no_grad():
        video, audio = denoise(parts.transformer, shape, text, text, steps=3, guidance=3.0,
                               generator=torch.Generator().manual_seed(1), device=torch.device("cpu"),
                               dtype=torch.float32, first_frame=inputs.first_frame,
                               audio_clean=inputs.audio_tokens)  # fmt: skip
    return shape, video, audio


# --------------------------------------------------------------------------------------------------------------------
# I2V and S2V through the sampler


def test_i2v_reference_of_another_size_is_cropped_like_a_clip_and_held_as_the_first_latent_frame(tmp_path, parts):
    from lowvram.data import media
    from lowvram.models.ltx2 import normalize_video_latents, pack_video_latents
    from lowvram.train.validation_inputs import encode_inputs, read_inputs

    image = write_image(tmp_path / "ref.png", 96, 48)  # 2:1, the validation clip is 64x64
    cfg = _cfg(**{"validation.reference_image": str(image)})
    inputs = read_inputs(cfg)
    assert inputs.workflow == "i2v" and inputs.pixels.shape == (3, 1, 64, 64)
    # The training clips' decoder (stills go through decode_video at 1 fps in latent_cache.encode_items).
    assert torch.equal(inputs.pixels, media.decode_video(image, fps=1.0, frames=1, width=64, height=64))
    # Covered (scaled to 128x64) and centre-cropped: the middle columns of the source survive, not a squash.
    scaled = av.open(str(image))
    frame = next(scaled.decode(video=0)).to_ndarray(format="rgb24", width=128, height=64, interpolation="AREA")
    scaled.close()
    expected = torch.from_numpy(np.ascontiguousarray(frame[:, 32:96])).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(inputs.pixels[:, 0], expected)
    encode_inputs(inputs, parts.video_vae, parts.audio_vae, tmp_path, cfg, VaeOptions())
    # As LTX2ImageToVideoPipeline: re-compressed with H.264 at CRF 33 (LTX-2.0) by diffusers' own helper, then encoded.
    from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

    rgb = ((inputs.pixels[:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(rgb, frame[:, 32:96])
    recompressed = apply_image_conditioning_crf(rgb, 33)
    assert inputs.image_crf == 33 and not np.array_equal(recompressed, rgb)
    conditioning = torch.from_numpy(recompressed.copy()).permute(2, 0, 1).float()[:, None] / 127.5 - 1.0
    with torch.no_grad():
        own = parts.video_vae.encode(conditioning[None]).latent_dist.mode()
    assert torch.equal(inputs.first_frame, pack_video_latents(normalize_video_latents(own, parts.video_vae)))
    shape, video, audio = _denoise(parts, cfg, inputs)
    n = shape.latent_height * shape.latent_width
    assert inputs.first_frame.shape == (1, n, shape.video_channels)
    assert torch.equal(video[:, :n], inputs.first_frame)  # the conditioned latent frame is the encoded reference
    assert not torch.equal(video[:, n : 2 * n], inputs.first_frame)  # the rest is generated


def test_s2v_audio_file_is_encoded_like_training_audio_and_held_through_sampling(tmp_path, parts):
    from lowvram.data.latent_cache import encode_audio_file
    from lowvram.models.ltx2 import pack_audio_latents
    from lowvram.train.validation_inputs import encode_inputs, read_inputs

    wav = write_wav(tmp_path / "voice.wav")
    cfg = _cfg(**{"validation.reference_audio": str(wav)})
    inputs = read_inputs(cfg)
    assert inputs.workflow == "s2v"
    encode_inputs(inputs, parts.video_vae, parts.audio_vae, tmp_path, cfg, VaeOptions())
    shape, video, audio = _denoise(parts, cfg, inputs)
    with torch.no_grad():
        latents, has_audio = encode_audio_file(parts.audio_vae, wav, shape.audio_tokens)
    assert has_audio and torch.equal(inputs.audio_tokens, pack_audio_latents(latents[None]))
    assert torch.equal(audio, inputs.audio_tokens)  # held at sigma 0: the sampler never moved it
    assert torch.isfinite(video).all()


def _demo(out, **overrides):
    from lowvram.demo import default_demo_config

    return apply_overrides(default_demo_config(out), {
        "train.max_train_steps": 2, "checkpoint.every_n_steps": 0, "validation.enabled": True,
        "validation.resolution": "64x64", "validation.num_frames": 9, "validation.num_inference_steps": 2,
        "validation.guidance": 3.0, **overrides})  # fmt: skip


def test_a_run_renders_i2v_and_s2v_from_a_dataset_with_the_references_encoded_at_startup(tmp_path, monkeypatch):
    from diffusers import AutoencoderKLLTX2Video
    from safetensors.torch import load_file

    from lowvram.data import media
    from lowvram.data.latent_cache import latent_path
    from lowvram.models.ltx2 import normalize_video_latents, pack_audio_latents, pack_video_latents
    from lowvram.train import run, validation, validation_inputs
    from lowvram.train.validation_inputs import conditioning_frame

    events, seen = [], {}
    real_encode, real_inputs, real_render = (AutoencoderKLLTX2Video.encode, validation_inputs.encode_inputs,
                                             validation.render_validation)  # fmt: skip

    def encode(self, *a, **k):
        events.append("video encoder")
        return real_encode(self, *a, **k)

    def encode_inputs(inputs, *a, **k):
        real_inputs(inputs, *a, **k)
        events.append("references encoded")
        seen["inputs"] = inputs

    def render(*a, **k):
        events.append("render")
        return real_render(*a, **k)

    monkeypatch.setattr(AutoencoderKLLTX2Video, "encode", encode)
    monkeypatch.setattr(validation_inputs, "encode_inputs", encode_inputs)
    monkeypatch.setattr(validation, "render_validation", render)
    threads = torch.get_num_threads()
    cfg = _demo(tmp_path / "run", **{"validation.reference_from_dataset": "dataset",
                                     "validation.reference_audio_from_dataset": "dataset"})  # fmt: skip
    try:
        assert run.run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    # The video encoder ran while caching (clips, then the reference frame), never for validation.
    assert events[-2:] == ["references encoded", "render"] and "video encoder" in events[:-2]
    step = tmp_path / "run" / "validation" / "step-2"
    assert sorted(p.name for p in step.iterdir()) == ["00.json", "00.mp4"]
    with av.open(str(step / "00.mp4")) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
    sidecar = json.loads((step / "00.json").read_text())
    clip = tmp_path / "run" / "dataset" / "clip_000.mp4"  # the dataset's first clip in discovery order
    assert sidecar["workflow"] == "i2v+s2v"
    assert sidecar["reference_image"] == sidecar["reference_audio"] == f"dataset dataset: {clip}"
    assert sidecar["prompt"] == cfg.validation.prompt and sidecar["reference_image_crf"] == 33
    # The held tokens are that clip's first frame through the run's video VAE, and its cached audio latents.
    inputs = seen["inputs"]
    vaes = run.load_encoders(cfg, run.VAE_PARTS)
    pixels = conditioning_frame(media.decode_video(clip, fps=25.0, frames=1, width=64, height=64), "2.0")
    with torch.no_grad():
        own = real_encode(vaes.video_vae, pixels[None]).latent_dist.mode()
    assert torch.allclose(inputs.first_frame, pack_video_latents(normalize_video_latents(own, vaes.video_vae)))
    item = inputs.audio_item
    cached = load_file(str(latent_path(tmp_path / "run" / "cache", item)))
    n = inputs.audio_tokens.shape[1]
    assert n == 9 and torch.equal(inputs.audio_tokens, pack_audio_latents(cached["audio_latents"][None, :, :n]))


# --------------------------------------------------------------------------------------------------------------------
# The plan prices what the workflows add


def test_plan_prices_the_reference_tokens_and_the_reference_encode(tmp_path):
    from lowvram.plan import plan_run
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import model_configs
    from lowvram.plan.validation import collect_validation
    from lowvram.profiles import load_profile

    cache = tmp_path / "plan-cache"
    t2v = collect_validation(_cfg(), model_configs("tiny"), MeasureCache(cache), attention="math", compute_dtype="fp32")
    i2v = collect_validation(_cfg(**{"validation.reference_image": "a.png"}), model_configs("tiny"),
                             MeasureCache(cache), attention="math", compute_dtype="fp32")  # fmt: skip
    t = model_configs("tiny").transformer
    assert t2v.reference_bytes == 0
    assert i2v.reference_bytes == i2v.shape.latent_height * i2v.shape.latent_width * t["in_channels"] * 4
    assert i2v.sample_peak_bytes > t2v.sample_peak_bytes  # per-token timesteps: the first frame at sigma 0
    profile = load_profile("cpu")
    small = plan_run(_cfg(**{"validation.reference_image": "a.png"}), profile, choose=False, cache_dir=cache)
    assert small.phases["latent_cache"].vram["validation reference encode (beyond a clip's)"] == 0  # a clip is more
    big = plan_run(_cfg(**{"validation.reference_image": "a.png", "validation.resolution": "256x256"}), profile,
                   choose=False, cache_dir=cache)  # fmt: skip
    assert big.phases["latent_cache"].vram["validation reference encode (beyond a clip's)"] > 0
    plain = plan_run(_cfg(), profile, choose=False, cache_dir=cache)
    assert "validation reference encode (beyond a clip's)" not in plain.phases["latent_cache"].vram


@pytest.mark.parametrize("workflow", ["i2v", "s2v"])
def test_i2v_and_s2v_under_block_swap_stay_within_5_percent_of_the_predicted_peak(tmp_path, workflow):
    from test_validation_sim import tiny_text, trained_setup_on_sim  # tests/ is on sys.path (rootdir conftest)

    from lowvram.offload.harness import tiny_plan_config
    from lowvram.plan import Settings
    from lowvram.plan.plan import predict_validation_peak
    from lowvram.plan.validation import validation_peak_bytes
    from lowvram.profiles import load_profile
    from lowvram.train.validation import render_sample, sample_shape_for

    key = {"i2v": "validation.reference_image", "s2v": "validation.reference_audio"}[workflow]
    cfg = apply_overrides(tiny_plan_config("fp32"), {
        "validation.enabled": True, "validation.resolution": "64x64", "validation.num_frames": 17,
        "validation.guidance": 3.0, "validation.num_inference_steps": 2, key: "never-read"})  # fmt: skip
    settings = Settings(precision="fp32", offload="block_swap", blocks_to_swap=3)
    predicted = validation_peak_bytes(predict_validation_peak(cfg, load_profile("cpu"), settings, num_layers=6,
                                                              cache_dir=tmp_path))  # fmt: skip
    transformer, parts, sim, _optimizer = trained_setup_on_sim(cfg, settings, 6)  # its state stays on the device
    text = tiny_text(cfg, 3)
    shape = sample_shape_for(cfg, transformer, parts)
    refs = {"first_frame": torch.randn(1, shape.latent_height * shape.latent_width, shape.video_channels)} \
        if workflow == "i2v" else {"audio_clean": torch.randn(1, shape.audio_tokens, shape.audio_channels)}  # fmt: skip
    with sim.session():
        sim.reset_counters()
        frames, wave = render_sample(transformer, parts, text, text, shape, steps=2, guidance=3.0, seed=42,
                                     backend=sim, **refs)  # fmt: skip
        measured = sim.stats().peak_bytes
    assert frames.shape == (17, 64, 64, 3) and wave is not None
    error = (predicted - measured) / measured
    print(f"\nvalidation {workflow}: measured {measured} predicted {predicted} {error:+.4f}")
    assert abs(error) <= 0.05, f"predicted {predicted} vs measured {measured} ({error:+.1%})"


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before caching or loading


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.mode": "audio", "validation.reference_image": "a.png"}, "on an audio-only run"),
        ({"train.mode": "audio", "validation.reference_from_dataset": "clips"}, "on an audio-only run"),
        ({"train.mode": "video", "validation.reference_audio": "a.wav"}, "on a run without audio (train.mode"),
        ({"data.audio": False, "validation.reference_audio_from_dataset": "clips"}, "without audio (data.audio"),
        ({"validation.reference_image": "a.png", "validation.reference_from_dataset": "clips"}, "are both set"),
        ({"validation.reference_audio": "a.wav", "validation.reference_audio_from_dataset": "c"}, "are both set"),
        ({"validation.enabled": False, "validation.reference_image": "a.png"}, "validation.enabled is false"),
    ],
)
@pytest.mark.bad_input
def test_conflicting_reference_settings_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**overrides)
    assert message in one_line(err.value) and err.value.exit_code == 2


@pytest.mark.bad_input
def test_unreadable_references_and_unknown_datasets_are_refused_in_one_line(tmp_path):
    from lowvram.train.validation_inputs import read_inputs

    (tmp_path / "clips").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not an image at all" * 10)
    image = write_image(tmp_path / "ok.png", 32, 32)
    cases = [
        ({"validation.reference_image": str(tmp_path / "missing.png")}, "missing.png: cannot read"),
        ({"validation.reference_image": str(tmp_path / "broken.png")}, "broken.png: cannot decode"),
        ({"validation.reference_audio": str(tmp_path / "missing.wav")}, "missing.wav: cannot read"),
        ({"validation.reference_audio": str(image)}, "ok.png holds no audio stream"),
        ({"validation.reference_from_dataset": "other"}, "no dataset named 'other' (datasets: clips)"),
        ({"validation.reference_audio_from_dataset": "other"}, "no dataset named 'other' (datasets: clips)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            read_inputs(_cfg(**{"data.dataset_dir": str(tmp_path / "clips"), **overrides}))
        assert message in one_line(err.value) and err.value.exit_code == 2, overrides


@pytest.mark.bad_input
def test_a_run_refuses_a_bad_reference_before_any_caching(tmp_path):
    from lowvram.train import run

    threads = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError) as err:
            run.run_train(_demo(tmp_path / "a", **{"validation.reference_image": str(tmp_path / "gone.png")}))
        assert "validation.reference_image" in one_line(err.value)
        assert not (tmp_path / "a" / "cache").exists()
        # The dataset's clips (17 frames) cache 17 audio latent frames; a 25-frame clip needs 25: refused after
        # discovery, before any model loads or any cache is written.
        with pytest.raises(LowvramError) as err:
            run.run_train(_demo(tmp_path / "b", **{"validation.num_frames": 25,
                                                    "validation.reference_audio_from_dataset": "dataset"}))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert "cache at most 17 audio latent frames, the validation clip needs 25" in one_line(err.value)
    assert err.value.exit_code == 2 and not (tmp_path / "b" / "cache" / "latents").exists()


# --------------------------------------------------------------------------------------------------------------------
# SimpleTuner keys


def test_simpletuner_dataset_and_input_image_validation_keys_are_mapped():
    nested, notes = from_simpletuner({"validation_disable": False, "validation_using_datasets": True,
                                      "eval_dataset_id": "clips"})  # fmt: skip
    assert nested["validation"] == {"enabled": True, "reference_from_dataset": "clips"}
    assert any("first frame of the first clip of 'clips'" in n for n in notes)
    entries = [{"path": "a.png", "prompt": "first"}, {"path": "a.png", "prompt": "second"}]
    nested, _ = from_simpletuner({"validation_disable": False, "validation_input": json.dumps(entries)})
    assert nested["validation"] == {"enabled": True, "reference_image": "a.png", "prompts": ["first", "second"]}
    nested, notes = from_simpletuner({"validation_using_datasets": True, "eval_dataset_id": "clips"})
    assert "validation" not in nested and any(n.startswith("ignored 'validation_using_datasets'") for n in notes)
    bad = [
        ({"validation_disable": False, "validation_using_datasets": True}, "without 'eval_dataset_id'"),
        ({"validation_disable": False, "validation_input": [{"path": "a.png", "prompt": "x"},
                                                            {"path": "b.png", "prompt": "y"}]}, "names 2 images"),
    ]  # fmt: skip
    for raw, message in bad:
        with pytest.raises(ConfigError) as err:
            from_simpletuner(raw)
        assert message in one_line(err.value)
