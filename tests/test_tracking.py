"""Experiment tracking mirrors the run folder: TensorBoard read back with tensorboard's own EventAccumulator, wandb
in offline mode writing its run folder, trackio into a local TRACKIO_DIR. metrics.jsonl stays the record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowvram import tracking
from lowvram.config import apply_overrides, load_config
from lowvram.demo import default_demo_config

GIB = 2**30


def write_clip(path: Path, frames: int = 9, size: int = 64) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def step_record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "loss_video": 0.5 / step, "loss_audio": 0.25 / step, "lr": 1e-4 * step,
            "grad_norm": 0.1 * step, "s_per_step": 0.5, "epoch": 0, "peak_vram_bytes": None,
            "rss_bytes": step * GIB}  # fmt: skip


def phase(name: str, start: float, end: float | None, **extra) -> dict:
    return {"type": "phase", "name": name, "start_s": start, "end_s": end, "rss_baseline_bytes": GIB,
            "rss_peak_bytes": 3 * GIB, **extra}  # fmt: skip


@pytest.fixture
def live_run(tmp_path):
    """A run folder mid-way: two steps and a half-written third line; the caching phase finished."""
    run = tmp_path / "run"
    run.mkdir()
    lines = "".join(json.dumps(step_record(s)) + "\n" for s in (1, 2))
    (run / "metrics.jsonl").write_text(lines + json.dumps(step_record(3))[:20])
    (run / "memory.jsonl").write_text(json.dumps(phase("latent_cache", 0.0, 2.0, predicted_ram_bytes=4 * GIB)) + "\n")
    return run


def finish_run(run: Path) -> None:
    text = (run / "metrics.jsonl").read_text()
    complete = text[: text.rfind("\n") + 1]
    (run / "metrics.jsonl").write_text(complete + "".join(json.dumps(step_record(s)) + "\n" for s in (3, 4)))
    with open(run / "memory.jsonl", "a") as f:
        f.write(json.dumps(phase("train", 2.0, 9.0)) + "\n")
    write_clip(run / "validation" / "step-00000004.mp4")


def test_tensorboard_events_read_back_with_tensorboards_reader(live_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tracking.TensorBoardTracker(live_run, "proj", "run")
    mirror = tracking.RunMirror(live_run, [tb])
    mirror.start({"lora.rank": 16, "model.precision": "bf16"}, {"plan/train/vram_gib": 7.5}, "fits '3090'")
    mirror.sync()
    assert mirror.last_step == 2  # the half-written third line waits for its newline
    finish_run(live_run)
    mirror.sync()
    mirror.close()

    events = EventAccumulator(str(live_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [e.value for e in events.Scalars("memory/rss_gib")] == pytest.approx([1, 2, 3, 4])
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert events.Scalars("phase/train/seconds")[0].value == pytest.approx(7.0)
    assert events.Scalars("phase/latent_cache/predicted_ram_gib")[0].value == pytest.approx(4.0)
    assert events.Tensors("plan/text_summary")  # the plan as text
    strip = events.Images("validation")
    assert len(strip) == 1 and strip[0].step == 4 and (strip[0].width, strip[0].height) == (8 * 64, 64)  # 8 frames
    hp = EventAccumulator(str(live_run / "tensorboard" / "hparams"))  # add_hparams' own sub-run
    hp.Reload()
    assert hp.Scalars("plan/train/vram_gib")[0].value == pytest.approx(7.5)


def test_wandb_offline_writes_its_run_folder(live_run, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mirror = tracking.RunMirror(live_run, [tracking.WandbTracker(live_run, "lowvram-test", "run-a")])
    mirror.start({"lora.rank": 16}, {"plan/train/vram_gib": 7.5}, "fits")
    finish_run(live_run)
    mirror.close()
    runs = list((live_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's record, uploadable later with `wandb sync`
    # wandb >= 0.30 reads its records in wandb-core (Go) only; the record's protobuf strings name what was logged.
    # wandb-core (a separate process) may still be flushing the file when finish() returns on a loaded machine.
    path = next(runs[0].glob("run-*.wandb"))
    for _ in range(300):
        if b"plan/train/vram_gib" in path.read_bytes() and b"phase/train/seconds" in path.read_bytes():
            break
        time.sleep(0.1)
    record = path.read_bytes()
    for key in (b"train/loss", b"memory/rss_gib", b"phase/train/seconds", b"lora.rank", b"plan/train/vram_gib"):
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "videos").glob("validation_4_*.mp4"))  # the clip, at step 4


def test_trackio_logs_locally(live_run, monkeypatch, tmp_path):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import sys

    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before TRACKIO_DIR could be set")
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    mirror = tracking.RunMirror(live_run, [tracking.TrackioTracker(live_run, "lowvram-test", "run-t")])
    mirror.start({"lora.rank": 16}, {}, "fits")
    mirror.sync()
    mirror.close()
    logs = SQLiteStorage.get_logs("lowvram-test", "run-t")
    assert [row["step"] for row in logs if "train/loss" in row] == [1, 2]


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(live_run, capsys):
    class Broken:
        def start(self, *a):
            pass

        def log(self, metrics, step):
            raise RuntimeError("disk quota exceeded")

        def close(self):
            pass

    mirror = tracking.RunMirror(live_run, [Broken()])
    mirror.sync()
    assert mirror.trackers == []
    assert "Broken stopped (disk quota exceeded); metrics.jsonl is complete" in capsys.readouterr().err
    mirror.close()


def test_a_rewritten_metrics_file_is_reread_without_repeating_steps(live_run):
    sent = []

    class Recorder:
        def log(self, metrics, step):
            sent.append(step)

        def summary(self, metrics, step):
            pass

        def close(self):
            pass

    mirror = tracking.RunMirror(live_run, [Recorder()])
    mirror.sync()
    # A resume from step 1 rewrites the file (atomic replace: a new inode) and continues from there.
    tmp = live_run / "metrics.new"
    tmp.write_text("".join(json.dumps(step_record(s)) + "\n" for s in (1, 2, 3)))
    tmp.replace(live_run / "metrics.jsonl")
    mirror.sync()
    assert sent == [1, 2, 3]


def test_simpletuner_tracker_keys_are_mapped():
    from lowvram.config import from_simpletuner

    nested, notes = from_simpletuner({"report_to": "tensorboard,wandb", "tracker_project_name": "p",
                                      "tracker_run_name": "r"})  # fmt: skip
    cfg, _ = load_config(None, {f"output.{k}": v for k, v in nested["output"].items()})
    assert cfg.output.report_to == ["tensorboard", "wandb"] and not notes
    assert (cfg.output.tracker_project_name, cfg.output.tracker_run_name) == ("p", "r")


@pytest.mark.slow
def test_a_training_run_mirrors_metrics_jsonl_into_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowvram.train.loop import read_metrics
    from lowvram.train.run import run_train

    out = tmp_path / "out"
    cfg = apply_overrides(default_demo_config(out), {"train.max_train_steps": 3, "output.report_to": ["tensorboard"]})
    threads = torch.get_num_threads()
    try:
        assert run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    recorded = read_metrics(out)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in recorded
    ]
    assert {"phase/text_cache/seconds", "phase/train/rss_peak_gib"} <= set(events.Tags()["scalars"])
    info = json.loads((out / "run.json").read_text())
    assert info["total_steps"] == 3 and info["config"]["output"]["report_to"] == ["tensorboard"]
