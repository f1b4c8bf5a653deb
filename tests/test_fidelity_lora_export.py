"""Issue 12, items 1 and 5: every Linear of LTX-2 can be a LoRA target and exports under its official name, checked
when the LoRA is injected; LoRA files are bf16 unless asked otherwise, and the adapter keeps its training dtype.

The official names come from the real class through the checkpoint layout map (`diffusers_to_official`), and each
is read back by the load map (`official_to_diffusers`, diffusers' own converter) and by diffusers' LoRA converter.
"""

import pytest
import torch
from safetensors.torch import load_file

from lowvram.errors import UsageError
from lowvram.method import lora
from lowvram.models import ltx2
from lowvram.models.ltx2 import layout as ltx2_layout

TOP_LEVEL_OFFICIAL = {
    "proj_in": "diffusion_model.patchify_proj",
    "audio_proj_in": "diffusion_model.audio_patchify_proj",
    "time_embed.linear": "diffusion_model.adaln_single.linear",
    "audio_time_embed.linear": "diffusion_model.audio_adaln_single.linear",
    "time_embed.emb.timestep_embedder.linear_1": "diffusion_model.adaln_single.emb.timestep_embedder.linear_1",
    "av_cross_attn_video_scale_shift.linear": "diffusion_model.av_ca_video_scale_shift_adaln_single.linear",
    "av_cross_attn_video_a2v_gate.linear": "diffusion_model.av_ca_a2v_gate_adaln_single.linear",
    "av_cross_attn_audio_scale_shift.linear": "diffusion_model.av_ca_audio_scale_shift_adaln_single.linear",
    "av_cross_attn_audio_v2a_gate.linear": "diffusion_model.av_ca_v2a_gate_adaln_single.linear",
    "transformer_blocks.0.attn1.to_q": "diffusion_model.transformer_blocks.0.attn1.to_q",
}


def _linears(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def _diffusers_lora_converter(keys: list[str]) -> dict[str, str]:
    # What LTX2Pipeline.lora_state_dict applies to a `diffusion_model.*` file: {converted key: our key}.
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    converted = _convert_non_diffusers_ltx2_lora_to_diffusers({k: k for k in keys})
    return {new: old for new, old in converted.items()}


@pytest.mark.slow
def test_every_linear_of_the_real_transformer_exports_under_its_official_name():
    t = ltx2.build_on_meta("transformer")
    linears = _linears(t)
    assert len(linears) == 1370
    # The official key set, derived from the real class through the inverse of the load mapping.
    official_keys = set(ltx2_layout.diffusers_to_official("transformer", list(t.state_dict())))
    names = lora.inject_lora(t, rank=4, targets=("*",))
    assert sorted(names) == sorted(linears)
    assert all(p.is_meta for p in t.parameters())

    exported = lora.export_names(list(lora.lora_layers(t)), "comfy")
    assert sorted(exported) == sorted(linears)  # none dropped
    for module, prefix in exported.items():
        key = f"model.{prefix}.weight"
        assert key in official_keys, module
        # The load map reads the official key back to this very module.
        assert ltx2_layout.official_to_diffusers("transformer", [key]) == {f"{module}.weight": key}
    for module, prefix in TOP_LEVEL_OFFICIAL.items():
        assert exported[module] == prefix
    # diffusers' LoRA loader renames every exported key back to the module it came from.
    keys = [f"{p}.lora_{ab}.weight" for p in exported.values() for ab in "AB"]
    back = _diffusers_lora_converter(keys)
    assert len(back) == len(keys)
    assert {new for new in back} == {f"transformer.{m}.lora_{ab}.weight" for m in exported for ab in "AB"}


def _tiny_forward(transformer):
    g = torch.Generator().manual_seed(0)
    text = ltx2.TextEmbeddings(
        video=torch.randn(1, 8, 16, generator=g), audio=torch.randn(1, 8, 16, generator=g), mask=torch.ones(1, 8)
    )
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


def test_all_linear_lora_of_the_tiny_model_loads_in_diffusers_with_every_module_adapted(tmp_path):
    from diffusers.loaders.lora_pipeline import LTX2LoraLoaderMixin

    t = ltx2.build_tiny_components(seed=0).transformer
    linears = _linears(t)
    lora.inject_lora(t, rank=2, alpha=4.0, targets=("*",))
    g = torch.Generator().manual_seed(3)
    for layer in lora.lora_layers(t).values():
        w = layer.lora_B[lora.ADAPTER].weight
        w.data = 0.05 * torch.randn(w.shape, generator=g)
    ours = _tiny_forward(t)
    path = lora.export_lora(t, tmp_path / "all.safetensors", dtype="fp32")
    assert all(k.startswith("diffusion_model.") for k in load_file(str(path)))

    state = LTX2LoraLoaderMixin.lora_state_dict(str(path))
    fresh = ltx2.build_tiny_components(seed=0).transformer
    LTX2LoraLoaderMixin.load_lora_into_transformer(state, fresh)
    adapted = {n for n, m in fresh.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted == set(linears)
    theirs = _tiny_forward(fresh)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)


def test_a_target_the_export_cannot_name_is_refused_at_injection_before_any_adapter(monkeypatch):
    real = ltx2_layout._to_official

    def without_proj_out(component, key):
        # A module whose official name the load map would read as another module's: it cannot be exported.
        return real(component, "proj_in.weight") if key == "proj_out.weight" else real(component, key)

    monkeypatch.setattr(ltx2_layout, "_to_official", without_proj_out)
    t = ltx2.build_tiny_components(seed=0).transformer
    with pytest.raises(UsageError, match=r"LoRA target 'proj_out' .*no official LTX-2 name.*lora.format"):
        lora.inject_lora(t, rank=2, targets=("proj_out", "to_q"))
    assert not lora.lora_layers(t)
    # The diffusers naming needs no official name.
    assert lora.inject_lora(t, rank=2, targets=("proj_out",), lora_format="diffusers") == ["proj_out"]


def test_the_run_refuses_an_unexportable_target_before_caching(monkeypatch, tmp_path):
    from lowvram.config import RunConfig
    from lowvram.train import run as assembly

    real = ltx2_layout._to_official
    monkeypatch.setattr(
        ltx2_layout,
        "_to_official",
        lambda c, k: real(c, "proj_in.weight") if k == "proj_out.weight" else real(c, k),
    )
    cfg = RunConfig.model_validate({"lora": {"targets": ["proj_out"]}, "output": {"output_dir": str(tmp_path)}})
    with pytest.raises(UsageError, match="'proj_out'"):
        assembly.check_lora_targets(cfg)
    cfg = RunConfig.model_validate({"lora": {"targets": ["*"]}, "output": {"output_dir": str(tmp_path)}})
    monkeypatch.setattr(ltx2_layout, "_to_official", real)
    assembly.check_lora_targets(cfg)  # every Linear of the tiny family: fine


# --------------------------------------------------------------------------------------------------------------------
# Item 5: the file's dtype


def test_lora_file_is_bf16_by_default_and_the_adapter_keeps_its_training_dtype(tmp_path):
    t = ltx2.build_tiny_components(seed=0).transformer
    lora.inject_lora(t, rank=4, alpha=8.0)
    for layer in lora.lora_layers(t).values():
        layer.lora_B[lora.ADAPTER].weight.data.normal_(0, 0.1)
    raw = {k: v.clone() for k, v in lora.lora_state_dict(t).items()}
    default = load_file(str(lora.export_lora(t, tmp_path / "default.safetensors")))
    assert {v.dtype for v in default.values()} == {torch.bfloat16}
    full = load_file(str(lora.export_lora(t, tmp_path / "fp32.safetensors", dtype="fp32")))
    assert {v.dtype for v in full.values()} == {torch.float32}
    # bf16 is the fp32 export rounded once (alpha folded in fp32 first).
    for key, value in full.items():
        assert torch.equal(default[key], value.to(torch.bfloat16))
    data_bytes = {
        name: sum(v.numel() * v.element_size() for v in d.values()) for name, d in (("bf16", default), ("fp32", full))
    }
    assert 2 * data_bytes["bf16"] == data_bytes["fp32"]
    # The adapter in memory is untouched: still fp32, same values.
    for key, value in lora.lora_state_dict(t).items():
        assert value.dtype == torch.float32 and torch.equal(value, raw[key])


def test_lora_dtype_comes_from_the_config_and_the_cli_flag(tmp_path):
    from lowvram.cli import _overrides
    from lowvram.config import LoraSection, load_config
    from lowvram.errors import ConfigError

    assert LoraSection().dtype == "bf16"
    cfg, _ = load_config(None, _overrides(lora_dtype="fp32"))
    assert cfg.lora.dtype == "fp32"
    t = ltx2.build_tiny_components(seed=0).transformer
    lora.inject_lora(t, cfg.lora)
    out = load_file(str(lora.export_lora(t, tmp_path / "x.safetensors", cfg.lora)))
    assert {v.dtype for v in out.values()} == {torch.float32}
    with pytest.raises(ConfigError, match="lora.dtype"):
        load_config(None, {"lora.dtype": "int8"})


def test_cli_help_lists_lora_dtype(cli):
    out = cli("train", "--help")
    assert out.returncode == 0 and "--lora-dtype" in out.stdout
