"""Dataset specs: SimpleTuner multidatabackend.json accepted into our dataclasses, bad values refused in one line."""

from __future__ import annotations

import json

import pytest

from lowvram.data.spec import VideoOptions, load_multidatabackend, parse_multidatabackend
from lowvram.errors import ConfigError

SEED_EXAMPLE = [
    {
        "id": "my-video-dataset",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": "datasets/videos",
        "caption_strategy": "textfile",
        "resolution": 512,
        "video": {"num_frames": 65, "min_frames": 65, "frame_rate": 25, "bucket_strategy": "aspect_ratio"},
        "audio": {"auto_split": True, "sample_rate": 16000, "channels": 1, "duration_interval": 3.0},
        "repeats": 10,
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/ltxvideo2",
        "disabled": False,
    },
]


def test_seed_multidatabackend_parses_into_our_dataclasses(tmp_path):
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(SEED_EXAMPLE))
    cfg = load_multidatabackend(path, base_dir=tmp_path)
    (ds,) = cfg.datasets
    assert ds.id == "my-video-dataset" and ds.instance_data_dir == tmp_path / "datasets/videos"
    assert (ds.video.num_frames, ds.video.frame_rate, ds.repeats, ds.resolution) == (65, 25, 10, 512)
    assert ds.audio.channels == 1 and ds.audio.duration_interval == 3.0
    assert cfg.text_cache_dir == tmp_path / "cache/text/ltxvideo2"


def test_61_frames_is_refused_with_57_or_65():
    bad = json.loads(json.dumps(SEED_EXAMPLE))
    bad[0]["video"]["num_frames"] = 61
    with pytest.raises(ConfigError, match="LTX-2 needs 8k\\+1 frames: use 57 or 65"):
        parse_multidatabackend(bad, base_dir=".")
    with pytest.raises(ConfigError, match="use 57 or 65"):
        VideoOptions(num_frames=61)


@pytest.mark.parametrize(
    ("where", "key", "suggestion"),
    [
        (None, "instance_dir", "instance_data_dir"),
        ("video", "num_frame", "num_frames"),
        ("audio", "sample_rte", "sample_rate"),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion(where, key, suggestion):
    bad = json.loads(json.dumps(SEED_EXAMPLE))
    (bad[0] if where is None else bad[0][where])[key] = 1
    with pytest.raises(ConfigError, match=f"unknown key '{key}': did you mean '{suggestion}'"):
        parse_multidatabackend(bad, base_dir=".")


def test_bad_values_are_refused():
    for patch, message in [
        ({"caption_strategy": "parquet"}, "caption_strategy 'parquet' is not valid"),
        ({"type": "aws"}, "type 'aws' is not supported"),
        ({"resolution": "500x480"}, "multiples of 32"),
        ({"video": {"bucket_strategy": "aspect"}}, "did you mean 'aspect_ratio'"),
        ({"s2v_datasets": ["nope"]}, "links s2v dataset 'nope'"),
    ]:
        bad = json.loads(json.dumps(SEED_EXAMPLE))
        bad[0].update(patch)
        with pytest.raises(ConfigError, match=message):
            parse_multidatabackend(bad, base_dir=".")


def test_disabled_datasets_are_ignored_and_an_empty_config_refused():
    bad = json.loads(json.dumps(SEED_EXAMPLE))
    bad[0]["disabled"] = True
    with pytest.raises(ConfigError, match="no enabled video/image/audio dataset"):
        parse_multidatabackend(bad, base_dir=".")


def test_unreadable_json_is_one_line(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_multidatabackend(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_multidatabackend(tmp_path / "missing.json")
