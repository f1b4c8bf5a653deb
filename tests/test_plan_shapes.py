"""The plan is made for the run that will happen: the data pipeline's largest bucket (every dataset, every bucket),
the real model unless a config names the tiny one, and the same plan from `plan --config` and `train --dry-run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowvram.config import load_config
from lowvram.plan import plan_run
from lowvram.profiles import load_profile


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")


def backend(tmp_path: Path, *datasets: dict) -> Path:
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([*datasets, {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/t"}]))
    return path


def video(id_: str, resolution, frames: int, folder: str = "clips", **video) -> dict:
    return {"id": id_, "type": "local", "dataset_type": "video", "instance_data_dir": folder,
            "resolution": resolution, "video": {"num_frames": frames, **video}}  # fmt: skip


# Memory settings stated, so each plan measures one setup (the shapes are the subject here, not the choice).
FIXED = {"gradient_checkpointing": True, "musubi_blocks_to_swap": 0, "ramtorch": False, "enable_group_offload": False}
DATASETS = (video("square", "640x640", 33), video("wide", "832x480", 49), video("short", "1024x576", 17))
MEMORY = {"gradient_checkpointing": True, "blocks_to_swap": 0, "ramtorch": False, "group_offload": False}


def simpletuner(tmp_path: Path, data: Path, family: str = "tiny", **keys) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": family, "data_backend_config": str(data), "resolution": 480,
                                "output_dir": str(tmp_path / "run"), **FIXED, **keys}))  # fmt: skip
    return path


def test_a_multidatabackend_num_frames_is_planned_not_the_config_frames(tmp_path, cache_dir):
    """The issue's case: SimpleTuner's dataset says 49 frames; the config's data.frames (17) is not what is cut."""
    cfg, _ = load_config(simpletuner(tmp_path, backend(tmp_path, video("clips", "832x480", 49))))
    assert cfg.data.frames == 17  # the run config's own default, which the data pipeline does not use
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert plan.settings["data.frames"] == 49 and plan.settings["data.resolution"] == "832x480"
    assert any("largest bucket" in line and "832x480@49" in line for line in plan.explanation)
    at_49, _ = load_config(None, {"model.family": "tiny", "data.resolution": "832x480", "data.frames": 49,
                                  **{f"memory.{k}": v for k, v in MEMORY.items()}})  # fmt: skip
    at_17 = at_49.model_copy(update={"data": at_49.data.model_copy(update={"frames": 17})})
    direct = plan_run(at_49, load_profile("3090"), choose=False, cache_dir=cache_dir)
    short = plan_run(at_17, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert plan.phases == direct.phases and plan.step_seconds_estimate == direct.step_seconds_estimate
    assert plan.phases["train"].vram_peak_bytes > short.phases["train"].vram_peak_bytes


def test_the_largest_bucket_of_every_dataset_sets_the_peak(tmp_path, cache_dir):
    # video tokens: 640x640@33 is 20 x 20 x 5 = 2000; 832x480@49 is 26 x 15 x 7 = 2730; 1024x576@17 is 32 x 18 x 3 =
    # 1728. Neither the first dataset nor the largest frame nor the largest picture: the most tokens set the peak.
    data = backend(tmp_path, *DATASETS)
    cfg, _ = load_config(simpletuner(tmp_path, data))
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert (plan.settings["data.resolution"], plan.settings["data.frames"]) == ("832x480", 49)
    line = next(line for line in plan.explanation if "largest bucket" in line)
    assert "832x480@49" in line and "'wide'" in line and "also 1024x576@17, 640x640@33" in line


def test_area_resolution_buckets_come_from_the_clips_as_caching_cuts_them(tmp_path, cache_dir):
    from lowvram.data.dataset import data_config_from_run, discover
    from lowvram.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "clips", n_clips=2, width=128, height=64, frames=33, audio=False)
    data = backend(tmp_path, video("clips", 64, 33, folder=str(tmp_path / "clips")))
    cfg, _ = load_config(simpletuner(tmp_path, data))
    items, skipped = discover(data_config_from_run(cfg))
    assert not skipped and {it.bucket.key for it in items} == {"96x32@33"}  # 2:1 clips at about 64x64 pixels
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert (plan.settings["data.resolution"], plan.settings["data.frames"]) == ("96x32", 33)
    assert not any("no readable clips" in a for a in plan.assumptions)


def test_a_dataset_whose_clips_cannot_be_read_is_planned_as_a_square_of_its_area_and_says_so(tmp_path, cache_dir):
    data = backend(tmp_path, video("elsewhere", 480, 49, folder=str(tmp_path / "not-here")))
    cfg, _ = load_config(simpletuner(tmp_path, data))
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert (plan.settings["data.resolution"], plan.settings["data.frames"]) == ("480x480", 49)
    assert any("'elsewhere': no readable clips" in a and "480x480@49" in a for a in plan.assumptions)


def test_a_missing_multidatabackend_is_said_in_the_plan(tmp_path, cache_dir):
    cfg, _ = load_config(simpletuner(tmp_path, tmp_path / "nope.json"))
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert any(f"{tmp_path / 'nope.json'} is not there" in a for a in plan.assumptions)


def capture_plans(monkeypatch) -> list:
    import lowvram.plan

    plans = []
    real = lowvram.plan.plan_run

    def recording(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(lowvram.plan, "plan_run", recording)
    return plans


def test_train_dry_run_and_plan_config_give_the_same_plan_for_the_same_file(tmp_path, monkeypatch, cache_dir):
    import lowvram.plan.measure
    from lowvram.cli import app

    monkeypatch.setattr(lowvram.plan.measure, "default_cache_dir", lambda: cache_dir)  # the CLI's cache folder
    data = backend(tmp_path, *DATASETS)
    path = simpletuner(tmp_path, data)
    plans = capture_plans(monkeypatch)
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--profile", "3090", "--config", str(path), "--json"])
    dry = runner.invoke(app, ["train", "--profile", "3090", "--config", str(path), "--dry-run"])
    assert planned.exit_code == dry.exit_code == 0, (planned.output, dry.output)
    assert len(plans) == 2
    a, b = (p.to_json() for p in plans)
    assert a == b and a["settings"]["data.frames"] == 49
    assert json.loads(planned.stdout)["phases"] == a["phases"]


def test_a_config_without_a_family_plans_and_trains_the_real_model(tmp_path, monkeypatch):
    from lowvram.cli import app
    from lowvram.errors import LowvramError

    path = tmp_path / "run.toml"
    path.write_text(f'[data]\nframes = 17\n[output]\noutput_dir = "{tmp_path / "run"}"\n')
    cfg, _ = load_config(path)
    assert cfg.model.family == "ltx2"
    seen = []

    def refuse_after_seeing(cfg, profile, **kwargs):
        seen.append(cfg.model.family)
        raise LowvramError("stop here")

    import lowvram.plan

    monkeypatch.setattr(lowvram.plan, "plan_run", refuse_after_seeing)
    runner = CliRunner()
    runner.invoke(app, ["plan", "--profile", "3090", "--config", str(path)])
    runner.invoke(app, ["train", "--profile", "3090", "--config", str(path), "--dry-run"])
    assert seen == ["ltx2", "ltx2"]


def test_the_demo_without_a_config_still_runs_the_tiny_model(tmp_path):
    from lowvram.cli import app

    result = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path / "demo"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "tiny model on CPU without --profile" in result.output
