"""Loading LTX-2 weights: the tiny family member goes through the same code paths as a real checkpoint."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram.errors import LowvramError
from lowvram.models import ltx2
from lowvram.models import ltx2 as ck

NAMES = ("transformer", "video_vae", "audio_vae", "vocoder", "connectors", "text_encoder")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    path = ck.save_tiny_checkpoint(folder, seed=0)
    return folder, path, ltx2.build_tiny_components(seed=0)


def _assert_same_weights(a, b):
    for name in NAMES:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def _outputs(c):
    text = ltx2.encode_text(c, ["a red circle moves left", "a blue square"], max_length=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v, a = ltx2.transformer_forward(
            c.transformer,
            video_tokens=torch.randn(2, 4, 8, generator=g),
            audio_tokens=torch.randn(2, 3, 4, generator=g),
            text=text,
            video_sigma=torch.tensor([0.2, 0.9]),
            audio_sigma=torch.tensor([0.5, 0.5]),
            latent_frames=1,
            latent_height=2,
            latent_width=2,
            fps=24.0,
        )
        latents = c.video_vae.encode(torch.randn(1, 3, 9, 64, 64, generator=g)).latent_dist.mode()
    return text.video, text.audio, v, a, latents


def test_tiny_single_file_uses_the_official_key_layout(saved):
    _, path, _ = saved
    keys = load_file(str(path)).keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "vae", "audio_vae", "vocoder", "text_embedding_projection"}
    assert "model.diffusion_model.patchify_proj.weight" in keys
    assert "model.diffusion_model.adaln_single.linear.weight" in keys
    assert "model.diffusion_model.video_embeddings_connector.learnable_registers" in keys
    assert "vae.per_channel_statistics.mean-of-means" in keys
    assert any(k.startswith("vae.encoder.down_blocks.8.res_blocks.") for k in keys)


def test_tiny_single_file_loads_back_identical(saved):
    folder, path, ref = saved
    loaded = ltx2.load_components(path, folder / "gemma", dtype=torch.float32)
    _assert_same_weights(ref, loaded)
    assert loaded.tokenizer.padding_side == "left"
    for x, y in zip(_outputs(ref), _outputs(loaded), strict=True):
        assert torch.equal(x, y)


def test_diffusers_folder_loads_back_identical(saved, tmp_path):
    _, _, ref = saved
    ck.save_diffusers_folder(ref, tmp_path / "diffusers")
    loaded = ltx2.load_components(tmp_path / "diffusers", dtype=torch.float32)
    _assert_same_weights(ref, loaded)
    for x, y in zip(_outputs(ref), _outputs(loaded), strict=True):
        assert torch.equal(x, y)


def test_partial_load_and_dtype(saved):
    folder, path, ref = saved
    loaded = ltx2.load_components(path, dtype=torch.bfloat16, components=("transformer",))
    assert loaded.video_vae is None and loaded.text_encoder is None
    w = loaded.transformer.proj_in.weight
    assert w.dtype == torch.bfloat16 and not w.requires_grad
    assert torch.equal(w, ref.transformer.proj_in.weight.to(torch.bfloat16))


def test_missing_and_misshaped_keys_are_refused_by_name(saved, tmp_path):
    _, path, _ = saved
    tensors = load_file(str(path))
    del tensors["model.diffusion_model.patchify_proj.bias"]
    tensors["model.diffusion_model.transformer_blocks.1.attn1.to_q.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"lowvram_family": "tiny"})
    with pytest.raises(LowvramError) as err:
        ltx2.load_components(bad, components=("transformer",), dtype=torch.float32)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing: proj_in.bias" in msg
    assert "transformer_blocks.1.attn1.to_q.weight [3, 3] (model wants [16, 16])" in msg
    # The other components in the same file are intact and still load.
    ltx2.load_components(bad, components=("video_vae",), dtype=torch.float32)


def test_a_real_family_checkpoint_is_refused_when_it_is_another_model(saved):
    _, path, _ = saved
    with pytest.raises(LowvramError, match="does not fit the LTX-2 transformer: .* wrongly shaped"):
        ltx2.load_components(path, family="ltx-2.0", components=("transformer",))


def test_pickle_checkpoints_are_refused(tmp_path):
    pt = tmp_path / "ltx-2.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(LowvramError, match="safetensors only"):
        ltx2.load_components(pt)
    sub = tmp_path / "folder" / "transformer"
    sub.mkdir(parents=True)
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LowvramError, match="only pickle weights .*safetensors only"):
        ltx2.load_components(tmp_path / "folder")
    with pytest.raises(LowvramError, match="does not exist"):
        ltx2.load_components(tmp_path / "nowhere.safetensors")


def test_unknown_family_is_refused():
    with pytest.raises(LowvramError, match="unknown LTX-2 model family 'ltx-9'"):
        ck.family_configs("ltx-9")


def test_scaled_fp8_weights_are_dequantized(saved, tmp_path):
    _, path, ref = saved
    tensors = load_file(str(path))
    key = "model.diffusion_model.transformer_blocks.0.attn1.to_q.weight"
    w = tensors[key]
    scale = w.abs().max() / 448.0
    tensors[key] = (w / scale).to(torch.float8_e4m3fn)
    tensors[key.replace(".weight", ".weight_scale")] = scale.reshape(())
    fp8 = tmp_path / "fp8.safetensors"
    save_file(tensors, str(fp8), metadata={"lowvram_family": "tiny"})
    loaded = ltx2.load_components(fp8, components=("transformer",), dtype=torch.float32)
    got = loaded.transformer.transformer_blocks[0].attn1.to_q.weight
    expected = ref.transformer.transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(got, expected)  # it went through fp8
    torch.testing.assert_close(got, expected, atol=float(scale) * 32, rtol=0.07)


@pytest.fixture(scope="module")
def real_on_meta():
    return {name: ltx2.build_on_meta(name) for name in NAMES}


def test_real_configs_build_on_meta_with_the_published_sizes(real_on_meta):
    sizes = {}
    for name, module in real_on_meta.items():
        assert all(p.is_meta for p in module.parameters())
        sizes[name] = sum(p.numel() for p in module.parameters())
    # Parameter counts of LTX-2 19B (transformer 18.88B) and Gemma3-12B measured on meta for the design notes.
    assert round(sizes["transformer"] / 1e9, 2) == 18.88
    assert round(sizes["text_encoder"] / 1e9, 2) == 12.19
    assert round(sizes["connectors"] / 1e9, 2) == 1.43
    assert round(sizes["video_vae"] / 1e9, 2) == 1.22
    t = ck.real_transformer_config()
    assert t["rope_type"] == "split" and t["num_layers"] == 48
    v = ck.real_video_vae_config()
    assert (v["spatial_compression_ratio"], v["temporal_compression_ratio"]) == (32, 8)


@pytest.mark.parametrize("name", ck.CHECKPOINT_COMPONENTS)
def test_official_layout_round_trips_for_the_real_model_keys(name, real_on_meta):
    keys = list(real_on_meta[name].state_dict())
    official = ck.diffusers_to_official(name, keys)  # raises if diffusers' converter does not map it back
    assert len(official) == len(keys)


def test_vae_with_decoder_timestep_conditioning_is_detected_from_its_weights(tmp_path):
    comps = ltx2.build_tiny_components(seed=0)
    cfg = {**ltx2.tiny_configs()["video_vae"], "timestep_conditioning": True}
    torch.manual_seed(3)
    comps.video_vae = ltx2.build_component("video_vae", cfg).eval()
    plain = tmp_path / "plain.safetensors"
    ck.save_single_file(comps, plain, family="tiny")
    # The official file names the decoder's conditioning `last_time_embedder` / `last_scale_shift_table`.
    tensors = {
        k.replace("vae.decoder.time_embedder", "vae.decoder.last_time_embedder").replace(
            "vae.decoder.scale_shift_table", "vae.decoder.last_scale_shift_table"
        ): v
        for k, v in load_file(str(plain)).items()
    }
    assert any("last_time_embedder" in k for k in tensors)
    official = tmp_path / "official.safetensors"
    save_file(tensors, str(official), metadata={"lowvram_family": "tiny"})
    loaded = ltx2.load_components(official, components=("video_vae",), dtype=torch.float32).video_vae
    assert loaded.config.timestep_conditioning
    ref = comps.video_vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
