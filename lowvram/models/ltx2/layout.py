"""The LTX-2 checkpoint key layout: official single-file names <-> diffusers module names, per component.

Forward maps are diffusers' own converters where they exist (so a real checkpoint is read exactly as diffusers
reads it); connectors and vocoder follow diffusers' conversion script. Names only: it reads no file (checkpoint.py
does) and is what LoRA export (`method/lora.py`) names its keys by.
"""

from __future__ import annotations

import re

_TRANSFORMER_PREFIX = "model.diffusion_model."
_CONNECTOR_STARTS = ("video_embeddings_connector", "audio_embeddings_connector", "text_embedding_projection")


# --------------------------------------------------------------------------------------------------------------------
# Official key layout <-> diffusers names. Forward maps are diffusers' own converters where they exist (so a real
# checkpoint is read exactly as diffusers reads it); connectors and vocoder follow diffusers' conversion script.


def official_to_diffusers(component: str, official_keys: list[str]) -> dict[str, str]:
    """{diffusers key: official key} for the official keys that belong to `component` (others are left out)."""
    from diffusers.loaders import single_file_utils as sfu

    mine = [k for k in official_keys if _official_owner(k) == component]
    if component in ("transformer", "video_vae", "audio_vae"):
        convert = {
            "transformer": sfu.convert_ltx2_transformer_to_diffusers,
            "video_vae": sfu.convert_ltx2_vae_to_diffusers,
            "audio_vae": sfu.convert_ltx2_audio_vae_to_diffusers,
        }[component]
        # The converters only rename and drop keys, so running them on {key: key} maps names without reading a byte.
        mapped = convert({k: k for k in mine})
        if component == "transformer":
            # 0.42.1's single-file converter predates LTX-2.3; its conversion script adds these two renames
            # (LTX_2_3_TRANSFORMER_KEYS_RENAME_DICT). 2.0 has no such keys, so one map serves every version.
            mapped = {
                k.replace("audio_prompt_adaln_single.", "audio_prompt_adaln.").replace(
                    "prompt_adaln_single.", "prompt_adaln."
                ): v
                for k, v in mapped.items()
            }
        if component == "video_vae":
            # LTX-2.3/2.5's decoder has a fourth up block: official up_blocks.7 (its upsampler) and .8 (its resnets),
            # as LTX_2_3_VIDEO_VAE_RENAME_DICT in diffusers' conversion script; 0.42.1's converter stops at .6.
            mapped = {
                re.sub(
                    r"^decoder\.up_blocks\.8\.",
                    "decoder.up_blocks.3.",
                    re.sub(r"^decoder\.up_blocks\.7\.", "decoder.up_blocks.3.upsamplers.0.", k),
                ): v
                for k, v in mapped.items()
            }
            # diffusers' conversion script (newer than 0.42.1's single-file converter) also renames the decoder's
            # timestep conditioning, present in VAEs built with timestep_conditioning=True.
            mapped = {
                k.replace("last_time_embedder", "time_embedder").replace(
                    "last_scale_shift_table", "scale_shift_table"
                ): v
                for k, v in mapped.items()
            }
        return mapped
    renames = _CONNECTOR_RENAMES if component == "connectors" else _VOCODER_RENAMES
    strip = _TRANSFORMER_PREFIX if component == "connectors" else "vocoder."
    out = {}
    for key in mine:
        new = key[len(strip) :] if key.startswith(strip) else key
        for old, repl in renames:
            new = re.sub(old, repl, new)
        out[new] = key
    return out


# Regex renames, official -> diffusers: diffusers scripts/convert_ltx2_to_diffusers.py LTX_2_0_* and LTX_2_3_*
# dicts in one table (no key of one version holds another's names, so the union serves all three).
_CONNECTOR_RENAMES = (
    (r"connectors\.", ""),
    (r"video_embeddings_connector", "video_connector"),
    (r"audio_embeddings_connector", "audio_connector"),
    (r"transformer_1d_blocks", "transformer_blocks"),
    (r"text_embedding_projection\.aggregate_embed", "text_proj_in"),
    # LTX-2.3/2.5 per-modality projections
    (r"text_embedding_projection\.video_aggregate_embed", "video_text_proj_in"),
    (r"text_embedding_projection\.audio_aggregate_embed", "audio_text_proj_in"),
    (r"q_norm", "norm_q"),
    (r"k_norm", "norm_k"),
)
_VOCODER_RENAMES = (
    # "ups" only as a whole name: 2.3's anti-aliased activations hold `upsample` buffers (the script renames
    # ".ups." in weight/bias keys only, for that clash).
    (r"(^|\.)ups\.", r"\1upsamplers."),
    (r"resblocks", "resnets"),
    (r"conv_pre", "conv_in"),
    (r"conv_post", "conv_out"),
    # LTX-2.3/2.5 (LTX2VocoderWithBWE): LTX_2_3_VOCODER_RENAME_DICT
    (r"act_post", "act_out"),
    (r"downsample\.lowpass", "downsample"),
)


def _official_owner(key: str) -> str | None:
    if key.startswith(_TRANSFORMER_PREFIX):
        rest = key[len(_TRANSFORMER_PREFIX) :]
        return "connectors" if rest.startswith(_CONNECTOR_STARTS) else "transformer"
    if key.startswith(_CONNECTOR_STARTS):
        return "connectors"
    for prefix, name in (("vae.", "video_vae"), ("audio_vae.", "audio_vae"), ("vocoder.", "vocoder")):
        if key.startswith(prefix):
            return name
    return None


def diffusers_to_official(component: str, diffusers_keys: list[str]) -> dict[str, str]:
    """{official key: diffusers key}: the inverse of the maps above, checked by running the forward map on it."""
    out = {_to_official(component, k): k for k in diffusers_keys}
    back = official_to_diffusers(component, list(out))
    if {v: k for k, v in back.items()} != out:
        bad = sorted(set(out) ^ set(back.values()))[:3]
        raise AssertionError(f"official key layout for {component} does not round-trip: {bad}")
    return out


def official_module_names(component: str, module_names: list[str]) -> tuple[dict[str, str], list[str]]:
    """({module path: official module path}, [paths with no official name]) for modules that own a `.weight`.

    Derived from the parameter layout above (a module is named as its weight is), and kept only where diffusers'
    own converter reads the official weight key back to this module's weight: whatever that layout learns (a new
    model version's keys) LoRA export follows without a list of its own.
    """
    official = {name: _to_official(component, f"{name}.weight") for name in module_names}
    back = {v: k for k, v in official_to_diffusers(component, list(official.values())).items()}
    mapped, unmapped = {}, []
    for name, key in official.items():
        if back.get(key) == f"{name}.weight":
            mapped[name] = key.removesuffix(".weight")
        else:
            unmapped.append(name)
    return mapped, unmapped


def _to_official(component: str, key: str) -> str:
    if component == "transformer":
        for new, old in (("time_embed.", "adaln_single."), ("audio_time_embed.", "audio_adaln_single.")):
            if key.startswith(new):
                key = old + key[len(new) :]
        for new, old in (("proj_in.", "patchify_proj."), ("audio_proj_in.", "audio_patchify_proj.")):
            if key.startswith(new):
                key = old + key[len(new) :]
        for new, old in (
            ("prompt_adaln.", "prompt_adaln_single."),  # LTX-2.3/2.5 prompt AdaLN
            ("audio_prompt_adaln.", "audio_prompt_adaln_single."),
        ):
            if key.startswith(new):
                key = old + key[len(new) :]
        for new, old in (
            ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
            ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
            ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
            ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
            ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
            ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
            ("norm_q", "q_norm"),
            ("norm_k", "k_norm"),
        ):
            key = key.replace(new, old)
        return _TRANSFORMER_PREFIX + key
    if component == "connectors":
        for new, old in (
            ("text_proj_in.", "aggregate_embed."),
            ("video_text_proj_in.", "video_aggregate_embed."),
            ("audio_text_proj_in.", "audio_aggregate_embed."),
        ):
            if key.startswith(new):
                return "text_embedding_projection." + old + key[len(new) :]
        for new, old in (
            ("video_connector", "video_embeddings_connector"),
            ("audio_connector", "audio_embeddings_connector"),
            ("transformer_blocks", "transformer_1d_blocks"),
            ("norm_q", "q_norm"),
            ("norm_k", "k_norm"),
        ):
            key = key.replace(new, old)
        return _TRANSFORMER_PREFIX + key
    if component == "vocoder":
        for new, old in (
            ("upsamplers", "ups"),
            ("resnets", "resblocks"),
            ("conv_in", "conv_pre"),
            ("conv_out", "conv_post"),
            ("act_out", "act_post"),
            ("downsample.", "downsample.lowpass."),
        ):
            key = key.replace(new, old)
        return "vocoder." + key
    stats = {
        "latents_mean": "per_channel_statistics.mean-of-means",
        "latents_std": "per_channel_statistics.std-of-means",
    }
    if component == "audio_vae":
        return "audio_vae." + stats.get(key, key)
    if component == "video_vae":
        return "vae." + stats.get(key, _video_vae_block_to_official(key))
    raise ValueError(component)


def _video_vae_block_to_official(key: str) -> str:
    # The official VAE numbers resnet groups and up/downsamplers as one flat list of blocks.
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key)
    if m:
        return f"encoder.down_blocks.{2 * int(m[1]) + 1}.{m[2]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down_blocks.{2 * int(m[1])}.{m[2]}".replace(".resnets.", ".res_blocks.")
    if key.startswith("encoder.mid_block."):
        return key.replace("encoder.mid_block.", "encoder.down_blocks.8.").replace(".resnets.", ".res_blocks.")
    if key.startswith("decoder.mid_block."):
        return key.replace("decoder.mid_block.", "decoder.up_blocks.0.").replace(".resnets.", ".res_blocks.")
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if m:
        return f"decoder.up_blocks.{2 * int(m[1]) + 1}.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"decoder.up_blocks.{2 * int(m[1]) + 2}.{m[2]}".replace(".resnets.", ".res_blocks.")
    return key


