"""The LTX-2 forward for training: text encoding, latent normalize/pack, one transformer call.

It calls the real diffusers / transformers modules; it does not sample sigmas, compute losses, or move modules
between devices (method/objective.py and the offload strategies do), and it builds or loads nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowvram.errors import LowvramError

if TYPE_CHECKING:
    from lowvram.models.ltx2.build import LTX2Components


@dataclass(frozen=True)
class TextEmbeddings:
    """Connector outputs for a batch of captions: what the transformer reads (and what the text cache stores)."""

    video: torch.Tensor  # [B, L, caption_channels]
    audio: torch.Tensor  # [B, L, caption_channels]
    mask: torch.Tensor  # [B, L] 1 = attend (registers replace padding, so usually all ones)


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
    if latent_frames * latent_height * latent_width != s_v:
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
        use_cross_timestep=forward_semantics(transformer.config).use_cross_timestep,
        return_dict=False,
    )
    return video_pred, audio_pred
