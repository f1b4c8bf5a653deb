"""IC-LoRA (in-context control): the reference tokens and the loss on hand-computed tiny cases, their RoPE positions,
the loop's use of the mode, its config refusals, control-clip pairing and caching, and the planner's doubled shape
against the simulated device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lowvram.config import load_config
from lowvram.errors import ConfigError, LowvramError
from lowvram.train.modes import build_modes
from lowvram.train.modes.ic_lora import InContextControl, append_reference
from lowvram.train.objective import FlowInputs, ObjectiveConfig, flow_loss


def two_token_inputs(x0: float, noise: float, sigma: float, cond: float = 0.0) -> FlowInputs:
    """One sample, two target video tokens (2 latent frames of 1x1; the first clean when `cond`), one channel."""
    v0, vn = torch.full((1, 2, 1), x0), torch.full((1, 2, 1), noise)
    mask = torch.tensor([[1.0 - cond, 1.0]])
    noisy = (1 - sigma) * v0 + sigma * vn
    noisy[:, 0] = cond * v0[:, 0] + (1 - cond) * noisy[:, 0]
    return FlowInputs(
        video_noisy=noisy, audio_noisy=torch.zeros(1, 1, 1), video_target=vn - v0, audio_target=torch.zeros(1, 1, 1),
        video_sigma=torch.tensor([sigma]), audio_sigma=torch.tensor([0.0]), video_token_sigma=mask * sigma,
        video_loss_mask=mask, audio_loss_mask=torch.zeros(1, 1), latent_frames=2, latent_height=1, latent_width=1,
        isolate_modalities=True, train_video=True, train_audio=False,
        reference_video=torch.tensor([[[7.0], [-5.0]]]), reference_grid=(2, 1, 1),
    )  # fmt: skip


def test_reference_tokens_are_appended_clean_at_timestep_zero_and_outside_the_loss():
    inputs = two_token_inputs(x0=1.0, noise=3.0, sigma=0.5)
    out = InContextControl().prepare(inputs, predict=None, generator=torch.Generator())
    # target: (1-.5)*1 + .5*3 = 2 on both tokens; reference: its clean latents, unchanged
    assert out.video_noisy.flatten().tolist() == [2.0, 2.0, 7.0, -5.0]
    assert out.video_token_sigma.flatten().tolist() == [0.5, 0.5, 0.0, 0.0]
    assert out.video_timesteps.flatten().tolist() == [500.0, 500.0, 0.0, 0.0]
    assert out.video_loss_mask.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.video_sigma.tolist() == [0.5] and out.in_context == (2, 1, 1, 1) and out.reference_video is None
    # the loss: prediction 2.5 on the target (velocity target 3 - 1 = 2) -> 0.25, whatever the reference predicts
    cfg = ObjectiveConfig(mode="video")
    for ref_pred in (0.0, 100.0):
        pred = torch.tensor([[[2.5], [2.5], [ref_pred], [ref_pred]]])
        assert flow_loss(pred, torch.zeros(1, 1, 1), out, cfg).total.item() == pytest.approx(0.25)
    # a wrong target token counts: predictions 2.5 and 4 -> (0.25 + 4) / 2
    pred = torch.tensor([[[2.5], [4.0], [9.0], [9.0]]])
    assert flow_loss(pred, torch.zeros(1, 1, 1), out, cfg).total.item() == pytest.approx(2.125)


def test_a_clean_first_frame_stays_clean_and_only_the_noised_target_token_counts():
    out = InContextControl().prepare(two_token_inputs(1.0, 3.0, 0.5, cond=1.0), None, torch.Generator())
    assert out.video_noisy.flatten().tolist() == [1.0, 2.0, 7.0, -5.0]
    assert out.video_loss_mask.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    pred = torch.tensor([[[50.0], [2.5], [0.0], [0.0]]])  # only token 1 counts: (2.5 - 2)^2
    assert flow_loss(pred, torch.zeros(1, 1, 1), out, ObjectiveConfig(mode="video")).total.item() == pytest.approx(0.25)


def test_control_latents_that_cannot_match_the_clip_are_refused_in_one_line():
    inputs = two_token_inputs(1.0, 3.0, 0.5)
    with pytest.raises(LowvramError, match="do not match the clip's 2x1x1"):
        append_reference(inputs, torch.zeros(1, 1, 1), (1, 1, 1), 1)
    with pytest.raises(LowvramError, match="no control latents"):
        InContextControl().prepare(replace(inputs, reference_video=None), None, torch.Generator())


def _tiny_transformer(layers: int = 2) -> torch.nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    cfg = {**tiny_configs()["transformer"], "num_layers": layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_component("transformer", cfg).eval().requires_grad_(False)


def test_reference_positions_are_the_official_grid_with_scaled_spatial_axes():
    from lowvram.models.ltx2 import reference_video_coords

    model = _tiny_transformer()
    grid = (2, 4, 6)
    coords = reference_video_coords(model, 1, grid, (2, 2, 3, 2), torch.device("cpu"), fps=25.0)
    target = model.rope.prepare_video_coords(1, *grid, torch.device("cpu"), fps=25.0)
    ref = model.rope.prepare_video_coords(1, 2, 2, 3, torch.device("cpu"), fps=25.0)
    assert coords.shape == (1, 3, 48 + 12, 2)
    assert torch.equal(coords[:, :, :48], target)
    assert torch.equal(coords[:, 0, 48:], ref[:, 0])  # time unchanged
    assert torch.equal(coords[:, 1:, 48:], ref[:, 1:] * 2)  # height and width cover the target's pixel space
    same = reference_video_coords(model, 1, grid, (2, 4, 6, 1), torch.device("cpu"), fps=25.0)
    assert torch.equal(same[:, :, 48:], target)  # at full size the reference sits on the target's positions


def test_the_transformer_attends_to_the_reference_and_the_target_stays_in_place():
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward

    model = _tiny_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, generator=g)
    text = TextEmbeddings(video=torch.randn(1, 8, 16, generator=g), audio=torch.randn(1, 8, 16, generator=g),
                          mask=torch.ones(1, 8, dtype=torch.long))  # fmt: skip

    def run(ref):
        v, _ = transformer_forward(
            model, video_tokens=torch.cat([x, ref], 1), audio_tokens=torch.zeros(1, 1, 4), text=text,
            video_sigma=torch.tensor([0.5]), audio_sigma=torch.zeros(1),
            video_token_sigma=torch.tensor([[0.5] * 4 + [0.0] * 4]), latent_frames=1, latent_height=2,
            latent_width=2, fps=25.0, isolate_modalities=True, in_context=(1, 2, 2, 1),
        )  # fmt: skip
        return v

    a, b = run(torch.randn(1, 4, 8, generator=g)), run(torch.randn(1, 4, 8, generator=g))
    assert a.shape == (1, 8, 8)
    assert not torch.allclose(a[:, :4], b[:, :4])  # the control changes the target's prediction


# --------------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_mode_built_only_when_enabled():
    cfg, _ = load_config(None, {})
    assert (cfg.ic_lora.enabled, cfg.ic_lora.control_dir, cfg.ic_lora.reference_downscale) == (False, "control", 1)
    assert build_modes(cfg) == ()
    on, _ = load_config(None, {"ic_lora.enabled": True, "scheduled_sampling.enabled": True})
    assert [m.name for m in build_modes(on)] == ["ic_lora", "scheduled_sampling"]  # the rollout sees the reference


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.mode": "audio"}, "train.mode = 'audio' has no video tokens"),
        ({"train.tread_routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]},
         "would route \\(drop\\) the IC-LoRA reference tokens"),
        ({"validation.enabled": True}, "without a control clip"),
        ({"ic_lora.reference_downscale": 2}, "multiples of 64 .* got 832x480"),
    ],
)  # fmt: skip
def test_impossible_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, {"ic_lora.enabled": True, **overrides})
    assert "\n" not in str(err.value)
    load_config(None, {"ic_lora.enabled": True, "data.resolution": "768x512", "ic_lora.reference_downscale": 2})
