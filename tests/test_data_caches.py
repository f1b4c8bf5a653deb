"""Text and latent caches on the tiny LTX-2: exact contents, reuse, stale/corrupt rebuild, audio masking, audio-only."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowvram.data import media
from lowvram.data.build import build_caches, read_index
from lowvram.data.latent_cache import latent_cache_disk_bytes_per_item
from lowvram.data.spec import AudioOptions, DataConfig, DatasetSpec, folder_dataset
from lowvram.data.synthetic import make_synthetic_dataset
from lowvram.data.text_cache import build_text_cache, text_cache_disk_bytes_per_item
from lowvram.models.ltx2 import (
    TINY_MAX_TEXT_TOKENS,
    build_tiny_components,
    encode_text,
    normalize_audio_latents,
    normalize_video_latents,
    pack_audio_latents,
    unpack_audio_latents,
)

L = TINY_MAX_TEXT_TOKENS


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


@pytest.fixture()
def clips(tmp_path):
    folder = tmp_path / "clips"
    make_synthetic_dataset(folder, n_clips=3, width=64, height=64, frames=17)
    return folder


def data_for(folder: Path, **kw) -> DataConfig:
    return DataConfig((folder_dataset(folder, resolution=(64, 64), frames=17, **kw),))


def test_text_cache_files_hold_exactly_the_connector_outputs(tiny, tmp_path):
    captions = ["a red circle moving left to right", "a blue square moving up", "a red circle moving left to right"]
    result = build_text_cache(captions, tiny, tmp_path, max_length=L)
    assert result.written == 2 and len(list((tmp_path / "text").iterdir())) == 2
    expected = encode_text(tiny, captions[:2], L)
    for i, caption in enumerate(captions[:2]):
        with safe_open(str(result.paths[caption]), framework="pt") as f:
            assert set(f.keys()) == {"video", "audio", "mask"}
            assert f.metadata()["caption"] == caption
        stored = load_file(str(result.paths[caption]))
        assert stored["video"].shape == (L, 16) and stored["audio"].shape == (L, 16) and stored["mask"].shape == (L,)
        assert torch.equal(stored["video"], expected.video[i]) and torch.equal(stored["audio"], expected.audio[i])
        assert torch.equal(stored["mask"].long(), expected.mask[i].long())
    again = build_text_cache(captions, tiny, tmp_path, max_length=L)
    assert (again.written, again.reused) == (0, 2)


def test_text_cache_is_keyed_by_the_encoder_fingerprint(tiny, tmp_path):
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        next(other.connectors.parameters()).add_(0.01)
    a = build_text_cache(["a red circle"], tiny, tmp_path, max_length=L)
    b = build_text_cache(["a red circle"], other, tmp_path, max_length=L)
    assert b.written == 1 and a.paths["a red circle"] != b.paths["a red circle"]


def test_real_text_cache_is_under_16_mb_per_caption():
    per_item = text_cache_disk_bytes_per_item()
    assert 2 * 1024 * 3840 * 2 < per_item < 16_000_000


def test_text_cache_size_formula_matches_a_written_file(tiny, tmp_path):
    result = build_text_cache(["a green ring"], tiny, tmp_path, max_length=L)
    size = result.paths["a green ring"].stat().st_size
    predicted = text_cache_disk_bytes_per_item(tokens=L, channels=16, dtype_bytes=4)
    assert abs(size - predicted) <= 512


def test_latent_entries_hold_normalized_posterior_means(tiny, clips, tmp_path):
    summary = build_caches(data_for(clips), tiny, tmp_path / "cache", max_text_tokens=L)
    assert summary.latents_written == 3 and not summary.skipped
    item = summary.items[0]
    stored = load_file(str(item.latent_path))
    video = media.decode_video(Path(load_meta(item.latent_path)["source"]), fps=25, frames=17, width=64, height=64)
    raw = tiny.video_vae.encode(video[None]).latent_dist.mode()
    assert torch.allclose(stored["video_latents"], normalize_video_latents(raw, tiny.video_vae)[0], atol=1e-6)
    assert stored["video_latents"].shape == (8, 3, 2, 2)
    wave, _ = media.decode_audio(Path(load_meta(item.latent_path)["source"]), duration_s=17 / 25)
    mel = media.mel_spectrogram(wave, tiny.audio_vae.config.mel_bins)[:, :68]
    audio = tiny.audio_vae.encode(mel[None]).latent_dist.mode()
    expected = unpack_audio_latents(normalize_audio_latents(pack_audio_latents(audio), tiny.audio_vae), 2)[0]
    assert torch.allclose(stored["audio_latents"], expected, atol=1e-6)
    assert stored["audio_latents"].shape == (2, 17, 2)  # 17 frames at 25 fps = 0.68 s = 17 audio latent frames
    assert stored["audio_mask"].tolist() == [1]
    assert read_index(tmp_path / "cache") == summary.items
    predicted = latent_cache_disk_bytes_per_item(
        64, 64, 17, latent_channels=8, audio_channels=2, audio_mel_latent_bins=2, dtype_bytes=4
    )
    assert abs(item.latent_path.stat().st_size - predicted) <= 1024  # the planner's per-item disk figure


def load_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_rerun_reuses_and_changed_sources_or_corrupt_entries_are_rebuilt(tiny, clips, tmp_path):
    cache = tmp_path / "cache"
    first = build_caches(data_for(clips), tiny, cache, max_text_tokens=L)
    assert build_caches(data_for(clips), tiny, cache, max_text_tokens=L).latents_reused == 3
    by_source = {load_meta(i.latent_path)["source"]: i.latent_path for i in first.items}
    changed = clips / "clip_000.mp4"
    shutil.copy(clips / "clip_001.mp4", changed)  # new content (and mtime): the entry is stale
    os.utime(changed, ns=(1, 1))
    corrupt = by_source[str(clips / "clip_002.mp4")]
    corrupt.write_bytes(corrupt.read_bytes()[:-7])  # truncated
    again = build_caches(data_for(clips), tiny, cache, max_text_tokens=L)
    assert again.latents_rebuilt == {"stale": 1, "corrupt": 1}
    assert (again.latents_written, again.latents_reused) == (2, 1)
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 3
    for entry in again.items:
        load_file(str(entry.latent_path))  # all complete again


def test_changed_vae_weights_make_entries_stale(tiny, clips, tmp_path):
    build_caches(data_for(clips), tiny, tmp_path, max_text_tokens=L)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.video_vae.encoder.conv_in.conv.weight.add_(0.01)
    again = build_caches(data_for(clips), other, tmp_path, max_text_tokens=L)
    assert again.latents_rebuilt == {"stale": 3}


def test_clips_without_audio_are_cached_with_the_audio_loss_masked(tiny, tmp_path):
    make_synthetic_dataset(tmp_path / "mute", n_clips=2, audio=False)
    summary = build_caches(data_for(tmp_path / "mute"), tiny, tmp_path / "c", max_text_tokens=L)
    for entry in summary.items:
        stored = load_file(str(entry.latent_path))
        assert stored["audio_mask"].tolist() == [0] and stored["audio_latents"].shape == (2, 17, 2)


def test_audio_only_dataset_caches_audio_latents_only(tiny, tmp_path):
    import av
    import numpy as np

    folder = tmp_path / "sounds"
    folder.mkdir()
    for name, seconds in (("tone_a", 1.0), ("tone_b", 0.5)):
        with av.open(str(folder / f"{name}.wav"), "w") as f:
            s = f.add_stream("pcm_s16le", rate=16000, layout="mono")
            t = np.arange(int(16000 * seconds)) / 16000
            data = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
            frame.sample_rate = 16000
            for p in s.encode(frame):
                f.mux(p)
            for p in s.encode():
                f.mux(p)
        (folder / f"{name}.txt").write_text("a sine tone")
    spec = DatasetSpec(id="sounds", instance_data_dir=folder, dataset_type="audio", audio=AudioOptions(audio_only=True))
    summary = build_caches(DataConfig((spec,)), tiny, tmp_path / "c", max_text_tokens=L)
    assert sorted(summary.buckets()) == ["audio@12", "audio@25"]
    for entry in summary.items:
        stored = load_file(str(entry.latent_path))
        assert "video_latents" not in stored and stored["audio_mask"].tolist() == [1]
        assert stored["audio_latents"].shape[1] == int(entry.bucket.split("@")[1])


def test_video_only_runs_store_masked_zero_audio_of_the_same_layout(tiny, clips, tmp_path):
    summary = build_caches(data_for(clips), tiny, tmp_path, max_text_tokens=L, audio=False)
    stored = load_file(str(summary.items[0].latent_path))
    assert stored["audio_mask"].tolist() == [0]
    assert stored["audio_latents"].shape == (2, 17, 2) and not stored["audio_latents"].any()


def test_text_and_latent_steps_run_with_only_their_own_models_loaded(tiny, clips, tmp_path):
    from types import SimpleNamespace

    from lowvram.data.build import cache_latents, cache_text, start_caching

    job = start_caching(data_for(clips))
    text_only = SimpleNamespace(text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, connectors=tiny.connectors)
    cache_text(job, text_only, tmp_path, max_text_tokens=L)
    summary = cache_latents(job, SimpleNamespace(video_vae=tiny.video_vae, audio_vae=tiny.audio_vae), tmp_path)
    assert summary.latents_written == 3 and summary.texts_written == 3
    assert build_caches(data_for(clips), tiny, tmp_path, max_text_tokens=L).items == summary.items
