"""Experiment tracking: mirrors what a run writes to its folder (metrics.jsonl, memory.jsonl, validation clips) into
TensorBoard, Weights & Biases or Trackio, through their own libraries.

The run folder stays the source of truth: trackers read from it, so a tracker that fails or is absent changes nothing
the run writes, and the loop only calls `sync()` after a step. It writes no event files or HTTP itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from lowvram.errors import UsageError
from lowvram.fsutil import atomic_write_json

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
MEMORY_FILE = "memory.jsonl"
# tracker name -> (module that must import, pip extra that installs it)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "trackio": ("trackio", "trackio")}  # fmt: skip
GIB = 2**30


def check_installed(cfg) -> None:
    """Refuse, before any work, a tracker in `output.report_to` whose library is not installed (names the extra)."""
    for name in cfg.output.report_to:
        module, extra = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"output.report_to names '{name}', which is not installed: pip install 'lowvram[{extra}]' "
                "(or remove it from output.report_to)"
            )


# --------------------------------------------------------------------------------------------------------------------
# What is logged: names shared by every tracker


def step_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record as tracker scalars (bytes become GiB)."""
    names = {"loss": "train/loss", "loss_video": "train/loss_video", "loss_audio": "train/loss_audio",
             "lr": "train/lr", "grad_norm": "train/grad_norm", "s_per_step": "perf/s_per_step",
             "epoch": "train/epoch"}  # fmt: skip
    out = {tag: float(record[key]) for key, tag in names.items() if isinstance(record.get(key), (int, float))}
    for key, tag in (("peak_vram_bytes", "memory/peak_vram_gib"), ("rss_bytes", "memory/rss_gib")):
        if isinstance(record.get(key), (int, float)):
            out[tag] = record[key] / GIB
    return out


def phase_metrics(phase: dict[str, Any]) -> dict[str, float]:
    """A finished phase of memory.jsonl: its peaks beside the plan's predictions (GiB) and its duration."""
    name = phase["name"]
    out = {f"phase/{name}/seconds": float(phase["end_s"] - phase["start_s"])}
    fields = {"rss_peak_bytes": "rss_peak_gib", "device_max_allocated_bytes": "vram_max_allocated_gib",
              "device_max_reserved_bytes": "vram_max_reserved_gib", "nvml_peak_bytes": "vram_driver_gib",
              "predicted_vram_bytes": "predicted_vram_gib", "predicted_ram_bytes": "predicted_ram_gib"}  # fmt: skip
    for key, tag in fields.items():
        if isinstance(phase.get(key), (int, float)):
            out[f"phase/{name}/{tag}"] = phase[key] / GIB
    return out


def hparams(cfg, plan=None) -> dict[str, Any]:
    """The run's settings (every config key, after the planner chose) as flat scalars trackers accept."""
    out: dict[str, Any] = {}
    for key, value in cfg.dotted().items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    if plan is not None:
        out["plan.profile"] = plan.profile
        out["plan.fits"] = bool(plan.fits)
    return out


def predictions(plan) -> dict[str, float]:
    """The plan's predictions: per phase VRAM and RAM peaks (GiB) and seconds per step."""
    if plan is None:
        return {}
    out = {"plan/s_per_step": float(plan.step_seconds_estimate or 0.0)}
    for name, phase in plan.phases.items():
        out[f"plan/{name}/vram_gib"] = phase.vram_peak_bytes / GIB
        out[f"plan/{name}/ram_gib"] = phase.ram_peak_bytes / GIB
    return out


# --------------------------------------------------------------------------------------------------------------------
# The trackers: each a thin adapter over its library


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter into RUN/tensorboard (hparams via its own add_hparams)."""

    def __init__(self, run_dir: Path, project: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def start(self, config: dict[str, Any], predicted: dict[str, float], plan_text: str) -> None:
        self.writer.add_text("plan", plan_text, 0)
        if predicted:
            self.writer.add_hparams(config, predicted, run_name="hparams")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.log(metrics, step)

    def video(self, path: Path, step: int, tag: str) -> None:
        # add_video needs moviepy; a strip of frames decoded with PyAV (already a dependency) shows the clip.
        frames = _video_frames(path)
        if frames is not None:
            self.writer.add_images(tag, frames, step, dataformats="NHWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in RUN/wandb (WANDB_MODE=offline keeps it local; `wandb sync` uploads it later)."""

    def __init__(self, run_dir: Path, project: str, run_name: str):
        import wandb

        self._wandb = wandb
        self._args = {"project": project, "name": run_name, "dir": str(run_dir)}
        self.run = None

    def start(self, config: dict[str, Any], predicted: dict[str, float], plan_text: str) -> None:
        self.run = self._wandb.init(**self._args, config={**config, **predicted})
        self.run.summary["plan"] = plan_text

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)

    def video(self, path: Path, step: int, tag: str) -> None:
        self.run.log({tag: self._wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class TrackioTracker:
    """A trackio run (local SQLite under TRACKIO_DIR; its dashboard: `trackio show`)."""

    def __init__(self, run_dir: Path, project: str, run_name: str):
        import trackio

        self._trackio = trackio
        self._args = {"project": project, "name": run_name}
        self.run = None

    def start(self, config: dict[str, Any], predicted: dict[str, float], plan_text: str) -> None:
        self.run = self._trackio.init(**self._args, config={**config, **predicted, "plan": plan_text})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def video(self, path: Path, step: int, tag: str) -> None:
        self.run.log({tag: self._trackio.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def _video_frames(path: Path, count: int = 8):
    import av
    import numpy as np

    with contextlib.suppress(Exception), av.open(str(path)) as clip:
        frames = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
        if frames:
            pick = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
            return np.stack([frames[i] for i in pick])
    return None


# --------------------------------------------------------------------------------------------------------------------
# The mirror: follows the run folder and forwards what is new


class RunMirror:
    """Reads what the run folder gained since the last `sync()` and hands it to every tracker.

    metrics.jsonl is followed by byte offset (only whole lines; a file rewritten by a resume is re-read and steps
    already sent are skipped, because trackers need increasing steps); memory.jsonl's finished phases and new
    validation clips are sent once each. A tracker that raises is reported once and dropped: the run goes on.
    """

    def __init__(self, run_dir: Path, trackers: list[Any], metrics_dir: Path | None = None, console=None):
        self.run_dir = Path(run_dir)
        self.metrics_path = Path(metrics_dir or run_dir) / METRICS_FILE
        self.trackers = list(trackers)
        self.console = console
        self.last_step = 0
        self._offset = 0
        self._inode = None
        self._phases_sent: set[tuple[str, float]] = set()
        self._memory_mtime = None
        self._videos_sent: set[str] = set()

    def start(self, config: dict[str, Any], predicted: dict[str, float], plan_text: str) -> None:
        self._each(lambda t: t.start(config, predicted, plan_text))

    def sync(self, step: int | None = None) -> None:
        """Forward new metrics, finished phases and validation clips (the loop calls this after each step)."""
        if not self.trackers:
            return
        for record in self._new_metrics():
            s = int(record["step"])
            if s <= self.last_step:
                continue
            self.last_step = s
            metrics = step_metrics(record)
            self._each(lambda t, m=metrics, s=s: t.log(m, s))
        self._sync_phases()
        self._sync_videos()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sync()
        self._each(lambda t: t.close())
        self.trackers = []

    def _each(self, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # a tracker's failure must not end a training run: metrics.jsonl has it all
                self.trackers.remove(tracker)
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"lowvram: warning: {type(tracker).__name__} stopped ({msg}); metrics.jsonl is complete",
                      file=sys.stderr)  # fmt: skip

    def _new_metrics(self) -> list[dict[str, Any]]:
        try:
            st = self.metrics_path.stat()
        except OSError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset = st.st_ino, 0  # replaced (a resume rewrites it): read again from the start
        with open(self.metrics_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        out = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" in rec:
                    out.append(rec)
        return out

    def _sync_phases(self) -> None:
        path = self.run_dir / MEMORY_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._memory_mtime:
            return
        self._memory_mtime = mtime
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("type") != "phase" or rec.get("end_s") is None:
                    continue
                key = (rec["name"], rec["start_s"])
                if key in self._phases_sent:
                    continue
                self._phases_sent.add(key)
                metrics = phase_metrics(rec)
                self._each(lambda t, m=metrics: t.summary(m, self.last_step))

    def _sync_videos(self) -> None:
        folder = self.run_dir / "validation"
        if not folder.is_dir():
            return
        # validation/step-N.mp4, step-N/NN.mp4 (a prompt) or step-N/<adapter set>/NN.mp4: one series per prompt/set.
        for clip in sorted(folder.rglob("*.mp4")):
            rel = clip.relative_to(folder).as_posix()
            if rel in self._videos_sent:
                continue
            self._videos_sent.add(rel)
            m = re.match(r"step-(\d+)", rel)
            step = int(m.group(1)) if m else self.last_step
            tag = "/".join(["validation", *rel.removesuffix(".mp4").split("/")[1:]])
            self._each(lambda t, c=clip, s=max(step, self.last_step), g=tag: t.video(c, s, g))


def start(cfg, run_dir: Path, *, plan=None, total_steps: int | None = None, metrics_dir: Path | None = None,
          console=None) -> RunMirror:  # fmt: skip
    """Write RUN/run.json (settings, plan, total steps: what `lowvram report` shows) and open the configured trackers.

    Returns the mirror the loop syncs after each step; with no tracker configured its `sync()` does nothing.
    """
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / RUN_FILE, {
        "started_unix": time.time(),
        "total_steps": total_steps,
        "config": cfg.model_dump(mode="json"),
        "plan": plan.to_json() if plan is not None else None,
    })  # fmt: skip
    check_installed(cfg)
    name = cfg.output.tracker_run_name or run_dir.resolve().name
    trackers = [TRACKERS[t](run_dir, cfg.output.tracker_project_name, name) for t in cfg.output.report_to]
    mirror = RunMirror(run_dir, trackers, metrics_dir=metrics_dir, console=console)
    if trackers:
        text = plan.summary_line() if plan is not None else "no memory plan (tiny model on CPU)"
        mirror.start(hparams(cfg, plan), predictions(plan), text)
        if console is not None:
            console.print(f"tracking to {', '.join(cfg.output.report_to)} (metrics.jsonl stays the record)")
    return mirror

