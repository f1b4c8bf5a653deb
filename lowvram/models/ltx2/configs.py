"""LTX-2 configs: the tiny family's (per release) and the shipped real ones (`lowvram/models/configs/`), by family.

Constructor kwargs only: it builds no module (build.py does) and reads no weights (checkpoint.py does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowvram.errors import LowvramError
from lowvram.models import versions

FAMILIES = ("ltx-2.0", "ltx-2.3", "ltx-2.5", "tiny")
FAMILY_ALIASES = {"ltx2": "ltx-2.0", "ltx-2": "ltx-2.0"}
CHECKPOINT_COMPONENTS = ("transformer", "video_vae", "audio_vae", "vocoder", "connectors")
_CONFIG_DIR = Path(__file__).parent.parent / "configs"  # lowvram/models/configs/


# --------------------------------------------------------------------------------------------------------------------
# Configs


def tiny_configs(version: str = "2.0") -> dict[str, dict[str, Any]]:
    """Constructor kwargs of the real classes at a size that trains on CPU in well under a second per step.

    Real compression factors are kept (32x spatial / 8x temporal video, 4x time / 4x mel audio). The `text_encoder`
    entry holds the Gemma3 `text_config` / `vision_config` / `mm_tokens_per_image` kwargs. `version` ("2.0", "2.3",
    "2.5") switches on that release's flags, as its real configs in lowvram/models/configs do.
    """
    from lowvram.models.versions import check_version

    base = _tiny_configs_2_0()
    version = check_version(version)
    if version == "2.0":
        return base
    out = {}
    for name, cfg in base.items():
        changes = _TINY_DELTAS[version].get(name, {})
        # A new text encoder replaces Gemma3's kwargs; the other components change some of theirs.
        out[name] = dict(changes) if "model_type" in changes else {**cfg, **changes}
    return out


def _tiny_configs_2_0() -> dict[str, dict[str, Any]]:
    return {
        "transformer": dict(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=8,
            num_layers=2,
            caption_channels=16,
            rope_type="split",
            rope_double_precision=True,
            cross_attn_timestep_scale_multiplier=1000,
        ),
        "video_vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            # Decoder widths must grow: equal widths crash on decode.
            decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, True),
            decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False, False, False, False),
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True, True, True),
            upsample_factor=(2, 2, 2),
            patch_size=4,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
            # Must be given: the class derives 64/16 from this layout otherwise.
            spatial_compression_ratio=32,
            temporal_compression_ratio=8,
        ),
        "audio_vae": dict(
            base_channels=4,  # == latent_channels * mel_bins / 4
            output_channels=2,
            ch_mult=(1, 1, 1),
            num_res_blocks=1,
            attn_resolutions=None,
            in_channels=2,
            resolution=32,
            latent_channels=2,
            norm_type="pixel",
            causality_axis="height",
            mid_block_add_attention=False,
            sample_rate=16000,
            mel_hop_length=160,
            is_causal=True,
            mel_bins=8,
        ),
        "vocoder": dict(
            in_channels=16,  # audio output_channels * mel_bins
            hidden_channels=32,
            out_channels=2,
            upsample_kernel_sizes=[4, 4],
            upsample_factors=[2, 2],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1, 3, 5]],
            output_sampling_rate=16000,
        ),
        "text_encoder": dict(
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                vocab_size=256,
                sliding_window=16,
                max_position_embeddings=64,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
        ),
        "connectors": dict(
            caption_channels=16,  # Gemma hidden size
            text_proj_in_factor=3,  # Gemma layers + 1
            video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8,
            video_connector_num_layers=1,
            video_connector_num_learnable_registers=4,
            audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8,
            audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=4,
            connector_rope_base_seq_len=32,
            rope_type="split",
        ),
    }


# What LTX-2.3 and 2.5 change in each component, at tiny size: the same flags as their real configs (diffusers
# scripts/convert_ltx2_to_diffusers.py, see lowvram/models/configs/ltx-2.3 and ltx-2.5), sizes scaled down.
_TINY_2_3 = {
    "transformer": dict(
        gated_attn=True,
        cross_attn_mod=True,
        audio_gated_attn=True,
        audio_cross_attn_mod=True,
        use_prompt_embeddings=False,  # the connectors project per modality instead
        perturbed_attn=True,
    ),
    "connectors": dict(
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,  # x heads == video_hidden_dim (real: 32 x 128 == 4096)
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=4,  # x heads == audio_hidden_dim (real: 32 x 64 == 2048)
        video_gated_attn=True,
        audio_gated_attn=True,
        per_modality_projections=True,
        video_hidden_dim=16,  # == the transformer's cross_attention_dim
        audio_hidden_dim=8,  # == its audio_cross_attention_dim
        proj_bias=True,
    ),
    "video_vae": dict(
        # 2.3's rebuilt decoder: four up blocks (spatiotemporal, spatiotemporal, temporal, spatial), no residual.
        decoder_block_out_channels=(8, 16, 16, 32),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, True, True),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        upsample_residual=(False, False, False, False),
        upsample_factor=(2, 2, 1, 2),
        decoder_spatial_padding_mode="zeros",
    ),
    "vocoder": dict(
        # LTX2VocoderWithBWE: a 16 kHz vocoder, then a bandwidth extender to 48 kHz (3x) from its own mel.
        in_channels=16,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        act_fn="snakebeta",
        antialias=True,
        antialias_ratio=2,
        antialias_kernel_size=12,
        final_act_fn=None,
        final_bias=False,
        bwe_in_channels=16,  # out_channels x num_mel_channels
        bwe_hidden_channels=16,
        bwe_out_channels=2,
        bwe_upsample_kernel_sizes=[8, 7, 4],  # 2 x factor, +1 when odd (real: [12, 11, 4, 4, 4])
        bwe_upsample_factors=[4, 3, 2],  # == hop_length x 48000 / 16000
        bwe_resnet_kernel_sizes=[3],
        bwe_resnet_dilations=[[1, 3, 5]],
        bwe_act_fn="snakebeta",
        bwe_antialias=True,
        bwe_antialias_ratio=2,
        bwe_antialias_kernel_size=12,
        bwe_final_act_fn=None,
        bwe_final_bias=False,
        filter_length=32,
        hop_length=8,
        window_length=32,
        num_mel_channels=8,
        input_sampling_rate=16000,
        output_sampling_rate=48000,
    ),
}
_TINY_DELTAS = {
    "2.3": _TINY_2_3,
    "2.5": {
        **_TINY_2_3,
        "transformer": {**_TINY_2_3["transformer"], "ff_bias": False, "use_keyframes_abs_pos_embedding": True},
        # Gemma 4 unified (text path only: no vision or audio tower), one sliding and one global layer, the global
        # one with K = V sharing as Gemma-4-12B's global layers have.
        "text_encoder": dict(
            model_type="gemma4_unified",
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                global_head_dim=8,
                num_global_key_value_heads=1,
                attention_k_eq_v=True,
                vocab_size=256,
                sliding_window=16,
                max_position_embeddings=64,
                layer_types=["sliding_attention", "full_attention"],
            ),
            vision_config=None,
            audio_config=None,
        ),
    },
}


# Tiny text length: a multiple of the connectors' 4 registers, and within the tiny Gemma's 64 positions.
TINY_MAX_TEXT_TOKENS = 32


# --------------------------------------------------------------------------------------------------------------------
# Configs and meta builds


def canonical_family(family: str) -> str:
    """The config's `ltx2` (and `ltx-2`) name the real model; its version comes separately (default 2.0)."""
    return FAMILY_ALIASES.get(family, family)


def family_version(family: str) -> str | None:
    """The version a family name carries ("ltx-2.3" -> "2.3"); None for "tiny" and for the bare `ltx2`."""
    family = canonical_family(family)
    if family.startswith("ltx-") and family != "ltx-2.0":
        return versions.check_version(family[len("ltx-") :])
    return None


def family_configs(family: str, version: str | None = None) -> dict[str, dict[str, Any]]:
    """Constructor kwargs of every component: a real family ("ltx-2.0", "ltx-2.3", "ltx-2.5" from the shipped
    JSON; `version` picks it for "ltx-2.0"/"ltx2") or "tiny" at `version` (default 2.0)."""
    family = canonical_family(family)
    if family == "tiny":
        return tiny_configs(version or versions.DEFAULT_VERSION)
    if family not in FAMILIES:
        raise LowvramError(f"unknown LTX-2 model family {family!r}: use one of {', '.join(FAMILIES)}")
    version = version or family_version(family) or versions.DEFAULT_VERSION
    folder = _CONFIG_DIR / versions.model_version(version).config_dir
    out = {}
    for name in (*CHECKPOINT_COMPONENTS, "text_encoder"):
        cfg = json.loads((folder / f"{name}.json").read_text())
        out[name] = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return out


def real_transformer_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["transformer"]


def real_video_vae_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["video_vae"]


def real_audio_vae_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["audio_vae"]


def real_vocoder_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["vocoder"]


def real_connectors_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["connectors"]


def real_text_encoder_config() -> dict[str, Any]:
    return family_configs("ltx-2.0")["text_encoder"]
