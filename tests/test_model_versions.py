"""LTX-2.0 / 2.3 / 2.5 as model versions: configs with sources, tiny members that train, forward semantics, detection
from a checkpoint, the official key layout both ways, LoRA export per version, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram.config import load_config
from lowvram.errors import ConfigError, LowvramError
from lowvram.method import lora
from lowvram.models import ltx2, versions
from lowvram.models import ltx2 as ck

CONFIGS = Path(ck.__file__).parent.parent / "configs"
VERSIONS = ("2.0", "2.3", "2.5")


@pytest.fixture(scope="module")
def tiny():
    return {v: ltx2.build_tiny_components(seed=0, version=v) for v in VERSIONS}


# --------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("version", VERSIONS)
def test_every_component_config_of_every_version_ships_with_its_source(version):
    folder = CONFIGS / f"ltx-{version}"
    for name in (*ck.CHECKPOINT_COMPONENTS, "text_encoder"):
        raw = json.loads((folder / f"{name}.json").read_text())
        assert raw["_source"], (version, name)
    cfgs = ck.family_configs("ltx2", version)
    assert versions.version_of_transformer_config(cfgs["transformer"]) == version


def test_release_flags_are_the_conversion_scripts():
    t = {v: ck.family_configs("ltx2", v)["transformer"] for v in VERSIONS}
    assert not t["2.0"]["gated_attn"] and t["2.0"]["use_prompt_embeddings"]
    for v in ("2.3", "2.5"):
        assert t[v]["gated_attn"] and t[v]["cross_attn_mod"] and not t[v]["use_prompt_embeddings"]
    assert t["2.3"].get("ff_bias", True) and t["2.5"]["ff_bias"] is False
    assert t["2.5"]["use_keyframes_abs_pos_embedding"]
    c = {v: ck.family_configs("ltx2", v)["connectors"] for v in VERSIONS}
    assert not c["2.0"]["per_modality_projections"] and c["2.3"]["per_modality_projections"]
    assert ck.family_configs("ltx2", "2.5")["text_encoder"]["model_type"] == "gemma4_unified"
    assert "bwe_hidden_channels" in ck.family_configs("ltx2", "2.3")["vocoder"]


def test_text_embedding_widths_are_the_connector_outputs_per_version(tiny):
    real = {v: ltx2.text_embedding_widths(ck.family_configs("ltx2", v)["transformer"]) for v in VERSIONS}
    assert real == {"2.0": (3840, 3840), "2.3": (4096, 2048), "2.5": (4096, 2048)}
    for comps in tiny.values():
        emb = ltx2.encode_text(comps, ["a red circle"], 32)
        assert (emb.video.shape[-1], emb.audio.shape[-1]) == ltx2.text_embedding_widths(comps.transformer.config)


# --------------------------------------------------------------------------------------------------------------------
# model.version in the config


def test_model_version_is_validated_and_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'model.version': unknown LTX-2 model version '2.4': valid versions are "
                       r"2.0, 2.3, 2.5"):  # fmt: skip
        load_config(None, {"model.version": "2.4"})
    cfg, _ = load_config(None, {"model.version": 2.3})
    assert cfg.model.version == "2.3"
    assert load_config(None, {})[0].model.version is None


@pytest.mark.parametrize(
    "flavour, version, ckpt_flavour",
    [("dev", "2.0", "dev"), ("dev-fp8", "2.0", "dev-fp8"), ("2.0", "2.0", "dev"), ("2.3", "2.3", "dev"),
     ("2.3-distilled", "2.3", "distilled"), ("2.5-dev-fp8", "2.5", "dev-fp8")],
)  # fmt: skip
def test_simpletuner_model_flavour_names_the_version(tmp_path, flavour, version, ckpt_flavour):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "ltxvideo2", "model_flavour": flavour, "model_type": "lora"}))
    cfg, _ = load_config(path)
    assert (cfg.model.version, cfg.model.flavour) == (version, ckpt_flavour)


def test_unknown_simpletuner_flavour_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "ltxvideo2", "model_flavour": "2.4"}))
    with pytest.raises(ConfigError, match="model_flavour '2.4' is not an LTX-2 flavour") as e:
        load_config(path)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------------
# Forward semantics as data


def _call(transformer, text, use_cross_timestep):
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 12, 8, generator=g), torch.randn(2, 5, 4, generator=g)
    vs, as_ = torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1])
    with torch.no_grad():
        ours = ltx2.transformer_forward(transformer, video_tokens=video, audio_tokens=audio, text=text,
                                        video_sigma=vs, audio_sigma=as_, latent_frames=3, latent_height=2,
                                        latent_width=2, fps=25.0)  # fmt: skip
        ref = transformer(
            hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=text.video,
            audio_encoder_hidden_states=text.audio, encoder_attention_mask=text.mask,
            audio_encoder_attention_mask=text.mask, timestep=vs.view(2, 1).expand(2, 12) * 1000,
            audio_timestep=as_ * 1000, sigma=vs * 1000, audio_sigma=as_ * 1000, num_frames=3, height=2, width=2,
            fps=25.0, audio_num_frames=5, use_cross_timestep=use_cross_timestep, return_dict=False,
        )  # fmt: skip
    return ours, ref


@pytest.mark.parametrize("version, cross", [("2.0", False), ("2.3", True), ("2.5", True)])
def test_forward_takes_the_cross_timestep_of_its_version(tiny, version, cross):
    comps = tiny[version]
    # Non-zero gates and modulation, so the cross-attention and its timestep reach the output.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        t = ltx2.build_component("transformer", ltx2.tiny_configs(version)["transformer"]).eval()
        for name, p in t.named_parameters():
            if "scale_shift_table" in name or "gate" in name:
                p.data.normal_()
    text = ltx2.encode_text(comps, ["a red circle", "a blue square"], 32)
    (v, a), (rv, ra) = _call(t, text, cross)
    assert torch.equal(v, rv) and torch.equal(a, ra)
    (_, _), (ov, oa) = _call(t, text, not cross)
    assert not torch.equal(v, ov) or not torch.equal(a, oa)


def test_a_transformer_config_of_no_version_is_named():
    with pytest.raises(LowvramError, match="matches no LTX-2 version"):
        versions.version_of_transformer_config({"gated_attn": True, "cross_attn_mod": False})


# --------------------------------------------------------------------------------------------------------------------
# A full LoRA step per version: text encoder + connectors + VAE encode -> cached sample -> trainer step


@pytest.mark.parametrize("version", VERSIONS)
def test_a_full_lora_step_runs_on_the_tiny_member_of_each_version(tmp_path, tiny, version):
    from lowvram.config import RunConfig
    from lowvram.train.batches import CachedBatches, CachedSample
    from lowvram.train.loop import fit

    comps = tiny[version]
    text = ltx2.encode_text(comps, ["a red circle moves left", "a blue square"], 32)
    with torch.no_grad():
        z = comps.video_vae.encode(torch.randn(2, 3, 17, 64, 64)).latent_dist.mode()
        mel = torch.randn(2, 2, 20, 8)
        za = comps.audio_vae.encode(mel).latent_dist.mode()
    video = ltx2.pack_video_latents(ltx2.normalize_video_latents(z, comps.video_vae))
    audio = ltx2.normalize_audio_latents(ltx2.pack_audio_latents(za), comps.audio_vae)
    samples = [
        CachedSample(
            video=video[i],
            audio=audio[i],
            text_video=text.video[i],
            text_audio=text.audio[i],
            text_mask=text.mask[i],
            latent_frames=z.shape[2],
            latent_height=z.shape[3],
            latent_width=z.shape[4],
        )  # fmt: skip
        for i in range(2)
    ]
    cfg = RunConfig.model_validate(
        {
            "model": {"family": "tiny", "version": version},
            "lora": {"rank": 4},
            "train": {"batch_size": 2, "max_train_steps": 1, "mixed_precision": "fp32"},
            "output": {"output_dir": str(tmp_path)},
        }
    )
    transformer = ltx2.build_tiny_components(seed=0, version=version).transformer
    results = fit(cfg, transformer, CachedBatches(samples, batch_size=2, seed=0), run_dir=tmp_path)
    assert len(results) == 1 and torch.isfinite(torch.tensor(results[0].loss))
    trained = [p for n, p in transformer.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # B starts at 0: the step moved it


# --------------------------------------------------------------------------------------------------------------------
# The official single-file layout, both ways


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_tiny_single_file_round_trips_with_the_official_names(tmp_path, tiny, version):
    comps = tiny[version]
    path = tmp_path / "tiny.safetensors"
    ck.save_single_file(comps, path, family="tiny")  # no version in the metadata: read from the keys
    keys = set(load_file(str(path)))
    for official in (
        "model.diffusion_model.transformer_blocks.0.attn1.to_gate_logits.weight",
        "model.diffusion_model.transformer_blocks.0.audio_to_video_attn.to_gate_logits.bias",
        "model.diffusion_model.prompt_adaln_single.linear.weight",
        "model.diffusion_model.audio_prompt_adaln_single.emb.timestep_embedder.linear_1.weight",
        # top level, as ltx-core's EMBEDDINGS_PROCESSOR_KEY_OPS reads them (encoder_configurator.py)
        "text_embedding_projection.video_aggregate_embed.weight",
        "text_embedding_projection.audio_aggregate_embed.bias",
        "model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_gate_logits.weight",
        "vae.decoder.up_blocks.7.conv.conv.weight",
        "vae.decoder.up_blocks.8.res_blocks.0.conv1.conv.weight",
        "vocoder.vocoder.ups.0.weight",
        "vocoder.bwe_generator.ups.0.weight",
        "vocoder.vocoder.act_post.act.alpha",
        "vocoder.bwe_generator.resblocks.0.acts1.0.downsample.lowpass.filter",
        "vocoder.mel_stft.mel_basis",
    ):
        assert official in keys, official
    if version == "2.5":
        assert "model.diffusion_model.keyframes_abs_pos_embedding" in keys
        assert "model.diffusion_model.transformer_blocks.0.ff.net.0.proj.bias" not in keys
    source = ck.open_checkpoint(path)
    assert source.version == version
    loaded = ck.load_components(path, components=ck.CHECKPOINT_COMPONENTS, dtype=torch.float32)
    for name in ck.CHECKPOINT_COMPONENTS:
        want, got = getattr(comps, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert type(loaded.vocoder).__name__ == "LTX2VocoderWithBWE"


@pytest.fixture(scope="module")
def real_on_meta():
    return {v: {n: ltx2.build_on_meta(n, version=v) for n in ck.CHECKPOINT_COMPONENTS} for v in ("2.3", "2.5")}


@pytest.mark.parametrize("version", ("2.3", "2.5"))
@pytest.mark.parametrize("name", ck.CHECKPOINT_COMPONENTS)
def test_official_layout_round_trips_for_the_real_model_keys(real_on_meta, version, name):
    keys = list(real_on_meta[version][name].state_dict())
    official = ck.diffusers_to_official(name, keys)  # raises if the forward map does not give them back
    assert len(official) == len(keys)
    assert versions.versions_of_component(name, set(keys)) >= {version}


def test_2_5_checkpoint_without_keyframe_embedding_loads_as_2_5_0(tmp_path, tiny):
    path = tmp_path / "full.safetensors"
    ck.save_single_file(tiny["2.5"], path, family="tiny")
    sd = load_file(str(path))
    del sd["model.diffusion_model.keyframes_abs_pos_embedding"]
    save_file(sd, str(tmp_path / "250.safetensors"), metadata={"lowvram_family": "tiny"})
    t = ck.load_components(tmp_path / "250.safetensors", components=("transformer",), dtype=torch.float32).transformer
    assert t.config.use_keyframes_abs_pos_embedding is False


# --------------------------------------------------------------------------------------------------------------------
# Detection and refusals (one line each)


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_version_is_detected_and_a_stated_one_is_checked(tmp_path, tiny):
    path = tmp_path / "t.safetensors"
    ck.save_single_file(tiny["2.3"], path, family="tiny")
    assert ck.open_checkpoint(path).version == "2.3"
    assert ck.open_checkpoint(path, version="2.3").version == "2.3"
    with pytest.raises(LowvramError) as e:
        ck.open_checkpoint(path, version="2.0")
    assert "model.version is 2.0" in _one_line(e) and "LTX-2.3" in str(e.value)


def test_a_23_transformer_with_a_20_vae_is_refused_naming_both(tmp_path, tiny):
    new, old = tmp_path / "23.safetensors", tmp_path / "20.safetensors"
    ck.save_single_file(tiny["2.3"], new, family="tiny")
    ck.save_single_file(tiny["2.0"], old, family="tiny")
    a, b = load_file(str(new)), load_file(str(old))
    mixed = {k: v for k, v in a.items() if not k.startswith("vae.")} | {k: v for k, v in b.items() if k[:4] == "vae."}
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata={"lowvram_family": "tiny"})
    with pytest.raises(LowvramError) as e:
        ck.open_checkpoint(tmp_path / "mixed.safetensors")
    msg = _one_line(e)
    assert "transformer is LTX-2.3" in msg and "video_vae is LTX-2.0" in msg
    # ... and the reverse
    mixed = {k: v for k, v in b.items() if not k.startswith("vae.")} | {k: v for k, v in a.items() if k[:4] == "vae."}
    save_file(mixed, str(tmp_path / "mixed2.safetensors"), metadata={"lowvram_family": "tiny"})
    with pytest.raises(LowvramError) as e:
        ck.open_checkpoint(tmp_path / "mixed2.safetensors")
    assert "transformer is LTX-2.0" in _one_line(e) and "video_vae is LTX-2.3/2.5" in str(e.value)


def test_metadata_that_contradicts_the_weights_is_refused(tmp_path, tiny):
    path = tmp_path / "t.safetensors"
    ck.save_single_file(tiny["2.3"], path, family="tiny")
    sd = load_file(str(path))
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata={"lowvram_family": "tiny", "model_version": "2.5.1"})
    with pytest.raises(LowvramError) as e:
        ck.open_checkpoint(tmp_path / "lie.safetensors")
    assert "metadata says LTX-2.5 but its weights are LTX-2.3" in _one_line(e)
    save_file(sd, str(tmp_path / "ok.safetensors"), metadata={"lowvram_family": "tiny", "model_version": "2.3.0"})
    assert ck.open_checkpoint(tmp_path / "ok.safetensors").version == "2.3"


def test_a_file_matching_no_version_is_one_clear_line(tmp_path, tiny):
    path = tmp_path / "t.safetensors"
    ck.save_single_file(tiny["2.0"], path, family="tiny")
    sd = load_file(str(path))
    sd["model.diffusion_model.transformer_blocks.0.attn1.to_gate_logits.weight"] = torch.zeros(2, 16)
    save_file(sd, str(tmp_path / "odd.safetensors"), metadata={"lowvram_family": "tiny"})
    with pytest.raises(LowvramError) as e:
        ck.open_checkpoint(tmp_path / "odd.safetensors")
    assert "its transformer weights match no LTX-2 version (2.0, 2.3, 2.5)" in _one_line(e)


def test_a_gemma3_folder_for_ltx_2_5_is_refused_naming_both(tmp_path, tiny):
    ck.save_text_encoder(tiny["2.0"], tmp_path / "gemma3")
    with pytest.raises(LowvramError) as e:
        ck.check_text_encoder_version(tmp_path / "gemma3", "2.5")
    assert "LTX-2.5 reads a gemma4_unified text encoder" in _one_line(e) and "holds gemma3" in str(e.value)
    ck.check_text_encoder_version(tmp_path / "gemma3", "2.3")


def test_the_2_5_text_encoder_is_gemma4_and_loads_from_its_folder(tmp_path, tiny):
    ck.save_text_encoder(tiny["2.5"], tmp_path / "g4")
    te = ck.load_text_encoder(tmp_path / "g4", torch.float32)
    assert type(te).__name__ == "Gemma4UnifiedForConditionalGeneration"
    want = tiny["2.5"].text_encoder.state_dict()
    assert all(torch.equal(want[k], v) for k, v in te.state_dict().items())


def test_a_lora_trained_on_one_version_is_not_resumed_on_another(tmp_path, tiny):
    from lowvram.config import RunConfig
    from lowvram.train.batches import CachedBatches, CachedSample
    from lowvram.train.loop import fit

    def run(version, resume=None):
        width_v, width_a = ltx2.text_embedding_widths(ltx2.tiny_configs(version)["transformer"])
        g = torch.Generator().manual_seed(0)
        samples = [
            CachedSample(video=torch.randn(12, 8, generator=g), audio=torch.randn(5, 4, generator=g),
                         text_video=torch.randn(8, width_v, generator=g),
                         text_audio=torch.randn(8, width_a, generator=g),
                         text_mask=torch.ones(8, dtype=torch.long), latent_frames=3, latent_height=2, latent_width=2)
            for _ in range(2)
        ]  # fmt: skip
        cfg = RunConfig.model_validate(
            {
                "model": {"family": "tiny", "version": version},
                "lora": {"rank": 2},
                "train": {"batch_size": 2, "max_train_steps": 2, "mixed_precision": "fp32"},
                "checkpoint": {"every_n_steps": 1, "resume": resume},
                "output": {"output_dir": str(tmp_path)},
            }
        )
        t = ltx2.build_tiny_components(seed=0, version=version).transformer
        return fit(cfg, t, CachedBatches(samples, batch_size=2, seed=0), run_dir=tmp_path, stop_after=1)

    run("2.0")
    with pytest.raises(LowvramError) as e:
        run("2.3", resume="latest")
    assert "was trained on LTX-2.0; this run is LTX-2.3" in _one_line(e)


# --------------------------------------------------------------------------------------------------------------------
# LoRA export per version: official names, loaded by diffusers' pipeline with every module adapted


def _pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=comps.video_vae, audio_vae=comps.audio_vae,
        text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, connectors=comps.connectors,
        transformer=comps.transformer, vocoder=comps.vocoder,
    )  # fmt: skip


@pytest.mark.parametrize("version", ("2.3", "2.5"))
@pytest.mark.parametrize("lora_format", ["comfy", "diffusers"])
def test_exported_lora_of_each_version_loads_in_diffusers_with_every_module_adapted(tmp_path, version, lora_format):
    comps = ltx2.build_tiny_components(seed=0, version=version)
    text = ltx2.encode_text(comps, ["a red circle", "a blue square"], 32)
    t = ltx2.build_tiny_components(seed=0, version=version).transformer
    names = lora.inject_lora(t, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    for layer in lora.lora_layers(t).values():
        w = layer.lora_B[lora.ADAPTER].weight
        w.data = 0.1 * torch.randn(w.shape, generator=g)
    ours = _call(t, text, version != "2.0")[0]
    path = lora.export_lora(t, tmp_path / "lora.safetensors", lora_format=lora_format, dtype="fp32")  # exactness
    pipe = _pipeline(comps)
    pipe.load_lora_weights(str(path))
    adapted = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted == set(names)
    theirs = _call(pipe.transformer, text, version != "2.0")[0]
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_exported_names_are_official_for_the_real_size_model(version):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    t = ltx2.build_on_meta("transformer", version=version)
    names = lora.inject_lora(t, rank=4)
    official = {v: k for k, v in ck.diffusers_to_official("transformer", names).items()}
    comfy = {f"diffusion_model.{official[n].removeprefix('model.diffusion_model.')}.lora_A.weight": 0 for n in names}
    # diffusers' own LTX-2.x LoRA converter (it knows the 2.3 names) maps them back onto the real model's modules.
    back = _convert_non_diffusers_ltx2_lora_to_diffusers(comfy)
    assert {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in back} == set(names)
    assert len(names) == 48 * 6 * 4


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_validation_renders_a_clip_with_each_release(tmp_path, tiny, version):
    import av

    from lowvram.config import RunConfig
    from lowvram.device import get_backend
    from lowvram.train.validation import ValidationJob, render_validation

    comps = tiny[version]
    cfg = RunConfig.model_validate(
        {
            "model": {"family": "tiny", "version": version},
            "data": {"max_text_tokens": 32},
            "validation": {"resolution": "64x64", "num_frames": 9, "num_inference_steps": 2, "prompt": "a red circle"},
        }
    )
    from lowvram.data.text_cache import build_text_cache

    job = ValidationJob(["a red circle"], cfg.validation.negative_prompt)
    job.text_paths = build_text_cache([*job.prompts, job.negative_prompt], comps, tmp_path, max_length=32).paths
    (path,) = render_validation(cfg, job, comps, comps.transformer, tmp_path / "step-0", backend=get_backend("cpu"))
    with av.open(str(path)) as f:
        rates = [s.rate for s in f.streams.audio]
    assert rates == [comps.vocoder.config.output_sampling_rate] == [48000]  # the BWE vocoder's rate


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_the_gemma4_text_encoder_quantizes_while_loading(tmp_path, tiny, precision):
    ck.save_text_encoder(tiny["2.5"], tmp_path / "g4")
    te, result = ck.load_text_encoder_quantized(tmp_path / "g4", precision, dtype=torch.float32)
    assert type(te).__name__ == "Gemma4UnifiedForConditionalGeneration"
    assert any(".self_attn.q_proj" in n for n in result.quantized_modules)
    assert not any("embed_tokens" in n or "lm_head" in n for n in result.quantized_modules)
    ids = torch.randint(4, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny["2.5"].text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = te(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert float((want - got).abs().max() / want.abs().max()) < 0.1  # int8 at a 16-wide toy size


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_diffusers_folder_of_each_release_is_detected_and_loads_back(tmp_path, tiny, version):
    ck.save_diffusers_folder(tiny[version], tmp_path)
    assert ck.open_checkpoint(tmp_path).version == version
    loaded = ck.load_components(tmp_path, dtype=torch.float32)
    assert type(loaded.text_encoder).__name__ == type(tiny[version].text_encoder).__name__
    for name in (*ck.CHECKPOINT_COMPONENTS, "text_encoder"):
        want, got = getattr(tiny[version], name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    with pytest.raises(LowvramError, match="model.version is 2.0"):
        ck.open_checkpoint(tmp_path, version="2.0")


@pytest.mark.parametrize("version", ("2.3", "2.5"))
def test_the_demo_trains_each_release_end_to_end(tmp_path, version):
    """Caption -> Gemma 3/4 -> connectors -> text cache on disk; clips -> VAE -> latent cache; LoRA steps; export."""
    from lowvram.config import apply_overrides
    from lowvram.demo import default_demo_config
    from lowvram.train.run import run

    cfg = default_demo_config(str(tmp_path))
    cfg = apply_overrides(cfg, {"model.version": version, "train.max_train_steps": 2, "validation.enabled": False})
    assert run(cfg).exit_code == 0
    exported = load_file(str(tmp_path / "lora.safetensors"))
    assert exported and all(k.startswith("diffusion_model.transformer_blocks.") for k in exported)


def test_an_fp8_release_file_is_detected_and_dequantized(tmp_path, tiny):
    """The fp8 variants (e.g. ltx-2.3-22b-dev-fp8) keep the layout and add scales beside the weights."""
    path = tmp_path / "t.safetensors"
    ck.save_single_file(tiny["2.3"], path, family="tiny")
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.startswith("model.diffusion_model.transformer_blocks.") and
                k.endswith(("to_q.weight", "to_gate_logits.weight", "ff.net.0.proj.weight"))]:  # fmt: skip
        w = tensors[key]
        scale = w.abs().max() / 448.0
        tensors[key] = (w / scale).to(torch.float8_e4m3fn)
        tensors[key.replace(".weight", ".weight_scale")] = scale.reshape(())
    save_file(tensors, str(tmp_path / "fp8.safetensors"), metadata={"lowvram_family": "tiny"})
    assert ck.open_checkpoint(tmp_path / "fp8.safetensors").version == "2.3"
    t = ck.load_components(tmp_path / "fp8.safetensors", components=("transformer",), dtype=torch.float32).transformer
    got = t.transformer_blocks[0].attn1.to_gate_logits.weight
    want = tiny["2.3"].transformer.transformer_blocks[0].attn1.to_gate_logits.weight
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=float(want.abs().max()) / 8, rtol=0.07)


def test_a_kv_cacheable_checkpoint_without_the_prompt_adaln_mlp_loads(tmp_path):
    cfg = {**ltx2.tiny_configs("2.5")["transformer"], "use_prompt_adaln_single": False}
    comps = ltx2.build_tiny_components(seed=0, version="2.5")
    comps.transformer = ltx2.build_component("transformer", cfg).eval()
    path = tmp_path / "kv.safetensors"
    ck.save_single_file(comps, path, family="tiny")
    assert not any("prompt_adaln_single." in k for k in load_file(str(path)))
    t = ck.load_components(path, components=("transformer",), dtype=torch.float32).transformer
    assert t.config.use_prompt_adaln_single is False
    want = comps.transformer.state_dict()
    assert all(torch.equal(want[k], v) for k, v in t.state_dict().items())
