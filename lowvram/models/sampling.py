"""LTX-2 sampling on cached text embeddings: flow-matching Euler with classifier-free guidance, then VAE decode.

Shared by the validation renderer (train/validation.py) and the planner, which runs the same calls on fake tensors
to price the validation phase. It does not load models, move them or write files.

Why not diffusers' LTX2Pipeline: the pipeline re-encodes prompts with Gemma3 (12B) and the connectors on every call
and places every component on the transformer's device; validation here reads the connectors' cached outputs and
leaves the transformer under its training offload strategy. The schedule is the pipeline's (linspace sigmas shifted
by `calculate_shift` of the video token count, base 0.95 at 1024 tokens, max 2.05 at 4096) and the guidance is its
`uncond + g * (cond - uncond)` over one batch of [uncond, cond] rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowvram.models.ltx2.forward import TextEmbeddings, transformer_forward


@dataclass(frozen=True)
class SampleShape:
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_tokens: int  # 1 (a dummy, isolated) when the run has no audio
    video_channels: int
    audio_channels: int
    fps: float
    video: bool = True  # False: audio-only run (video is a 1-token dummy, isolated)
    audio: bool = True

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width if self.video else 1


def sigma_schedule(steps: int, video_tokens: int) -> list[float]:
    """The LTX2Pipeline schedule: linspace(1, 1/steps) time-shifted by mu(video tokens), then 0."""
    mu = 0.95 + (video_tokens - 1024) * (2.05 - 0.95) / (4096 - 1024)
    base = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)] if steps > 1 else [1.0]
    shifted = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base]
    return shifted + [0.0]


def denoise(
    transformer: torch.nn.Module,
    shape: SampleShape,
    text: TextEmbeddings,
    negative: TextEmbeddings | None,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    first_frame: torch.Tensor | None = None,
    audio_clean: torch.Tensor | None = None,
    on_step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Video and audio tokens `[1, S, C]` denoised from seeded noise (CPU generator: no global randomness).

    `first_frame` `[1, S_f, C]` (image-to-video): the first latent frame's tokens are held clean at σ 0, as in
    training's first-frame conditioning. `audio_clean` `[1, S_a, C_a]` (audio-to-video): the audio tokens are held
    clean at σ 0 and only the video is generated. Guidance > 1 runs [negative, prompt] as one batch of two.
    """
    s_v, s_a = shape.video_tokens, shape.audio_tokens
    video = torch.randn(1, s_v, shape.video_channels, generator=generator).to(device, dtype)
    audio = torch.randn(1, s_a, shape.audio_channels, generator=generator).to(device, dtype)
    n_ff = 0 if first_frame is None else first_frame.shape[1]
    if first_frame is not None:
        video[:, :n_ff] = first_frame.to(device, dtype)
    if audio_clean is not None:
        audio = audio_clean.to(device, dtype)
    cfg = negative is not None and guidance != 1.0
    rows = 2 if cfg else 1
    if cfg:
        text = TextEmbeddings(
            video=torch.cat([negative.video, text.video]).to(device, dtype),
            audio=torch.cat([negative.audio, text.audio]).to(device, dtype),
            mask=torch.cat([negative.mask, text.mask]).to(device),
        )
    else:
        text = TextEmbeddings(video=text.video.to(device, dtype), audio=text.audio.to(device, dtype),
                              mask=text.mask.to(device))  # fmt: skip
    isolate = not (shape.video and shape.audio)
    sigmas = sigma_schedule(steps, s_v)
    for i in range(steps):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        v_sigma = torch.full((rows,), sigma, device=device)
        a_sigma = torch.full((rows,), 0.0 if audio_clean is not None else sigma, device=device)
        token_sigma = None
        if n_ff:
            token_sigma = torch.full((rows, s_v), sigma, device=device)
            token_sigma[:, :n_ff] = 0.0
        v_pred, a_pred = transformer_forward(
            transformer,
            video_tokens=video.expand(rows, -1, -1),
            audio_tokens=audio.expand(rows, -1, -1),
            text=text,
            video_sigma=v_sigma,
            audio_sigma=a_sigma,
            video_token_sigma=token_sigma,
            latent_frames=shape.latent_frames if shape.video else 1,
            latent_height=shape.latent_height if shape.video else 1,
            latent_width=shape.latent_width if shape.video else 1,
            fps=shape.fps,
            isolate_modalities=isolate,
        )
        if cfg:
            v_pred = v_pred[:1] + guidance * (v_pred[1:] - v_pred[:1])
            a_pred = a_pred[:1] + guidance * (a_pred[1:] - a_pred[:1])
        step = nxt - sigma
        new_video = video + step * v_pred.to(dtype)
        if n_ff:
            new_video[:, :n_ff] = video[:, :n_ff]
        video = new_video
        del v_pred
        if audio_clean is None:
            audio = audio + step * a_pred.to(dtype)
        del a_pred
        if on_step is not None:
            on_step(i + 1, steps)
    return video, audio


def decode_video(video_vae, tokens: torch.Tensor, shape: SampleShape, options=None) -> torch.Tensor:
    """Denoised video tokens -> frames `[F, H, W, 3]` uint8, decoded with the VAE options given (tiling etc.)."""
    import contextlib

    from lowvram.models.ltx2.forward import denormalize_video_latents, unpack_video_latents

    latents = unpack_video_latents(tokens, shape.latent_frames, shape.latent_height, shape.latent_width)
    latents = denormalize_video_latents(latents, video_vae).to(next(video_vae.parameters()).dtype)
    context = contextlib.nullcontext()
    if options is not None and options.tiling:
        from lowvram.vae import vae_memory_options

        # The same tiling switches as caching (spatial tiles, and temporal tiles through use_framewise_decoding).
        context = vae_memory_options(video_vae, options)
    with context:
        # A timestep-conditioned decoder gets LTX2Pipeline's default decode_timestep 0 (its noise scale 0 too).
        temb = None
        if getattr(video_vae.config, "timestep_conditioning", False):
            temb = torch.zeros(1, device=latents.device, dtype=latents.dtype)
        pixels = video_vae.decode(latents, temb, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
    del latents
    frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0)


def decode_audio(audio_vae, vocoder, tokens: torch.Tensor) -> torch.Tensor:
    """Denoised audio tokens -> waveform `[channels, samples]` float in [-1, 1] (audio VAE decode, then vocoder)."""
    from lowvram.models.ltx2.forward import denormalize_audio_latents, unpack_audio_latents

    latents = denormalize_audio_latents(tokens, audio_vae)
    latents = unpack_audio_latents(latents, audio_vae.config.mel_bins // 4).to(next(audio_vae.parameters()).dtype)
    mel = audio_vae.decode(latents, return_dict=False)[0]
    wave = vocoder(mel.to(next(vocoder.parameters()).dtype))
    return wave[0].float().clamp(-1, 1)
