"""The flow-matching objective of LTX-2 training: σ sampling, noisy inputs, velocity targets, masks and the loss.

It follows the official LTX-2 trainer (stretched shifted logit-normal σ, per-token timesteps, first-frame
conditioning, masked MSE per sample then the batch mean). It never calls the transformer and never touches devices
beyond the tensors it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowvram.errors import ConfigError

SigmaSampling = Literal["shifted_logit_normal", "uniform", "fixed_shift"]
Mode = Literal["av", "video", "audio"]

# Official trainer constants (Lightricks/LTX-2 packages/ltx-trainer timestep_samplers.py): the shift is the line
# through (1024 tokens, 0.95) and (4096 tokens, 2.05), extended both ways with no cap. A cap at 4096 exists only in
# an unmerged pull-request commit (32ac2e1, 2026-06-08); the trainer's main branch (checked at 400fd31, 2026-08-16)
# has none, so a 6144-token clip trains at μ 2.80, not 2.05.
SHIFT_MIN_TOKENS = 1024
SHIFT_MAX_TOKENS = 4096
SHIFT_AT_MIN = 0.95
SHIFT_AT_MAX = 2.05
# Above this many tokens the official float32 arithmetic breaks down (measured against an exact float64 evaluation
# of the same formula over 100k draws: max σ error 2.8e-4 at 24576 tokens, 5.7e-4 at 28672, 4e-3 at 30720, 0.18 at
# 45000 where σ collapses to 1, NaN for every draw from ~53000 on): there, and only there, the same distribution is
# evaluated through log-sigmoids in float64, finite for any token count.
EXACT_STRETCH_ABOVE_TOKENS = 28672
# Standard-normal quantiles the official trainer stretches between: 99.9th and 0.5th percentiles.
NORMAL_Q999 = 3.0902
NORMAL_Q005 = -2.5758


@dataclass(frozen=True)
class ObjectiveConfig:
    """How σ is drawn and how the loss is weighted. Defaults are the official LTX-2 trainer's."""

    sigma_sampling: SigmaSampling = "shifted_logit_normal"
    fixed_shift: float = 1.0
    independent_audio_sigma: bool = True
    first_frame_conditioning_p: float = 0.0  # text-to-video, as the official t2v config; i2v uses 0.5
    audio_loss_weight: float = 1.0
    mode: Mode = "av"
    logit_std: float = 1.0
    uniform_prob: float = 0.1
    eps: float = 1e-3

    @classmethod
    def from_train_section(cls, train) -> ObjectiveConfig:
        """Read the objective's options from `RunConfig.train`."""
        return cls(
            sigma_sampling=train.sigma_sampling,
            fixed_shift=train.fixed_shift,
            independent_audio_sigma=train.independent_audio_sigma,
            first_frame_conditioning_p=train.conditioning_p,
            audio_loss_weight=train.audio_loss_weight,
            mode=train.mode,
        )


@dataclass(frozen=True)
class FlowInputs:
    """Everything one transformer call and its loss need, for one micro-batch of packed latents.

    `video_token_sigma` is 0 on clean (conditioning) tokens; the transformer receives σ·1000 per token.
    Loss masks are float 0/1: `video_loss_mask` [B, S_v], `audio_loss_mask` [B, S_a].
    """

    video_noisy: torch.Tensor  # [B, S_v, C]
    audio_noisy: torch.Tensor  # [B, S_a, C_a]
    video_target: torch.Tensor  # noise - x0
    audio_target: torch.Tensor
    video_sigma: torch.Tensor  # [B]
    audio_sigma: torch.Tensor  # [B]
    video_token_sigma: torch.Tensor  # [B, S_v]
    video_loss_mask: torch.Tensor  # [B, S_v]
    audio_loss_mask: torch.Tensor  # [B, S_a]
    latent_frames: int
    latent_height: int
    latent_width: int
    isolate_modalities: bool
    train_video: bool
    train_audio: bool

    @property
    def video_timesteps(self) -> torch.Tensor:
        """Per-token timesteps as diffusers' LTX-2 transformer reads them: σ·1000 (it does not scale inside)."""
        return self.video_token_sigma.float() * 1000.0

    @property
    def audio_timesteps(self) -> torch.Tensor:
        return self.audio_sigma.float() * 1000.0


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor  # scalar with grad
    video: torch.Tensor  # scalar, detached
    audio: torch.Tensor  # scalar, detached


# --------------------------------------------------------------------------------------------------------------------
# σ sampling


def token_count_shift(seq_len: int) -> float:
    """μ of the shifted logit-normal: 0.95 at 1024 tokens rising linearly by 1.1 per 3072 tokens, without a cap."""
    slope = (SHIFT_AT_MAX - SHIFT_AT_MIN) / (SHIFT_MAX_TOKENS - SHIFT_MIN_TOKENS)
    return slope * seq_len + (SHIFT_AT_MIN - slope * SHIFT_MIN_TOKENS)


def stretch_logit_normal(
    normal: torch.Tensor, mu: float, std: float = 1.0, eps: float = 1e-3, *, exact: bool = False
) -> torch.Tensor:
    """Map draws of N(mu, std) to σ: sigmoid, stretch the [0.5%, 99.9%] percentiles to [0, 1], reflect below eps.

    The stretch makes the distribution reach both ends of [0, 1] (plain sigmoid of N(mu, 1) rarely does). By
    default the official trainer's float32 arithmetic, step for step (so σ equals its σ for the same draws);
    `exact` evaluates the same formula as `(s(-a) - s(-z)) / (s(-a) - s(-b))` with `s(-x) = 1 - sigmoid(x)`
    through log-sigmoids in float64, which stays finite where the float32 form divides 0 by 0.
    """
    lo_x, hi_x = mu + NORMAL_Q005 * std, mu + NORMAL_Q999 * std
    if exact:
        f = torch.nn.functional.logsigmoid
        z = normal.double()
        log_lo = f(torch.tensor(-lo_x, dtype=torch.float64))
        num = -torch.expm1(f(-z) - log_lo)
        den = -torch.expm1(f(torch.tensor(-hi_x, dtype=torch.float64)) - log_lo)
        raw = (num / den).to(normal.dtype)
    else:
        lo = torch.sigmoid(torch.tensor(lo_x, dtype=normal.dtype, device=normal.device))
        hi = torch.sigmoid(torch.tensor(hi_x, dtype=normal.dtype, device=normal.device))
        raw = (torch.sigmoid(normal) - lo) / (hi - lo)
    reflected = torch.where(raw >= eps, raw, 2 * eps - raw)
    return reflected.clamp(0.0, 1.0)


def time_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style fixed shift of uniform times: shift·u / (1 + (shift-1)·u). shift > 1 moves σ towards noise."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(batch_size: int, seq_len: int, cfg: ObjectiveConfig, generator: torch.Generator) -> torch.Tensor:
    """One σ in [0, 1] per sample (float32, on the generator's device). `seq_len` drives the logit-normal shift."""
    if cfg.sigma_sampling == "uniform":
        return torch.rand(batch_size, generator=generator)
    if cfg.sigma_sampling == "fixed_shift":
        return time_shift(torch.rand(batch_size, generator=generator), cfg.fixed_shift)
    if cfg.sigma_sampling != "shifted_logit_normal":
        raise ConfigError(
            f"unknown sigma_sampling '{cfg.sigma_sampling}'; valid: shifted_logit_normal, uniform, fixed_shift"
        )
    mu = token_count_shift(seq_len)
    # Draw order is fixed (normal, uniform, coin) so a resumed run reproduces the same σ sequence.
    normal = torch.randn(batch_size, generator=generator) * cfg.logit_std + mu
    stretched = stretch_logit_normal(normal, mu, cfg.logit_std, cfg.eps, exact=seq_len > EXACT_STRETCH_ABOVE_TOKENS)
    uniform = (1.0 - cfg.eps) * torch.rand(batch_size, generator=generator) + cfg.eps
    coin = torch.rand(batch_size, generator=generator)
    # The uniform share keeps every noise level trained even at high token counts, where μ is large.
    return torch.where(coin > cfg.uniform_prob, stretched, uniform)


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def first_frame_mask(batch_size: int, seq_len: int, tokens_per_frame: int, apply: torch.Tensor) -> torch.Tensor:
    """[B, S] float: 1 on the first latent frame's tokens of the samples where `apply` [B] is true."""
    mask = torch.zeros(batch_size, seq_len)
    mask[:, :tokens_per_frame] = 1.0
    return mask * apply.view(-1, 1).float()


def prepare_inputs(
    video: torch.Tensor | None,
    audio: torch.Tensor | None,
    *,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    audio_channels: int | None = None,
    video_channels: int | None = None,
    audio_present: torch.Tensor | None = None,
) -> FlowInputs:
    """Noise packed, normalized latents for one step: `x_t = (1-σ)·x0 + σ·noise`, target `noise - x0`.

    `video` [B, S_v, C] and `audio` [B, S_a, C_a] are clean packed latents. In `video` mode the audio branch gets
    a 1-token zero dummy (and in `audio` mode the video branch does) with `isolate_modalities`, because a
    zero-length modality crashes RoPE; the dummy is clean (σ 0) and its loss is masked. `audio_present` [B] masks
    the audio loss of clips without sound. All random draws come from `generator` (CPU) in a fixed order.
    """
    train_video = cfg.mode in ("av", "video")
    train_audio = cfg.mode in ("av", "audio")
    ref = video if video is not None else audio
    if ref is None:
        raise ValueError("prepare_inputs needs video or audio latents")
    b, device, dtype = ref.shape[0], ref.device, ref.dtype

    if not train_video:
        c_v = video.shape[-1] if video is not None else video_channels
        if c_v is None:
            raise ValueError("audio mode without video latents needs video_channels for the dummy token")
        video = torch.zeros(b, 1, c_v, device=device, dtype=dtype)
        latent_frames = latent_height = latent_width = 1
    if not train_audio:
        c_a = audio.shape[-1] if audio is not None else audio_channels
        if c_a is None:
            raise ValueError("video mode without audio latents needs audio_channels for the dummy token")
        audio = torch.zeros(b, 1, c_a, device=device, dtype=dtype)
    if video is None or audio is None:
        raise ValueError(f"mode '{cfg.mode}' needs {'video' if video is None else 'audio'} latents")

    s_v, s_a = video.shape[1], audio.shape[1]
    if train_video and latent_frames * latent_height * latent_width != s_v:
        raise ValueError(f"video tokens {s_v} != {latent_frames}x{latent_height}x{latent_width} latent grid")

    # Fixed draw order: video σ, audio σ, first-frame coins, video noise, audio noise.
    video_sigma = sample_sigmas(b, s_v, cfg, generator)
    if cfg.independent_audio_sigma:
        # Audio learns poorly when it shares the video's σ (users' reports); the official trainer draws its own,
        # shifted by the audio token count.
        audio_sigma = sample_sigmas(b, s_a, cfg, generator)
    else:
        audio_sigma = video_sigma.clone()
    coins = torch.rand(b, generator=generator)
    video_noise = torch.randn(video.shape, generator=generator)
    audio_noise = torch.randn(audio.shape, generator=generator)

    if not train_video:
        video_sigma = torch.zeros(b)
    if not train_audio:
        audio_sigma = torch.zeros(b)

    conditioned = coins < cfg.first_frame_conditioning_p if train_video else torch.zeros(b, dtype=torch.bool)
    cond_mask = first_frame_mask(b, s_v, latent_height * latent_width, conditioned)

    video_noise = video_noise.to(device, dtype)
    audio_noise = audio_noise.to(device, dtype)
    sv = video_sigma.to(device, dtype).view(b, 1, 1)
    sa = audio_sigma.to(device, dtype).view(b, 1, 1)
    video_noisy = (1 - sv) * video + sv * video_noise
    audio_noisy = (1 - sa) * audio + sa * audio_noise
    # Conditioned tokens are the clean latents, at timestep 0, outside the loss.
    m = cond_mask.to(device, dtype).unsqueeze(-1)
    video_noisy = m * video + (1 - m) * video_noisy
    video_token_sigma = (1 - cond_mask) * video_sigma.view(b, 1)

    video_loss_mask = (1 - cond_mask) if train_video else torch.zeros(b, s_v)
    audio_loss_mask = torch.ones(b, s_a) if train_audio else torch.zeros(b, s_a)
    if audio_present is not None and train_audio:
        audio_loss_mask = audio_loss_mask * audio_present.view(b, 1).float().cpu()

    return FlowInputs(
        video_noisy=video_noisy,
        audio_noisy=audio_noisy,
        video_target=video_noise - video,
        audio_target=audio_noise - audio,
        video_sigma=video_sigma.to(device),
        audio_sigma=audio_sigma.to(device),
        video_token_sigma=video_token_sigma.to(device),
        video_loss_mask=video_loss_mask.to(device),
        audio_loss_mask=audio_loss_mask.to(device),
        latent_frames=latent_frames,
        latent_height=latent_height,
        latent_width=latent_width,
        isolate_modalities=cfg.mode != "av",
        train_video=train_video,
        train_audio=train_audio,
    )


# --------------------------------------------------------------------------------------------------------------------
# Loss


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: each sample's `(err² · mask).mean() / mask.mean()` over its [S, C], in float32; 0 where nothing counts.

    The official trainer's reduction: each sample is normalised by its own mask, so a first-frame-conditioned clip
    (fewer counted tokens) weighs as much in the batch as an unconditioned one.
    """
    err = (pred.float() - target.float()).pow(2)
    m = mask.float().unsqueeze(-1)
    # The clamp (the official trainer's 1e-8) turns an all-masked sample into a zero loss with a zero grad instead
    # of 0/0, without the host sync an `if` on the value would cost every step.
    return (err * m).mean(dim=(-2, -1)) / m.mean(dim=(-2, -1)).clamp_min(1e-8)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch mean of `masked_mse_per_sample` (the official per-sample masked mean, then the mean over B)."""
    return masked_mse_per_sample(pred, target, mask).mean()


def flow_loss(
    video_pred: torch.Tensor, audio_pred: torch.Tensor, inputs: FlowInputs, cfg: ObjectiveConfig
) -> LossParts:
    """Video loss + `audio_loss_weight` × audio loss, each a per-sample masked MSE against the velocity target,
    averaged over the batch (the official trainer's loss; its audio weight is 1)."""
    video = masked_mse(video_pred, inputs.video_target, inputs.video_loss_mask)
    audio = masked_mse(audio_pred, inputs.audio_target, inputs.audio_loss_mask)
    total = video + cfg.audio_loss_weight * audio
    return LossParts(total=total, video=video.detach(), audio=audio.detach())
