"""PyAV decoding: synthetic clips, frame-rate resampling, cover crop, 16 kHz audio and LTX-2's log-mel."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch

from lowvram.data import media
from lowvram.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_clips=2, width=96, height=64, frames=17)


def test_synthetic_clips_are_real_mp4_with_video_audio_and_caption(clips):
    clip = clips[0]
    with av.open(str(clip.video_path)) as f:
        assert f.streams.video[0].codec_context.name in ("h264", "mpeg4")
        assert f.streams.audio[0].codec_context.name == "aac"
        assert sum(1 for _ in f.decode(video=0)) == 17
    caption = clip.video_path.with_suffix(".txt").read_text().strip()
    assert caption == clip.caption and "moving" in caption


def test_probe_counts_frames_after_resampling(clips):
    path = clips[0].video_path
    assert media.probe(path, 25).frames == 17
    assert media.probe(path, 12.5).frames == 9  # 0.68 s at 12.5 fps
    info = media.probe(path, 25)
    assert (info.width, info.height, info.has_audio) == (96, 64, True)


def test_resampling_to_half_rate_takes_every_other_source_frame(clips):
    path = clips[0].video_path
    full = media.decode_video(path, fps=25, frames=17, width=96, height=64)
    half = media.decode_video(path, fps=12.5, frames=9, width=96, height=64)
    assert torch.equal(half, full[:, ::2])


def test_decode_resizes_and_centre_crops_to_the_bucket(clips):
    path = clips[0].video_path
    full = media.decode_video(path, fps=25, frames=1, width=96, height=64)
    crop = media.decode_video(path, fps=25, frames=1, width=64, height=64)
    assert crop.shape == (3, 1, 64, 64)
    assert crop.min() >= -1 and crop.max() <= 1
    assert torch.allclose(crop, full[:, :, :, 16:80], atol=2 / 255 * 2)  # 96x64 covers 64x64: centre 64 columns


def test_too_few_frames_is_a_bad_item(clips):
    with pytest.raises(media.BadItem, match="only 17 frames"):
        media.decode_video(clips[0].video_path, fps=25, frames=25, width=64, height=64)


def test_audio_is_resampled_to_16khz_and_padded_to_the_clip(clips):
    wave, has_audio = media.decode_audio(clips[0].video_path, duration_s=0.68, channels=2)
    assert has_audio and wave.shape == (2, 10880)
    longer, _ = media.decode_audio(clips[0].video_path, duration_s=2.0, channels=2)
    assert longer.shape == (2, 32000) and longer[:, -1000:].abs().max() == 0  # zero-padded past the track


def test_clip_without_audio_reports_no_audio(tmp_path):
    (clip,) = make_synthetic_dataset(tmp_path, n_clips=1, audio=False)
    assert not media.probe(clip.video_path, 25).has_audio
    wave, has_audio = media.decode_audio(clip.video_path, duration_s=0.5)
    assert not has_audio and wave.shape == (2, 8000) and wave.abs().max() == 0


def test_mel_matches_ltx2_recipe_shape_and_puts_a_tone_in_its_bin():
    sr, hz = media.MEL_SAMPLE_RATE, 1000.0
    t = torch.arange(sr) / sr
    wave = torch.stack([torch.sin(2 * math.pi * hz * t)] * 2)
    mel = media.mel_spectrogram(wave, mel_bins=64)
    assert mel.shape == (2, 1 + sr // media.MEL_HOP, 64)  # [C, T, mel]: what the audio VAE takes
    fb = media.slaney_mel_filterbank(media.MEL_N_FFT // 2 + 1, 64, sr)
    freqs = np.linspace(0, sr / 2, media.MEL_N_FFT // 2 + 1)
    centres = freqs[fb.argmax(0).numpy()]
    loudest = int(mel[0, 50].argmax())
    assert abs(centres[loudest] - hz) < 80
    silent = media.mel_spectrogram(torch.zeros(2, 1600), mel_bins=64)
    assert torch.allclose(silent, torch.full_like(silent, math.log(media.MEL_LOG_FLOOR)))


def test_slaney_filterbank_has_slaney_area_norm():
    fb = media.slaney_mel_filterbank(513, 64, 16000)
    assert fb.shape == (513, 64) and (fb >= 0).all()
    # librosa/torchaudio 'slaney' norm: each triangle's peak is 2 / (its bandwidth in Hz)
    f = np.linspace(0, 8000, 513)
    hz_pts = [media._mel_to_hz(m) for m in np.linspace(0, media._hz_to_mel(8000), 66)]
    width = hz_pts[12] - hz_pts[10]
    peak_expected = 2 / width * (1 - min(abs(f - hz_pts[11])) / (hz_pts[11] - hz_pts[10]))
    assert float(fb[:, 10].max()) == pytest.approx(peak_expected, rel=0.2)


def test_zero_byte_and_garbage_files_are_bad_items(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(media.BadItem, match="zero-byte"):
        media.probe(empty, 25)
    with pytest.raises(media.BadItem, match="cannot decode"):
        media.probe(garbage, 25)


def test_still_images_decode_as_one_frame_clips(tmp_path):
    from matplotlib.image import imsave

    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255  # right half white
    imsave(tmp_path / "still.png", pixels)
    assert media.probe(tmp_path / "still.png", 25).frames == 1
    clip = media.decode_image(tmp_path / "still.png", width=64, height=32)
    assert clip.shape == (3, 1, 32, 64)
    assert clip[:, 0, :, :28].max() < -0.9 and clip[:, 0, :, 36:].min() > 0.9


@pytest.mark.parametrize(("suffix", "codec"), [(".mov", "mpeg4"), (".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_other_containers_decode_through_the_same_path(tmp_path, suffix, codec):
    from lowvram.data.synthetic import _render_frames

    path = tmp_path / f"clip{suffix}"
    frames = _render_frames(64, 64, 9, (40, 200, 60), "square", "top to bottom")
    with av.open(str(path), "w") as f:
        s = f.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for frame in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                f.mux(p)
        for p in s.encode():
            f.mux(p)
    assert media.probe(path, 25).frames == 9
    clip = media.decode_video(path, fps=25, frames=9, width=64, height=64)
    assert clip.shape == (3, 9, 64, 64)
    green = clip[1, -1, 56, 32]  # the square ends at the bottom
    assert green > 0.3
