"""IC-LoRA (in-context control, video-to-video): each clip's clean control latents ride along as extra video tokens.

Follows the official trainer's video_to_video strategy (Lightricks/LTX-2, packages/ltx-trainer/src/ltx_trainer/
training_strategies/video_to_video.py): the reference (control) latents are clean, at timestep 0 on every token,
with their own RoPE positions (spatial axes scaled by the reference downscale factor); the target is noised as
usual (first-frame conditioning included) and the loss covers only the target's noised tokens. The mode appends the
reference after the target tokens (diffusers' LTX2InContextPipeline order): the target keeps its token indices, so
σ, noise, the first-frame mask and the target are exactly those of a plain step. The objective's per-sample masked
mean (mask 0 on the reference) equals the official slice-then-mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowvram.errors import LowvramError
from lowvram.method.objective import FlowInputs


@dataclass(frozen=True)
class InContextControl:
    reference_downscale: int = 1
    name: str = "ic_lora"

    def prepare(self, inputs: FlowInputs, predict, generator: torch.Generator) -> FlowInputs:
        if inputs.reference_video is None or inputs.reference_grid is None:
            raise LowvramError(
                "ic_lora.enabled = true but this batch has no control latents: re-run caching with ic_lora on"
            )
        return append_reference(inputs, inputs.reference_video, inputs.reference_grid, self.reference_downscale)


def reference_grid_for(latent_frames: int, latent_height: int, latent_width: int, downscale: int) -> tuple[int, ...]:
    """The control latents' grid for a target grid: same frames, height and width divided by `downscale`."""
    if latent_height % downscale or latent_width % downscale:
        raise LowvramError(
            f"a {latent_width}x{latent_height} latent grid is not divisible by ic_lora.reference_downscale = "
            f"{downscale}: use a resolution whose sides are multiples of {32 * downscale}"
        )
    return latent_frames, latent_height // downscale, latent_width // downscale


def append_reference(inputs: FlowInputs, reference: torch.Tensor, grid: tuple[int, int, int],
                     downscale: int) -> FlowInputs:  # fmt: skip
    """`inputs` with the clean `reference` tokens [B, S_r, C] appended to the video tokens: timestep 0, loss mask 0,
    a zero target (never counted), and `in_context` telling the transformer call their grid for RoPE."""
    if not inputs.train_video:
        raise LowvramError("IC-LoRA needs video tokens: this batch trains audio only (set train.mode to video or av)")
    b, s_r = reference.shape[0], reference.shape[1]
    f_r, h_r, w_r = grid
    if f_r * h_r * w_r != s_r:
        raise LowvramError(f"control tokens ({s_r}) != their latent grid {f_r}x{h_r}x{w_r}")
    if f_r != inputs.latent_frames or h_r * downscale != inputs.latent_height or w_r * downscale != inputs.latent_width:
        # The official trainer infers one factor from the shapes and refuses others (_infer_reference_downscale_factor).
        raise LowvramError(
            f"control latents {f_r}x{h_r}x{w_r} do not match the clip's {inputs.latent_frames}x"
            f"{inputs.latent_height}x{inputs.latent_width} at reference_downscale {downscale}: re-cache them"
        )
    dev = inputs.video_noisy.device
    ref = reference.to(dev, inputs.video_noisy.dtype)
    zeros = torch.zeros(b, s_r, device=dev, dtype=inputs.video_loss_mask.dtype)
    return replace(
        inputs,
        video_noisy=torch.cat([inputs.video_noisy, ref], dim=1),
        video_target=torch.cat([inputs.video_target, torch.zeros_like(ref).to(inputs.video_target.dtype)], dim=1),
        video_token_sigma=torch.cat([inputs.video_token_sigma, zeros.to(inputs.video_token_sigma.dtype)], dim=1),
        video_loss_mask=torch.cat([inputs.video_loss_mask, zeros], dim=1),
        reference_video=None,
        reference_grid=None,
        in_context=(f_r, h_r, w_r, downscale),
    )
