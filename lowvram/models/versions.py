"""LTX-2 model versions (2.0, 2.3, 2.5) as data: names, config folders, forward semantics, detection from a checkpoint.

The loop, the planner and the offload strategies never ask which version runs; what differs lives here and in the
shipped configs. It does not load weights (ltx2/checkpoint.py does) or build modules (ltx2/build.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowvram.errors import LowvramError

VERSIONS = ("2.0", "2.3", "2.5")
DEFAULT_VERSION = "2.0"
VERSION_METADATA_KEY = "lowvram_model_version"


@dataclass(frozen=True)
class ModelVersion:
    """What one LTX-2 release changes, as values the family reads (never `if version == ...` in the loop)."""

    name: str
    config_dir: str  # lowvram/models/configs/<config_dir>
    # The a/v cross-attention's scale/shift/gate from the OTHER modality's σ. diffusers LTX2Pipeline.__call__
    # docstring (0.42.1): "`True` is the LTX-2.3/2.5 behavior; `False` is the legacy LTX-2.0 behavior". LTX-2.0 was
    # released with each modality's own timestep: Lightricks/LTX-2 ltx-core transformer_args.py at 9ce438b
    # (2026-01-05, the first commit of the file, the LTX-2.0 release code the model and the official trainer ran with)
    # feeds modality.timesteps to both cross_scale_shift_adaln and cross_gate_adaln; the other modality's σ arrives
    # only at 822ce3c (2026-03-04, the LTX-2.3 release), and since 203d484 (2026-05-28) only the gate reads it. No
    # release note or config says LTX-2.0 was trained otherwise, so 2.0 keeps its release semantics.
    use_cross_timestep: bool
    # transformers class of the text encoder: LTX-2.0/2.3 read Gemma 3 (diffusers convert_ltx2_to_diffusers.py
    # --text_encoder_model_id "Default is Gemma 3, used by LTX 2.0/2.3"); 2.5 "requires a Gemma 4
    # (`gemma4_unified`) checkpoint" (same script) and diffusers' LTX2Pipeline types it
    # Gemma3ForConditionalGeneration | Gemma4UnifiedForConditionalGeneration.
    text_encoder_model_type: str
    # Human label of the official single-file names, for messages.
    checkpoint_names: str


MODEL_VERSIONS: dict[str, ModelVersion] = {
    "2.0": ModelVersion("2.0", "ltx-2.0", False, "gemma3", "ltx-2-19b-dev*.safetensors"),
    "2.3": ModelVersion("2.3", "ltx-2.3", True, "gemma3", "ltx-2.3-22b-{dev,distilled}*.safetensors"),
    "2.5": ModelVersion("2.5", "ltx-2.5", True, "gemma4_unified", "ltx-2.5-22b-{dev,distilled}*.safetensors"),
}

# SimpleTuner `model_flavour` values for LTX-2 (its ltxvideo2 model maps "2", "2.0", "dev", "dev-fp4", "dev-fp8" to
# 2.0) plus the 2.3 / 2.5 spellings: value -> (version, lowvram checkpoint flavour).
FLAVOURS: dict[str, tuple[str, str]] = {
    "dev": ("2.0", "dev"),
    "dev-fp8": ("2.0", "dev-fp8"),
    "dev-fp4": ("2.0", "dev-fp4"),
    "2": ("2.0", "dev"),
    "2.0": ("2.0", "dev"),
}
for _v in ("2.3", "2.5"):
    FLAVOURS.update(
        {
            _v: (_v, "dev"),
            f"{_v}-dev": (_v, "dev"),
            f"{_v}-dev-fp8": (_v, "dev-fp8"),
            f"{_v}-distilled": (_v, "distilled"),
            f"{_v}-distilled-fp8": (_v, "distilled-fp8"),
        }
    )


def check_version(value: Any) -> str:
    """A valid version string ("2.0", "2.3", "2.5"; 2 / 2.3 as numbers accepted) or ValueError listing them."""
    text = str(value).strip()
    if text in ("2", "2.0.0"):
        text = "2.0"
    if text not in VERSIONS:
        raise ValueError(f"unknown LTX-2 model version '{value}': valid versions are {', '.join(VERSIONS)}")
    return text


def model_version(name: str | None) -> ModelVersion:
    return MODEL_VERSIONS[check_version(name or DEFAULT_VERSION)]


# --------------------------------------------------------------------------------------------------------------------
# Which version a transformer config is (the forward call reads its semantics from the config it runs)


def version_of_transformer_config(config: Any) -> str:
    """The LTX-2 version a transformer config describes, from the flags the releases set.

    diffusers convert_ltx2_to_diffusers.py (commit 58eb52c): 2.3 adds gated_attn + cross_attn_mod (prompt AdaLN)
    and drops use_prompt_embeddings; 2.5's "only transformer-level deltas from 2.3" are ff_bias=False (and the
    keyframe embedding in 2.5.1+).
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    gated = bool(get("gated_attn", False))
    modulated = bool(get("cross_attn_mod", False))
    if not gated and not modulated and get("use_prompt_embeddings", True):
        return "2.0"
    if gated and modulated and not get("use_prompt_embeddings", True):
        return "2.3" if get("ff_bias", True) else "2.5"
    raise LowvramError(
        f"transformer config (gated_attn={gated}, cross_attn_mod={modulated}, "
        f"use_prompt_embeddings={get('use_prompt_embeddings', True)}) matches no LTX-2 version "
        f"({', '.join(VERSIONS)})"
    )


def forward_semantics(transformer_config: Any) -> ModelVersion:
    """The version data the training forward needs, for the transformer it is about to call."""
    return MODEL_VERSIONS[version_of_transformer_config(transformer_config)]


# --------------------------------------------------------------------------------------------------------------------
# Detection from a checkpoint's tensors (official single file: key names; diffusers folder: config.json)

# Per component, the versions whose layout a set of (diffusers) keys can be. 2.3 and 2.5 share their video VAE
# (convert script: "Same block structure as 2.3 ... byte-identical"), vocoder ("Same config as LTX-2.3") and, with
# Gemma-4-12B's 3840 x 49 stack, their connectors; the audio VAE is the same in all three.


def versions_of_component(component: str, keys: set[str]) -> set[str]:
    """The versions whose `component` has these diffusers-named keys (empty set: none of them)."""
    all_versions = set(VERSIONS)
    if not keys:
        return all_versions
    if component == "transformer":
        gated = any(".to_gate_logits." in k for k in keys)
        prompt = any(k.startswith(("prompt_adaln.", "audio_prompt_adaln.")) for k in keys)
        caption = any(k.startswith("caption_projection.") for k in keys)
        ff_bias = any(k.startswith("transformer_blocks.") and k.endswith(".ff.net.0.proj.bias") for k in keys)
        if not gated and not prompt and caption and ff_bias:
            return {"2.0"}
        if gated and not caption:
            # use_prompt_adaln_single=False (KV-cacheable) checkpoints drop the prompt AdaLN MLP; the script's
            # 2.5 keeps it ("use_prompt_adaln_single keep[s] its True default for this checkpoint").
            return {"2.3"} if ff_bias else {"2.5"}
        return set()
    if component == "connectors":
        per_modality = any(k.startswith(("video_text_proj_in.", "audio_text_proj_in.")) for k in keys)
        shared = any(k.startswith("text_proj_in.") for k in keys)
        gated = any(".to_gate_logits." in k for k in keys)
        if shared and not per_modality and not gated:
            return {"2.0"}
        if per_modality and not shared:
            return {"2.3", "2.5"}
        return set()
    if component == "video_vae":
        # 2.3 rebuilt the decoder: four up blocks (official up_blocks.7/.8) where 2.0 has three.
        return {"2.3", "2.5"} if any(k.startswith("decoder.up_blocks.3.") for k in keys) else {"2.0"}
    if component == "vocoder":
        return {"2.3", "2.5"} if any(k.startswith("bwe_generator.") for k in keys) else {"2.0"}
    return all_versions


def versions_of_config(component: str, config: dict[str, Any]) -> set[str]:
    """As `versions_of_component`, from a diffusers config.json instead of keys."""
    if component == "transformer":
        try:
            return {version_of_transformer_config(config)}
        except LowvramError:
            return set()
    if component == "connectors":
        return {"2.3", "2.5"} if config.get("per_modality_projections") else {"2.0"}
    if component == "video_vae":
        return {"2.3", "2.5"} if len(config.get("decoder_block_out_channels") or ()) == 4 else {"2.0"}
    if component == "vocoder":
        return {"2.3", "2.5"} if "bwe_hidden_channels" in config else {"2.0"}
    return set(VERSIONS)


def metadata_version(metadata: dict[str, str]) -> str | None:
    """The version a file states: ours (`lowvram_model_version`) or the official `model_version` ("2.3.0")."""
    if VERSION_METADATA_KEY in metadata:
        return check_version(metadata[VERSION_METADATA_KEY])
    official = str(metadata.get("model_version") or "")
    # ltx-core loader/helpers.parse_model_version: numeric dot components; pre-release tags ("2.3.rc1") dropped.
    parts = []
    for part in official.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    if len(parts) >= 2 and f"{parts[0]}.{parts[1]}" in VERSIONS:
        return f"{parts[0]}.{parts[1]}"
    return None


def resolve_checkpoint_version(
    per_component: dict[str, set[str]], where: str, *, stated: str | None = None, requested: str | None = None
) -> str:
    """One version every component agrees on; `stated` is what the file's metadata says, `requested` the config's.

    Refuses in one line: a file no version matches, components from two versions (e.g. a 2.3 transformer with a 2.0
    VAE), metadata that contradicts the weights, and a `model.version` the file is not.
    """
    for name, found in per_component.items():
        if not found:
            raise LowvramError(
                f"{where}: its {name} weights match no LTX-2 version ({', '.join(VERSIONS)}): not an LTX-2 "
                "checkpoint lowvram knows, or a damaged file"
            )
    common = set(VERSIONS)
    seen: list[tuple[str, set[str]]] = []
    for name, found in per_component.items():
        if not common & found:
            other, other_found = next((n, f) for n, f in seen if not f & found)
            raise LowvramError(
                f"{where}: its {other} is LTX-{'/'.join(sorted(other_found))} but its {name} is "
                f"LTX-{'/'.join(sorted(found))}: components of two model versions cannot be mixed; use the "
                f"{name} of the same release"
            )
        common &= found
        seen.append((name, found))
    if stated is not None and stated not in common:
        raise LowvramError(
            f"{where}: its metadata says LTX-{stated} but its weights are LTX-{'/'.join(sorted(common))}: the file "
            "was mislabelled or modified; set model.version to what the weights are, or re-export the file"
        )
    if requested is not None:
        if requested not in common:
            raise LowvramError(
                f"model.version is {requested} but {where} is LTX-{'/'.join(sorted(common))}: set model.version = "
                f'"{sorted(common)[-1] if stated is None else stated}" or give an LTX-{requested} checkpoint'
            )
        return requested
    if stated is not None:
        return stated
    if len(common) > 1:
        # Only a file with none of the transformer's weights leaves this open (e.g. a VAE-only file).
        raise LowvramError(f"{where} could be LTX-{' or '.join(sorted(common))}: set model.version to say which")
    return next(iter(common))


def check_resume_version(saved: str | None, current: str, where: str) -> None:
    """A LoRA checkpoint trained on one version is refused on another (the adapted modules' names match, the
    weights they adapt do not)."""
    if saved is not None and saved != current:
        raise LowvramError(
            f"{where} was trained on LTX-{saved}; this run is LTX-{current}: resume it with model.version = "
            f'"{saved}" or start a new output_dir'
        )
