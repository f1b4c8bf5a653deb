"""The flow-matching objective against hand-computed values on tiny tensors."""

import math

import pytest
import torch

from lowvram.method.objective import (
    ObjectiveConfig,
    flow_loss,
    masked_mse,
    prepare_inputs,
    sample_sigmas,
    stretch_logit_normal,
    time_shift,
    token_count_shift,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_token_count_shift_is_the_line_through_1024_and_4096_without_a_cap():
    assert token_count_shift(1024) == pytest.approx(0.95)
    assert token_count_shift(2560) == pytest.approx(0.95 + 1536 * 1.1 / 3072)
    assert token_count_shift(4096) == pytest.approx(2.05)
    assert token_count_shift(100_000) == pytest.approx(0.95 + (100_000 - 1024) * 1.1 / 3072)
    assert token_count_shift(0) == pytest.approx(0.95 - 1024 * 1.1 / 3072)


def test_stretch_maps_percentiles_to_the_ends_and_reflects_below_eps():
    mu, eps = 0.95, 1e-3
    lo, hi = sigmoid(mu - 2.5758), sigmoid(mu + 3.0902)
    x = torch.tensor([mu - 2.5758, mu + 3.0902, mu, mu + 10.0, mu - 10.0], dtype=torch.float64)
    got = stretch_logit_normal(x, mu, 1.0, eps)
    assert got[0].item() == pytest.approx(2 * eps, abs=1e-9)  # raw 0 reflected around eps
    assert got[1].item() == pytest.approx(1.0, abs=1e-9)
    assert got[2].item() == pytest.approx((sigmoid(mu) - lo) / (hi - lo), rel=1e-9)
    assert got[3].item() == 1.0  # clamped
    raw_low = (sigmoid(mu - 10.0) - lo) / (hi - lo)
    assert got[4].item() == pytest.approx(min(1.0, 2 * eps - raw_low), rel=1e-9)


def test_shifted_logit_normal_without_uniform_mix_is_the_stretched_normal_draws():
    cfg = ObjectiveConfig(uniform_prob=0.0)
    got = sample_sigmas(6, 2048, cfg, gen(3))
    replay = gen(3)
    mu = token_count_shift(2048)
    expected = stretch_logit_normal(torch.randn(6, generator=replay) + mu, mu)
    assert torch.equal(got, expected)


def test_shifted_logit_normal_with_full_uniform_mix_is_uniform_in_eps_to_one():
    cfg = ObjectiveConfig(uniform_prob=1.0)
    got = sample_sigmas(5, 1024, cfg, gen(4))
    replay = gen(4)
    torch.randn(5, generator=replay)
    expected = (1 - 1e-3) * torch.rand(5, generator=replay) + 1e-3
    assert torch.equal(got, expected)


def test_uniform_share_is_about_ten_percent_and_sigmas_stay_in_unit_interval():
    s = sample_sigmas(20000, 4096, ObjectiveConfig(), gen(5))
    assert s.min() >= 0 and s.max() <= 1
    # At mu = 2.05 the stretched logit-normal puts little mass below 0.2; the 10% uniform share adds ~2%.
    stretched_only = sample_sigmas(20000, 4096, ObjectiveConfig(uniform_prob=0.0), gen(5))
    assert (s < 0.2).float().mean() > (stretched_only < 0.2).float().mean()


def test_more_tokens_shift_sigmas_towards_noise():
    cfg = ObjectiveConfig(uniform_prob=0.0)
    few = sample_sigmas(4000, 1024, cfg, gen(6)).median()
    many = sample_sigmas(4000, 4096, cfg, gen(6)).median()
    assert many > few


def test_fixed_shift_is_the_sd3_time_shift_of_uniform_draws():
    assert time_shift(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert time_shift(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    got = sample_sigmas(4, 10, ObjectiveConfig(sigma_sampling="fixed_shift", fixed_shift=3.0), gen(7))
    u = torch.rand(4, generator=gen(7))
    assert torch.allclose(got, 3 * u / (1 + 2 * u))


def test_uniform_sampling_is_plain_uniform():
    got = sample_sigmas(4, 10, ObjectiveConfig(sigma_sampling="uniform"), gen(8))
    assert torch.equal(got, torch.rand(4, generator=gen(8)))


def _latents(b=2, f=2, h=2, w=3, c=4, s_a=5, c_a=3):
    torch.manual_seed(0)
    grid = dict(latent_frames=f, latent_height=h, latent_width=w)
    return torch.randn(b, f * h * w, c), torch.randn(b, s_a, c_a), grid


def test_noisy_latents_interpolate_and_target_is_velocity():
    video, audio, grid = _latents()
    cfg = ObjectiveConfig(first_frame_conditioning_p=0.0)
    x = prepare_inputs(video, audio, cfg=cfg, generator=gen(1), **grid)
    sv = x.video_sigma.view(-1, 1, 1)
    sa = x.audio_sigma.view(-1, 1, 1)
    noise_v = x.video_target + video
    noise_a = x.audio_target + audio
    assert torch.allclose(x.video_noisy, (1 - sv) * video + sv * noise_v, atol=1e-6)
    assert torch.allclose(x.audio_noisy, (1 - sa) * audio + sa * noise_a, atol=1e-6)
    # Replaying the generator in the documented order gives the same noise.
    replay = gen(1)
    sample_sigmas(2, 12, cfg, replay)
    sample_sigmas(2, 5, cfg, replay)
    torch.rand(2, generator=replay)
    assert torch.allclose(noise_v, torch.randn(video.shape, generator=replay), atol=1e-6)
    assert torch.equal(x.video_token_sigma, x.video_sigma.view(-1, 1).expand(2, 12))
    assert torch.equal(x.video_timesteps, x.video_sigma.view(-1, 1).expand(2, 12) * 1000)
    assert torch.equal(x.audio_timesteps, x.audio_sigma * 1000)
    assert x.video_loss_mask.eq(1).all() and x.audio_loss_mask.eq(1).all()
    assert not x.isolate_modalities


def test_first_frame_conditioning_gives_clean_tokens_timestep_zero_and_no_loss():
    video, audio, grid = _latents()
    x = prepare_inputs(video, audio, cfg=ObjectiveConfig(first_frame_conditioning_p=1.0), generator=gen(2), **grid)
    per_frame = grid["latent_height"] * grid["latent_width"]  # 6 tokens
    assert torch.equal(x.video_noisy[:, :per_frame], video[:, :per_frame])
    assert x.video_token_sigma[:, :per_frame].eq(0).all()
    assert x.video_timesteps[:, :per_frame].eq(0).all()
    assert torch.equal(x.video_token_sigma[:, per_frame:], x.video_sigma.view(-1, 1).expand(2, 6))
    assert x.video_loss_mask[:, :per_frame].eq(0).all() and x.video_loss_mask[:, per_frame:].eq(1).all()
    assert not torch.equal(x.video_noisy[:, per_frame:], video[:, per_frame:])


def test_first_frame_conditioning_is_drawn_per_sample_with_probability_p():
    video, audio, grid = _latents(b=400, f=2, h=1, w=1, c=1, s_a=1, c_a=1)
    x = prepare_inputs(video, audio, cfg=ObjectiveConfig(first_frame_conditioning_p=0.3), generator=gen(9), **grid)
    conditioned = x.video_loss_mask[:, 0].eq(0).float().mean().item()
    assert 0.22 < conditioned < 0.38
    replay = gen(9)
    cfg = ObjectiveConfig()
    sample_sigmas(400, 2, cfg, replay)
    sample_sigmas(400, 1, cfg, replay)
    coins = torch.rand(400, generator=replay)
    assert torch.equal(x.video_loss_mask[:, 0].eq(0), coins < 0.3)


def test_shared_audio_sigma_equals_video_sigma_and_independent_differs():
    video, audio, grid = _latents(b=8)
    shared = prepare_inputs(video, audio, cfg=ObjectiveConfig(independent_audio_sigma=False), generator=gen(3), **grid)
    assert torch.equal(shared.audio_sigma, shared.video_sigma)
    indep = prepare_inputs(video, audio, cfg=ObjectiveConfig(), generator=gen(3), **grid)
    assert not torch.equal(indep.audio_sigma, indep.video_sigma)


def test_masked_mse_hand_computed():
    pred = torch.zeros(1, 2, 1)
    target = torch.tensor([[[1.0], [3.0]]])
    assert masked_mse(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(9.0)
    assert masked_mse(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(5.0)
    # 2 channels: err² = [[1, 4], [9, 16]]; mask on the second token -> (9 + 16) / 2
    target2 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert masked_mse(torch.zeros(1, 2, 2), target2, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(12.5)


def test_all_masked_loss_is_zero_with_finite_zero_grad():
    pred = torch.ones(1, 3, 2, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(1, 3, 2), torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_audio_loss_weight_scales_the_audio_term():
    video, audio, grid = _latents(b=1, f=1, h=1, w=2, c=1, s_a=2, c_a=1)
    cfg = ObjectiveConfig(first_frame_conditioning_p=0.0, audio_loss_weight=0.5)
    x = prepare_inputs(video, audio, cfg=cfg, generator=gen(0), **grid)
    v_pred = x.video_target + 3.0  # err 3 everywhere -> video loss 9
    a_pred = x.audio_target - 2.0  # err 2 everywhere -> audio loss 4
    parts = flow_loss(v_pred, a_pred, x, cfg)
    assert parts.video.item() == pytest.approx(9.0)
    assert parts.audio.item() == pytest.approx(4.0)
    assert parts.total.item() == pytest.approx(9.0 + 0.5 * 4.0)


def test_clips_without_audio_get_their_audio_loss_masked():
    video, audio, grid = _latents(b=2)
    x = prepare_inputs(
        video, audio, cfg=ObjectiveConfig(), generator=gen(0), audio_present=torch.tensor([True, False]), **grid
    )
    assert x.audio_loss_mask[0].eq(1).all() and x.audio_loss_mask[1].eq(0).all()


def test_video_mode_uses_a_clean_one_token_audio_dummy_and_isolates():
    video, _, grid = _latents()
    x = prepare_inputs(video, None, cfg=ObjectiveConfig(mode="video"), generator=gen(0), audio_channels=3, **grid)
    assert x.audio_noisy.shape == (2, 1, 3) and x.audio_noisy.eq(0).all()
    assert x.audio_sigma.eq(0).all() and x.audio_loss_mask.eq(0).all()
    assert x.isolate_modalities and x.train_video and not x.train_audio
    parts = flow_loss(x.video_target, torch.full((2, 1, 3), 7.0), x, ObjectiveConfig(mode="video"))
    assert parts.total.item() == 0.0  # perfect video prediction; whatever the dummy predicts does not count


def test_audio_mode_zeroes_video_and_masks_its_loss():
    video, audio, grid = _latents()
    cfg = ObjectiveConfig(mode="audio")
    x = prepare_inputs(video, audio, cfg=cfg, generator=gen(0), **grid)
    assert x.video_noisy.shape == (2, 1, 4) and x.video_noisy.eq(0).all()
    assert (x.latent_frames, x.latent_height, x.latent_width) == (1, 1, 1)
    assert x.video_sigma.eq(0).all() and x.video_loss_mask.eq(0).all()
    assert x.isolate_modalities and x.train_audio and not x.train_video
    parts = flow_loss(torch.full((2, 1, 4), 5.0), x.audio_target + 1.0, x, cfg)
    assert parts.video.item() == 0.0 and parts.total.item() == pytest.approx(1.0)


def test_same_generator_seed_gives_identical_inputs():
    video, audio, grid = _latents()
    a = prepare_inputs(video, audio, cfg=ObjectiveConfig(), generator=gen(11), **grid)
    b = prepare_inputs(video, audio, cfg=ObjectiveConfig(), generator=gen(11), **grid)
    assert torch.equal(a.video_noisy, b.video_noisy) and torch.equal(a.audio_noisy, b.audio_noisy)
