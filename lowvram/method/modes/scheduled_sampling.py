"""Scheduled sampling (rollout): a few no-grad Euler steps from the model's own predictions before the training step.

With probability `probability` per sample, the noisy input is made at σ + steps·sigma_step (same clean latents, same
noise) and denoised back to the step's σ by `steps` Euler steps of the model being trained; the training step then
predicts the usual flow target `noise - x0` from that rolled-out input, so it learns to correct its own drift. It
draws only from the training generator (checkpointed): resume stays bit-identical. It does not change σ or the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowvram.method.objective import FlowInputs


@dataclass(frozen=True)
class ScheduledSampling:
    probability: float = 0.5
    steps: int = 1
    sigma_step: float = 0.025
    name: str = "scheduled_sampling"

    def prepare(self, inputs: FlowInputs, predict, generator: torch.Generator) -> FlowInputs:
        b = inputs.video_sigma.shape[0]
        # One CPU draw per sample, after the objective's draws (a fixed order); no device sync to decide.
        rolled = torch.rand(b, generator=generator) < self.probability
        if not bool(rolled.any()):
            return inputs
        return rollout(inputs, predict, rolled, steps=self.steps, sigma_step=self.sigma_step)


@torch.no_grad()
def rollout(inputs: FlowInputs, predict, rolled: torch.Tensor, *, steps: int, sigma_step: float) -> FlowInputs:
    """`inputs` with the noisy latents of the `rolled` [B] samples replaced by `steps` Euler steps of `predict` from
    σ_start = min(σ + steps·sigma_step, 1) down to σ. Clean (first-frame) tokens and untrained modalities stay as
    they are. Exact algebra: x0 = x_σ - σ·target, so x at σ_start is x_σ + (σ_start - σ)·target."""
    dev = inputs.video_noisy.device
    rolled = rolled.to(dev)
    dist = steps * sigma_step

    def start_of(sigma: torch.Tensor, trained: bool) -> torch.Tensor:
        if not trained:
            return sigma
        return torch.where(rolled, (sigma + dist).clamp(max=1.0), sigma)

    sv, sa = inputs.video_sigma.float(), inputs.audio_sigma.float()
    sv0, sa0 = start_of(sv, inputs.train_video), start_of(sa, inputs.train_audio)
    # Noised video tokens: 1 - the first-frame condition mask (the loss mask in a video run); none in audio runs.
    tok = inputs.video_loss_mask.float() if inputs.train_video else torch.zeros_like(inputs.video_loss_mask).float()
    dt = inputs.video_noisy.dtype

    def per_video_token(step: torch.Tensor) -> torch.Tensor:  # [B] -> [B, S_v, 1]
        return (step.view(-1, 1) * tok).unsqueeze(-1).to(dt)

    def per_sample(step: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, 1]
        return step.view(-1, 1, 1).to(dt)

    x_v = inputs.video_noisy + per_video_token(sv0 - sv) * inputs.video_target.to(dt)
    x_a = inputs.audio_noisy + per_sample(sa0 - sa) * inputs.audio_target.to(inputs.audio_noisy.dtype)
    for j in range(steps):
        cur_v, nxt_v = sv0 + (sv - sv0) * (j / steps), sv0 + (sv - sv0) * ((j + 1) / steps)
        cur_a, nxt_a = sa0 + (sa - sa0) * (j / steps), sa0 + (sa - sa0) * ((j + 1) / steps)
        here = replace(
            inputs,
            video_noisy=x_v,
            audio_noisy=x_a,
            video_sigma=cur_v,
            audio_sigma=cur_a,
            video_token_sigma=tok * cur_v.view(-1, 1),
        )
        v_pred, a_pred = predict(here, inference=True)
        x_v = x_v + per_video_token(nxt_v - cur_v) * v_pred.to(dt)
        x_a = x_a + per_sample(nxt_a - cur_a) * a_pred.to(x_a.dtype)
    return replace(inputs, video_noisy=x_v, audio_noisy=x_a)
