"""LTX-2 components for training: tiny and real configs, text encoding, latent normalize/pack, the training forward.

It builds and calls the real diffusers / transformers classes; it does not sample sigmas, compute losses, or move
modules between devices (train/objective.py and the offload strategies do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lowvram.errors import LowvramError

# Special ids follow Gemma3's text config defaults (pad 0, eos 1, bos 2) so the tiny tokenizer and the tiny Gemma
# agree without extra config.
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")

# Words of the demo captions (coloured shapes moving, a tone per clip) plus common glue words. Anything else maps
# to <unk>; digits are split one by one so any number is covered.
_TINY_WORDS = """
a an the and or with of in on at to from into over under across around through toward towards away along
between while then as is are it its this that there one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 , . ; : - ! ? ' "
red green blue yellow orange purple pink white black gray grey cyan magenta brown light dark bright pale
colored coloured colorful colourful
circle circles square squares triangle triangles rectangle rectangles star stars disc ball balls box boxes
dot dots ring rings cube sphere hexagon diamond ellipse oval line lines shape shapes object objects block blocks
moves move moving slides slide sliding bounces bounce bouncing spins spin spinning rotates rotate rotating
grows grow growing shrinks shrink shrinking falls fall falling rises rise rising drifts drift drifting
zooms zoom zooming pulses pulse pulsing flies fly flying jumps jump jumping glides glide gliding
stays still static
left right up down upward downward horizontally vertically diagonally clockwise counterclockwise
center centre middle top bottom corner edge side sides back forth
slowly quickly fast slow smooth smoothly steady steadily small large big tiny
background foreground screen frame frames scene video plain solid empty
tone tones sound sounds beep beeps hum hums plays play playing low high pitch pitched note notes hz loud quiet
soft sine wave audio silence silent
""".split()


@dataclass
class LTX2Components:
    """The seven pieces of an LTX-2 training setup. Modules are plain diffusers / transformers objects."""

    transformer: Any  # diffusers LTX2VideoTransformer3DModel
    video_vae: Any  # diffusers AutoencoderKLLTX2Video
    audio_vae: Any  # diffusers AutoencoderKLLTX2Audio
    vocoder: Any  # diffusers LTX2Vocoder
    text_encoder: Any  # transformers Gemma3ForConditionalGeneration
    tokenizer: Any  # transformers fast tokenizer, left padding
    connectors: Any  # diffusers LTX2TextConnectors
    # component -> lowvram.quant.stream.LoadResult, for each component loaded at a quantized precision (cache
    # hit or not, which Linears were quantized, bytes allocated); empty for bf16/fp32 loads.
    quant_loads: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextEmbeddings:
    """Connector outputs for a batch of captions: what the transformer reads (and what the text cache stores)."""

    video: torch.Tensor  # [B, L, caption_channels]
    audio: torch.Tensor  # [B, L, caption_channels]
    mask: torch.Tensor  # [B, L] 1 = attend (registers replace padding, so usually all ones)


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
# Building


def text_encoder_classes(model_type: str = "gemma3"):
    """(config class, model class) of a text encoder by its transformers `model_type` (gemma3 or gemma4_unified)."""
    if model_type == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        return Gemma3Config, Gemma3ForConditionalGeneration
    if model_type == "gemma4_unified":
        try:
            from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
        except ImportError:
            import transformers

            raise LowvramError(
                f"LTX-2.5's Gemma 4 text encoder needs transformers with Gemma4UnifiedForConditionalGeneration "
                f"(>= 5.10); this one is {transformers.__version__}: upgrade transformers"
            ) from None
        return Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
    raise LowvramError(f"text encoder model_type {model_type!r} is not an LTX-2 text encoder (gemma3, gemma4_unified)")


def build_text_encoder(config: dict[str, Any]):
    """The text encoder from config kwargs or a config.json's `to_dict()` (its `model_type` picks Gemma 3 or 4)."""
    config = dict(config)
    config_cls, model_cls = text_encoder_classes(config.pop("model_type", "gemma3"))
    return model_cls(config_cls.from_dict(config))


def text_embedding_widths(transformer_config: Any) -> tuple[int, int]:
    """Widths of the (video, audio) text embeddings the transformer reads (= the connectors' outputs, the cache).

    LTX-2.0 projects the 3840-wide connector outputs inside the transformer (`use_prompt_embeddings`); 2.3/2.5's
    connectors project per modality to the attention widths (4096 / 2048) and the transformer reads them as they are
    (diffusers LTX2VideoTransformer3DModel.forward step 4, LTX2TextConnectors per_modality_projections).
    """
    get = (
        transformer_config.get
        if isinstance(transformer_config, dict)
        else (lambda k, d=None: getattr(transformer_config, k, d))
    )
    if get("use_prompt_embeddings", True):
        return get("caption_channels"), get("caption_channels")
    return get("cross_attention_dim"), get("audio_cross_attention_dim")


def build_component(name: str, config: dict[str, Any]):
    """Construct one component (random init) from its constructor kwargs; `name` is a field of LTX2Components."""
    if name == "text_encoder":
        return build_text_encoder(config)
    cls = _diffusers_class(name, config)
    return cls(**config)


def _diffusers_class(name: str, config: dict[str, Any] | None = None):
    if name == "transformer":
        from diffusers import LTX2VideoTransformer3DModel as cls
    elif name == "video_vae":
        from diffusers import AutoencoderKLLTX2Video as cls
    elif name == "audio_vae":
        from diffusers import AutoencoderKLLTX2Audio as cls
    elif name == "vocoder" and "bwe_hidden_channels" in (config or {}):
        # LTX-2.3/2.5: diffusers' convert_ltx2_vocoder builds LTX2VocoderWithBWE for them.
        from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE as cls
    elif name == "vocoder":
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as cls
    elif name == "connectors":
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as cls
    else:
        raise ValueError(f"unknown LTX-2 component {name!r}")
    return cls


def build_tiny_tokenizer(max_length: int = TINY_MAX_TEXT_TOKENS):
    """A word-level tokenizer over the demo vocabulary, as a transformers fast tokenizer padding on the left."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(_TINY_WORDS))
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    if len(vocab) > tiny_configs()["text_encoder"]["text_config"]["vocab_size"]:
        raise AssertionError("tiny vocabulary outgrew the tiny Gemma's embedding table")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Whitespace()]
    )
    # Gemma prepends <bos>; so does this one, so the real and tiny text paths see the same structure.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_length,
    )


def build_tiny_components(
    seed: int = 0, dtype: torch.dtype = torch.float32, version: str | None = None
) -> LTX2Components:
    """The tiny family member: every real class at toy size, deterministic for a given seed, on CPU.

    Each component draws from its own seed so adding one never changes another's weights. The global RNG is left
    untouched. VAE latent statistics are set to non-trivial values so normalization is exercised. `version` picks
    the LTX-2 release whose flags the tiny model has.
    """
    cfgs = tiny_configs(version or "2.0")
    built: dict[str, Any] = {}
    for i, name in enumerate(("transformer", "video_vae", "audio_vae", "vocoder", "text_encoder", "connectors")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            module = build_component(name, cfgs[name])
            if name in ("video_vae", "audio_vae"):
                n = module.latents_mean.numel()
                module.latents_mean.copy_(0.1 * torch.randn(n))
                module.latents_std.copy_(1.0 + 0.5 * torch.rand(n))
        if dtype != torch.float32:
            module = module.to(dtype)
        built[name] = module.eval().requires_grad_(False)
    return LTX2Components(tokenizer=build_tiny_tokenizer(), **built)


def load_components(checkpoint, text_encoder=None, **kwargs) -> LTX2Components:
    """Load from the official single .safetensors or a diffusers folder (+ a local Gemma3 folder).

    See `lowvram.models.ltx2_checkpoint.load_components` for the options (family, dtype, device, components, and
    precision / text_encoder_precision / quant_cache_dir / profile: quantize while reading, at low host RAM).
    """
    from lowvram.models.ltx2_checkpoint import load_components as _load

    return _load(checkpoint, text_encoder, **kwargs)


def build_on_meta(
    component: str, config: dict[str, Any] | None = None, family: str = "ltx-2.0", version: str | None = None
):
    """The real class on the meta device (ltx-2.0 configs by default; `version` picks 2.3 / 2.5): what the planner
    measures."""
    from lowvram.models.ltx2_checkpoint import build_on_meta as _build

    return _build(component, config, family, version)


# --------------------------------------------------------------------------------------------------------------------
# Text


@torch.no_grad()
def encode_prompt_hidden_states(
    text_encoder, tokenizer, captions: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma3 on left-padded captions; returns all hidden states stacked `[B, L, hidden*(layers+1)]` and the mask.

    This is what diffusers' LTX2Pipeline feeds its connectors (embeddings + every layer, stacked on the last axis), for
    Gemma 3 (LTX-2.0/2.3) and Gemma 4 (2.5) alike: `_get_gemma_prompt_embeds` stacks `hidden_states` whatever the
    encoder, and ltx-core sizes the feature extractor as hidden_size x (num_hidden_layers + 1) for either
    (encoder_configurator._create_feature_extractor). The connectors then normalise per layer (2.0) or per token
    (2.3/2.5, `per_modality_projections`): that difference lives in the connectors' config, not here.
    """
    if tokenizer.padding_side != "left":
        # LTX-2's connectors normalise assuming left padding; right padding silently shifts the registers.
        raise LowvramError("the LTX-2 tokenizer must pad on the left: set padding_side='left' in its config")
    device = next(text_encoder.parameters()).device
    inputs = tokenizer(
        [c.strip() for c in captions],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    stacked = torch.stack(out.hidden_states, dim=-1).flatten(2, 3)
    return stacked, mask


@torch.no_grad()
def run_connectors(connectors, stacked_hidden_states: torch.Tensor, mask: torch.Tensor) -> TextEmbeddings:
    """The frozen connectors: stacked Gemma states -> video and audio text embeddings (exact to cache)."""
    param = next(connectors.parameters())
    video, audio, out_mask = connectors(
        stacked_hidden_states.to(param.device, param.dtype), mask.to(param.device), padding_side="left"
    )
    return TextEmbeddings(video=video, audio=audio, mask=out_mask)


def encode_text(components: LTX2Components, captions: list[str], max_length: int) -> TextEmbeddings:
    """Captions -> connector outputs, as LTX2Pipeline does. `max_length` must be a multiple of the register count."""
    registers = components.connectors.config.video_connector_num_learnable_registers or 1
    if max_length % registers:
        fix = math.ceil(max_length / registers) * registers
        raise LowvramError(
            f"text max_length {max_length} is not a multiple of the connectors' {registers} registers: use {fix}"
        )
    stacked, mask = encode_prompt_hidden_states(components.text_encoder, components.tokenizer, captions, max_length)
    return run_connectors(components.connectors, stacked, mask)


# --------------------------------------------------------------------------------------------------------------------
# Latents


def normalize_video_latents(latents: torch.Tensor, video_vae) -> torch.Tensor:
    """Per-channel `(z - mean) / std` of `[B, C, F, H, W]` VAE latents (scaling factor 1 for LTX-2)."""
    mean = video_vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    std = video_vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return (latents - mean) * video_vae.config.scaling_factor / std


def denormalize_video_latents(latents: torch.Tensor, video_vae) -> torch.Tensor:
    mean = video_vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    std = video_vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return latents * std / video_vae.config.scaling_factor + mean


def normalize_audio_latents(packed: torch.Tensor, audio_vae) -> torch.Tensor:
    """`(z - mean) / std` of PACKED audio latents `[B, T, C*F]`: the audio statistics are per packed feature."""
    mean = audio_vae.latents_mean.to(packed.device, packed.dtype)
    std = audio_vae.latents_std.to(packed.device, packed.dtype)
    return (packed - mean) / std


def denormalize_audio_latents(packed: torch.Tensor, audio_vae) -> torch.Tensor:
    mean = audio_vae.latents_mean.to(packed.device, packed.dtype)
    std = audio_vae.latents_std.to(packed.device, packed.dtype)
    return packed * std + mean


def pack_video_latents(latents: torch.Tensor) -> torch.Tensor:
    """`b c f h w -> b (f h w) c` (LTX-2 uses patch size 1)."""
    return latents.flatten(2).transpose(1, 2)


def unpack_video_latents(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, frames, height, width)


def pack_audio_latents(latents: torch.Tensor) -> torch.Tensor:
    """`b c t f -> b t (c f)`."""
    return latents.transpose(1, 2).flatten(2, 3)


def unpack_audio_latents(tokens: torch.Tensor, mel_bins: int) -> torch.Tensor:
    return tokens.unflatten(2, (-1, mel_bins)).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# The training forward


def reference_video_coords(transformer, batch: int, grid: tuple[int, int, int], in_context: tuple[int, int, int, int],
                           device, fps: float) -> torch.Tensor:  # fmt: skip
    """RoPE positions [B, 3, S + S_r, 2] of the target grid's tokens followed by the reference tokens'.

    As the official trainer's video_to_video strategy (ltx-trainer training_strategies/video_to_video.py) and
    diffusers' LTX2InContextPipeline build them: each sequence gets the transformer's own grid positions, the
    reference's height and width axes (not time) multiplied by its downscale factor so that it covers the target's
    pixel space. The official trainer puts the reference first; attention and the per-token layers do not depend on
    token order once positions are explicit, so appending it after the target (as the pipeline does) is the same.
    """
    rope = transformer.rope
    f_r, h_r, w_r, downscale = in_context
    target = rope.prepare_video_coords(batch, *grid, device, fps=fps)
    ref = rope.prepare_video_coords(batch, f_r, h_r, w_r, device, fps=fps)
    if downscale != 1:
        ref = torch.cat([ref[:, :1], ref[:, 1:] * downscale], dim=1)
    return torch.cat([target, ref], dim=2)


def transformer_forward(
    transformer,
    *,
    video_tokens: torch.Tensor,
    audio_tokens: torch.Tensor,
    text: TextEmbeddings,
    video_sigma: torch.Tensor,
    audio_sigma: torch.Tensor,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    fps: float,
    video_token_sigma: torch.Tensor | None = None,
    audio_token_sigma: torch.Tensor | None = None,
    isolate_modalities: bool = False,
    in_context: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LTX-2.0 transformer call on packed noisy tokens; returns the (video, audio) velocity predictions.

    `video_sigma` / `audio_sigma` are per sample `[B]`; `video_token_sigma` `[B, S_v]` (and `audio_token_sigma`
    `[B, S_a]`) override them per token, e.g. 0 on clean first-frame tokens. diffusers does not scale timesteps
    inside, so σ·1000 is passed. The version's semantics come from the transformer's own config
    (`versions.forward_semantics`): `use_cross_timestep` False for LTX-2.0, True for 2.3/2.5 (diffusers LTX2Pipeline:
    "`True` is the LTX-2.3/2.5 behavior"); `sigma` / `audio_sigma` (per sample, not per token) feed 2.3's prompt
    AdaLN, as ltx-core's TransformerArgsPreprocessor.prepare feeds `modality.sigma` to `prompt_adaln`, and the
    cross-timestep gate. The official trainer passes no keyframes mask in training (ltx-trainer training_strategies
    set none), so 2.5's keyframe embedding is left unused here too.
    """
    from lowvram.models.versions import forward_semantics

    b, s_v, _ = video_tokens.shape
    s_a = audio_tokens.shape[1]
    if s_v == 0 or s_a == 0:
        # A zero-length modality crashes RoPE inside diffusers; say what to do instead of a shape error.
        raise LowvramError("a modality has no tokens: pass a 1-token dummy and isolate_modalities=True")
    video_coords = None
    if in_context is not None:
        video_coords = reference_video_coords(transformer, b, (latent_frames, latent_height, latent_width),
                                              in_context, video_tokens.device, fps)  # fmt: skip
        if video_coords.shape[2] != s_v:
            raise LowvramError(f"video tokens ({s_v}) != target + reference tokens ({video_coords.shape[2]})")
    elif latent_frames * latent_height * latent_width != s_v:
        raise LowvramError(
            f"video tokens ({s_v}) != latent frames x height x width ({latent_frames}x{latent_height}x{latent_width})"
        )
    # float32 before the x1000: bf16 sigmas would lose the timestep's low digits.
    v_tok = video_token_sigma if video_token_sigma is not None else video_sigma.view(b, 1).expand(b, s_v)
    a_tok = audio_token_sigma if audio_token_sigma is not None else audio_sigma.view(b)
    dtype = video_tokens.dtype
    video_pred, audio_pred = transformer(
        hidden_states=video_tokens,
        audio_hidden_states=audio_tokens,
        encoder_hidden_states=text.video.to(dtype),
        audio_encoder_hidden_states=text.audio.to(dtype),
        encoder_attention_mask=text.mask,
        audio_encoder_attention_mask=text.mask,
        timestep=v_tok.float() * 1000.0,
        audio_timestep=a_tok.float() * 1000.0,
        sigma=video_sigma.float().view(b) * 1000.0,
        audio_sigma=audio_sigma.float().view(b) * 1000.0,
        num_frames=latent_frames,
        height=latent_height,
        width=latent_width,
        fps=fps,
        audio_num_frames=s_a,
        isolate_modalities=isolate_modalities,
        video_coords=video_coords,
        use_cross_timestep=forward_semantics(transformer.config).use_cross_timestep,
        return_dict=False,
    )
    return video_pred, audio_pred
