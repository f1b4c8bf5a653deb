"""VAE memory options: patch conv and temporal roll are exact; tiling/slicing/batching run; peaks are measured."""

from __future__ import annotations

import pytest
import torch

from lowvram.errors import UsageError
from lowvram.fakemem import LiveBytes
from lowvram.models.ltx2 import build_tiny_components, tiny_configs
from lowvram.vae import (
    VaeOptions,
    encode_video,
    measure_vae_encode_peak_bytes,
    patch_conv,
    rolling_encode,
)


@pytest.fixture(scope="module")
def vae():
    return build_tiny_components(seed=0).video_vae


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(0)
    return torch.rand((2, 3, 33, 32, 64), generator=g) * 2 - 1


@pytest.fixture(scope="module")
def reference(vae, clip):
    return encode_video(vae, clip)


@pytest.mark.parametrize("chunk", [3, 8])
def test_patch_conv_encode_equals_unchunked(vae, clip, reference, chunk):
    got = encode_video(vae, clip, VaeOptions(patch_conv=True, patch_conv_frames=chunk))
    assert (got - reference).abs().max() <= 1e-5


def test_patch_conv_is_exact_for_non_causal_convs_too():
    from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoCausalConv3d

    conv = LTX2VideoCausalConv3d(4, 6, kernel_size=3)
    x = torch.randn(1, 4, 11, 8, 8)
    for causal in (True, False):
        expected = conv(x, causal=causal)
        with patch_conv(conv, chunk_frames=4):
            got = conv(x, causal=causal)
        assert (got - expected).abs().max() <= 1e-5
    assert "forward" not in conv.__dict__  # restored


@pytest.mark.parametrize("group", [8, 16])
def test_temporal_roll_encode_equals_whole_clip(vae, clip, reference, group):
    got = encode_video(vae, clip, VaeOptions(temporal_roll=True, roll_frames=group))
    assert (got - reference).abs().max() <= 1e-5


def test_temporal_roll_matches_the_encoder_moments_not_only_the_mean(vae, clip):
    whole = vae.encoder(clip[:1])
    rolled = rolling_encode(vae, clip[:1], 8)
    assert rolled.shape == whole.shape and (rolled - whole).abs().max() <= 1e-5


def test_slicing_and_vae_batch_size_do_not_change_latents(vae, clip, reference):
    for options in (VaeOptions(slicing=True, batch_size=2), VaeOptions(batch_size=1), VaeOptions(batch_size=2)):
        assert (encode_video(vae, clip, options) - reference).abs().max() <= 1e-5


def test_tiling_runs_spatial_and_temporal_tiles_and_restores_the_vae(vae, clip):
    options = VaeOptions(
        tiling=True, tile_sample_min_width=64, tile_sample_min_height=64, tile_sample_stride_width=32,
        tile_sample_stride_height=32, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=8,
    )  # fmt: skip
    short = clip[:1, :, :17]
    got = encode_video(vae, short, options)
    assert got.shape == encode_video(vae, short).shape and torch.isfinite(got).all()
    assert not vae.use_tiling and not vae.use_framewise_decoding


def test_roll_with_tiling_and_bad_frame_counts_are_refused(vae):
    with pytest.raises(UsageError, match="cannot be combined"):
        VaeOptions(temporal_roll=True, tiling=True)
    with pytest.raises(UsageError, match="8k\\+1 frames"):
        rolling_encode(vae, torch.zeros(1, 3, 12, 32, 32), 8)
    with pytest.raises(UsageError, match="multiple of 8"):
        rolling_encode(vae, torch.zeros(1, 3, 17, 32, 32), 12)


def test_fake_measurement_equals_a_real_run_on_the_tiny_vae(vae):
    config = tiny_configs()["video_vae"]
    for options in (VaeOptions(), VaeOptions(patch_conv=True), VaeOptions(temporal_roll=True)):
        video = torch.zeros(1, 3, 17, 64, 64)
        tracker = LiveBytes()
        tracker.ignore(*vae.parameters(), *vae.buffers(), video)
        with tracker:
            encode_video(vae, video, options)
        fake = measure_vae_encode_peak_bytes(config, 64, 64, 17, options, dtype=torch.float32)
        assert fake.activation_peak_bytes == tracker.peak_bytes, options.name


def test_roll_peak_does_not_grow_with_clip_length_while_plain_encode_does():
    config = tiny_configs()["video_vae"]

    def peak(frames, **kw):
        return measure_vae_encode_peak_bytes(config, 64, 64, frames, VaeOptions(**kw), dtype=torch.float32)

    plain_short, plain_long = peak(17).activation_peak_bytes, peak(65).activation_peak_bytes
    roll_short, roll_long = peak(17, temporal_roll=True), peak(65, temporal_roll=True)
    assert plain_long > 3 * plain_short
    latent_growth = 2 * (roll_long.latent_shape[2] - roll_short.latent_shape[2]) * 8 * 2 * 2 * 4  # moments + mean
    assert roll_long.activation_peak_bytes - roll_short.activation_peak_bytes <= latent_growth
    assert peak(65, patch_conv=True).activation_peak_bytes < plain_long
