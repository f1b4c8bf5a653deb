"""LoRA injection and export on the tiny LTX-2 transformer; the export must load in diffusers' LTX-2 pipeline."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowvram.errors import UsageError
from lowvram.method import lora
from lowvram.models import ltx2

ATTENTION = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


def _randomize_b(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(transformer).values():
        w = layer.lora_B[lora.ADAPTER].weight
        w.data = 0.1 * torch.randn(w.shape, generator=g)


def _forward(transformer, text):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return ltx2.transformer_forward(
            transformer,
            video_tokens=torch.randn(1, 6, 8, generator=g),
            audio_tokens=torch.randn(1, 3, 4, generator=g),
            text=text,
            video_sigma=torch.tensor([0.4]),
            audio_sigma=torch.tensor([0.7]),
            latent_frames=1,
            latent_height=2,
            latent_width=3,
            fps=24.0,
        )


@pytest.fixture(scope="module")
def text():
    return ltx2.encode_text(ltx2.build_tiny_components(seed=0), ["a red circle moves left"], max_length=32)


def _pipeline_with_lora(path):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    c = ltx2.build_tiny_components(seed=0)
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=c.video_vae,
        audio_vae=c.audio_vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        connectors=c.connectors,
        transformer=c.transformer,
        vocoder=c.vocoder,
    )
    pipe.load_lora_weights(str(path))
    return pipe


def test_default_targets_are_every_attention_projection_and_only_adapters_train(text):
    t = ltx2.build_tiny_components(seed=0).transformer
    base = _forward(t, text)
    names = lora.inject_lora(t, rank=4)
    expected = {
        f"transformer_blocks.{i}.{attn}.{proj}"
        for i in range(2)
        for attn in ATTENTION
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert set(names) == expected
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(expected)
    # B starts at zero: injecting changes nothing until training does.
    after = _forward(t, text)
    assert torch.equal(base[0], after[0]) and torch.equal(base[1], after[1])


def test_video_only_training_leaves_audio_only_modules_out():
    t = ltx2.build_tiny_components(seed=0).transformer
    names = lora.inject_lora(t, rank=4, include_audio=False)
    assert not any(a in n for n in names for a in ("audio_attn1", "audio_attn2", "video_to_audio_attn"))
    assert any("audio_to_video_attn" in n for n in names)  # audio -> video cross attention feeds the video stream
    assert any(".attn1." in n for n in names)


def test_user_globs_select_modules_and_a_glob_matching_nothing_is_refused():
    t = ltx2.build_tiny_components(seed=0).transformer
    spec = lora.LoraSpec(rank=2, targets=("transformer_blocks.1.attn1.to_*", "ff.net.2"))
    names = lora.target_modules(t, spec)
    assert names == [
        "transformer_blocks.1.attn1.to_q",
        "transformer_blocks.1.attn1.to_k",
        "transformer_blocks.1.attn1.to_v",
        "transformer_blocks.1.attn1.to_out.0",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.ff.net.2",
    ]
    with pytest.raises(UsageError, match="'to_qq' matches no linear module"):
        lora.inject_lora(t, rank=2, targets=("to_qq",))


def test_config_section_is_accepted_as_spec():
    from lowvram.config import LoraSection

    spec = lora.as_spec(LoraSection(rank=8, alpha=4.0, dropout=0.1))
    assert spec == lora.LoraSpec(rank=8, alpha=4.0, dropout=0.1, targets=lora.DEFAULT_TARGETS)
    assert spec.scale == 0.5
    assert lora.as_spec(LoraSection(rank=8)).scale == 1.0


def test_export_folds_alpha_into_b_and_has_no_alpha_keys(tmp_path):
    t = ltx2.build_tiny_components(seed=0).transformer
    lora.inject_lora(t, rank=4, alpha=3.0)
    _randomize_b(t)
    path = lora.export_lora(t, tmp_path / "lora.safetensors", dtype="fp32")  # exactness, not the file dtype
    exported = load_file(str(path))
    raw = lora.lora_state_dict(t)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in exported)
    assert not any("alpha" in k for k in exported)
    assert len(exported) == len(raw)
    key = "transformer_blocks.0.audio_to_video_attn.to_out.0"
    assert torch.equal(exported[f"diffusion_model.{key}.lora_A.weight"], raw[f"{key}.lora_A.weight"])
    torch.testing.assert_close(exported[f"diffusion_model.{key}.lora_B.weight"], raw[f"{key}.lora_B.weight"] * 0.75)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["lowvram_alpha_folded_into_b"] == "true"


@pytest.mark.parametrize("lora_format", ["comfy", "diffusers"])
def test_exported_lora_changes_diffusers_pipeline_exactly_as_in_memory(tmp_path, text, lora_format):
    t = ltx2.build_tiny_components(seed=0).transformer
    base = _forward(t, text)
    # alpha = 2 * rank: folding multiplies B by 2, exact in floating point, so outputs must match bit for bit.
    lora.inject_lora(t, rank=4, alpha=8.0)
    _randomize_b(t)
    ours = _forward(t, text)
    assert not torch.allclose(ours[0], base[0]) and not torch.allclose(ours[1], base[1])
    path = lora.export_lora(t, tmp_path / "lora.safetensors", lora_format=lora_format, dtype="fp32")
    if lora_format == "diffusers":
        assert all(k.startswith("transformer.transformer_blocks.") for k in load_file(str(path)))
    theirs = _forward(_pipeline_with_lora(path).transformer, text)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_exported_lora_with_any_alpha_matches_closely(tmp_path, text):
    t = ltx2.build_tiny_components(seed=0).transformer
    lora.inject_lora(t, rank=4, alpha=3.0)
    _randomize_b(t, seed=5)
    ours = _forward(t, text)
    path = lora.export_lora(t, tmp_path / "l.safetensors", dtype="fp32")
    theirs = _forward(_pipeline_with_lora(path).transformer, text)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)


def test_unknown_format_is_refused(tmp_path):
    t = ltx2.build_tiny_components(seed=0).transformer
    lora.inject_lora(t, rank=2)
    with pytest.raises(UsageError, match="unknown LoRA format 'kohya'"):
        lora.export_lora(t, tmp_path / "x.safetensors", lora_format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_rank_32_on_the_real_transformer_on_meta_is_214m_adapter_parameters():
    # The planner injects LoRA into the real 19B class on meta; no adapter may land in host memory.
    t = ltx2.build_on_meta("transformer")
    names = lora.inject_lora(t, rank=32)
    assert len(names) == 48 * 6 * 4
    assert all(p.is_meta for p in t.parameters())
    assert round(lora.count_lora_parameters(t) / 1e6, 1) == 213.9
