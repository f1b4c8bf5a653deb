"""Buckets and batches: sizes in multiples of 32, WxH@F buckets, short clips counted, one bucket per batch, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowvram.data.batches import epoch_plan, iterate_batches
from lowvram.data.buckets import bucket_for_video, floor_8k1
from lowvram.data.build import CachedItem
from lowvram.data.dataset import discover
from lowvram.data.media import BadItem, MediaInfo
from lowvram.data.spec import DataConfig, DatasetSpec, VideoOptions, folder_dataset
from lowvram.data.synthetic import make_synthetic_dataset


def spec(**video) -> DatasetSpec:
    return DatasetSpec(id="d", instance_data_dir=Path("."), resolution=256, video=VideoOptions(**video))


def info(w, h, frames) -> MediaInfo:
    return MediaInfo(w, h, frames, frames / 25, True, True)


def test_aspect_ratio_buckets_keep_aspect_at_the_area_in_multiples_of_32():
    b = bucket_for_video(spec(num_frames=17), info(1920, 1080, 100))
    assert b.width % 32 == 0 and b.height % 32 == 0
    assert abs(b.width / b.height - 16 / 9) < 0.15
    assert abs(b.width * b.height - 256 * 256) / (256 * 256) < 0.15
    assert b.frames == 17 and b.key == f"{b.width}x{b.height}@17"
    assert bucket_for_video(spec(num_frames=17), info(1080, 1920, 100)).key == f"{b.height}x{b.width}@17"


def test_resolution_frames_buckets_keep_each_clip_size_and_length():
    s = spec(num_frames=65, min_frames=9, bucket_strategy="resolution_frames")
    assert bucket_for_video(s, info(160, 96, 40)).key == "160x96@33"  # own size, 40 -> 8k+1 = 33
    assert bucket_for_video(s, info(1280, 720, 200)).key == "320x192@65"  # scaled down to fit 256^2, capped at 65
    with_interval = spec(num_frames=65, min_frames=9, bucket_strategy="resolution_frames", frame_interval=16)
    assert bucket_for_video(with_interval, info(160, 96, 40)).frames == 33


def test_short_and_long_clips_are_bad_items_and_stills_are_one_frame():
    with pytest.raises(BadItem, match="too short: 12 frames"):
        bucket_for_video(spec(num_frames=17), info(64, 64, 12))
    with pytest.raises(BadItem, match="too long"):
        bucket_for_video(spec(num_frames=17, max_frames=30), info(64, 64, 31))
    assert bucket_for_video(spec(num_frames=17), info(64, 64, 1), still=True).frames == 1
    with pytest.raises(BadItem, match="too short: 1 frames"):
        bucket_for_video(spec(num_frames=17), info(64, 64, 1))  # a one-frame video file is not a still
    assert bucket_for_video(spec(num_frames=33, min_frames=17), info(64, 64, 30)).frames == 25
    assert [floor_8k1(n) for n in (1, 8, 9, 16, 17, 64, 65)] == [1, 1, 9, 9, 17, 57, 65]


def test_discovery_buckets_real_files_and_counts_short_clips(tmp_path):
    make_synthetic_dataset(tmp_path, n_clips=2, width=96, height=64, frames=17, seed=1)
    short = make_synthetic_dataset(tmp_path / "s", n_clips=1, width=64, height=64, frames=9, seed=2)[0]
    for suffix in (".mp4", ".txt"):
        short.video_path.with_suffix(suffix).rename(tmp_path / f"short{suffix}")
    data = DataConfig((folder_dataset(tmp_path, resolution=64, frames=17),))
    items, skipped = discover(data)
    assert sorted(i.path.name for i in items) == ["clip_000.mp4", "clip_001.mp4"]
    assert {i.bucket.key for i in items} == {"64x64@17"}  # 96x64 at ~64^2 pixels rounds to 64x64
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("short.mp4", "too short: 9 frames at 25 fps, min_frames is 17")
    ]


def write_fake_cache(tmp_path: Path, buckets: dict[str, int]) -> list[CachedItem]:
    """Tiny cache files with the real layout (no model needed): one text file per caption."""
    items = []
    for bucket, n in buckets.items():
        w, rest = bucket.split("x")
        h, f = rest.split("@")
        for i in range(n):
            lat = tmp_path / f"{bucket}-{i}.safetensors"
            value = float(len(items))
            save_file(
                {
                    "video_latents": torch.full((8, (int(f) - 1) // 8 + 1, int(h) // 32, int(w) // 32), value),
                    "audio_latents": torch.full((2, 17, 2), value),
                    "audio_mask": torch.tensor([i % 2], dtype=torch.int8),
                },
                str(lat),
            )
            txt = tmp_path / f"text-{bucket}-{i}.safetensors"
            save_file(
                {
                    "video": torch.full((4, 16), value),
                    "audio": torch.zeros(4, 16),
                    "mask": torch.ones(4, dtype=torch.int8),
                },
                str(txt),
            )
            items.append(CachedItem(lat, txt, bucket, f"caption {bucket} {i}", "d"))
    return items


def test_each_batch_comes_from_one_bucket_and_epochs_cover_every_item(tmp_path):
    items = write_fake_cache(tmp_path, {"64x64@17": 5, "96x64@17": 3, "64x64@9": 2})
    seen = []
    for batch in iterate_batches(items, 2, seed=3):
        if batch.epoch > 0:
            break
        assert len({p.name.split("-")[0] for p in batch.latent_paths}) == 1
        assert batch.video_latents.shape[0] == len(batch.captions) <= 2
        assert torch.equal(batch.text_video[:, 0, 0], batch.video_latents[:, 0, 0, 0, 0])  # caption matches sample
        seen += batch.latent_paths
    assert sorted(seen) == sorted(i.latent_path for i in items)


def test_batches_are_seeded_and_resume_by_position(tmp_path):
    items = write_fake_cache(tmp_path, {"64x64@17": 4, "96x64@17": 4})
    run = iterate_batches(items, 2, seed=7)
    first = [next(run) for _ in range(10)]  # crosses an epoch boundary (4 batches per epoch)
    resumed = iterate_batches(items, 2, seed=7, start_position=6)
    for expected in first[6:]:
        got = next(resumed)
        assert got.position == expected.position and got.latent_paths == expected.latent_paths
    assert epoch_plan(items, 2, seed=7, epoch=0) != epoch_plan(items, 2, seed=8, epoch=0)
    assert epoch_plan(items, 2, seed=7, epoch=0) != epoch_plan(items, 2, seed=7, epoch=1)


def test_repeats_and_drop_last(tmp_path):
    items = write_fake_cache(tmp_path, {"64x64@17": 3})
    items = [CachedItem(i.latent_path, i.text_path, i.bucket, i.caption, i.dataset_id, repeats=2) for i in items]
    plan = epoch_plan(items, 4, seed=0, epoch=0)
    assert sorted(x for b in plan for x in b) == [0, 0, 1, 1, 2, 2]
    assert [len(b) for b in epoch_plan(items, 4, seed=0, epoch=0, drop_last=True)] == [4]


def test_filename_captions_and_s2v_linked_audio(tmp_path):
    import av
    import numpy as np

    from lowvram.data.spec import AudioOptions

    videos, sounds = tmp_path / "videos", tmp_path / "sounds"
    make_synthetic_dataset(videos, n_clips=1, audio=False)
    (videos / "clip_000.mp4").rename(videos / "a_red_circle.mp4")
    sounds.mkdir()
    with av.open(str(sounds / "a_red_circle.wav"), "w") as f:
        s = f.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in list(s.encode(frame)) + list(s.encode()):
            f.mux(p)
    video_spec = DatasetSpec(
        id="v", instance_data_dir=videos, caption_strategy="filename", resolution=64, s2v_datasets=("a",)
    )
    audio_spec = DatasetSpec(
        id="a", instance_data_dir=sounds, dataset_type="audio", caption_strategy="filename",
        audio=AudioOptions(audio_only=True),
    )  # fmt: skip
    items, skipped = discover(DataConfig((video_spec, audio_spec)))
    assert not skipped and len(items) == 1  # the linked audio dataset feeds the video one, not a dataset of its own
    assert items[0].caption == "a red circle" and items[0].audio_path == sounds / "a_red_circle.wav"
