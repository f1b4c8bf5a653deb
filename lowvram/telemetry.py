"""Memory telemetry: per-phase peaks of host RSS (with children), system RAM and device memory, proven, not guessed.

A light background thread samples while phases (`load`, `text_cache`, `latent_cache`, `train`, ...) run; peaks are
attributed to the phase they happened in and written to `memory.jsonl`. It measures; it never decides anything.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lowvram.fsutil import atomic_write_text

MEMORY_FILE = "memory.jsonl"


@dataclass
class PhaseRecord:
    name: str
    start_s: float
    end_s: float | None = None
    rss_baseline_bytes: int = 0
    rss_peak_bytes: int = 0
    ram_available_min_bytes: int | None = None
    device_max_allocated_bytes: int | None = None
    device_max_reserved_bytes: int | None = None
    nvml_peak_bytes: int | None = None
    predicted_vram_bytes: int | None = None
    predicted_ram_bytes: int | None = None

    @property
    def rss_increase_bytes(self) -> int:
        return max(0, self.rss_peak_bytes - self.rss_baseline_bytes)


@dataclass
class Sample:
    t_s: float
    phase: str | None
    rss_bytes: int
    ram_available_bytes: int
    device_allocated_bytes: int | None = None
    device_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None


def process_rss_bytes(proc: psutil.Process | None = None) -> int:
    """RSS of this process plus its children (data-loader workers, torchrun ranks)."""
    proc = proc or psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


class _Nvml:
    """Device used memory as the driver sees it: catches memory outside PyTorch's allocator (NVIDIA only)."""

    def __init__(self, index: int = 0):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def used_bytes(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def _open_nvml(backend) -> _Nvml | None:
    if backend is None or not getattr(backend, "is_accelerator", False) or getattr(backend, "is_rocm", False):
        return None
    if getattr(backend, "name", "") != "cuda":
        return None
    try:
        return _Nvml(backend.device.index or 0)
    except Exception:  # no driver library, or a GPU nvml cannot see: allocator stats remain
        return None


@dataclass
class MemoryMonitor:
    """Samples memory in a background thread; `with monitor.phase("train"): ...` attributes peaks to phases.

    `backend` is a `lowvram.device.Backend` (or None for host-only). Call `finish()` to stop and write the file.
    """

    run_dir: Path | None = None
    backend: Any = None
    interval_s: float = 0.05
    series_interval_s: float = 0.5
    phases: list[PhaseRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir) if self.run_dir is not None else None
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._current: PhaseRecord | None = None
        self._pending_predictions: dict[str, tuple[int | None, int | None]] = {}
        self._t0 = time.monotonic()
        self._last_series_t = -1e9
        self._stop = threading.Event()
        self._nvml = _open_nvml(self.backend)
        self._thread = threading.Thread(target=self._run, name="lowvram-telemetry", daemon=True)
        self._thread.start()

    # -- sampling ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> Sample:
        """Take one sample now (also called by the thread). Updates the current phase's peaks."""
        s = Sample(
            t_s=time.monotonic() - self._t0,
            phase=None,
            rss_bytes=process_rss_bytes(self._proc),
            ram_available_bytes=int(psutil.virtual_memory().available),
        )
        if self.backend is not None and getattr(self.backend, "is_accelerator", False):
            stats = self.backend.memory_stats()
            s.device_allocated_bytes = stats.allocated_bytes
            s.device_reserved_bytes = stats.reserved_bytes
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                s.nvml_used_bytes = self._nvml.used_bytes()
        with self._lock:
            phase = self._current
            s.phase = phase.name if phase else None
            if phase is not None:
                phase.rss_peak_bytes = max(phase.rss_peak_bytes, s.rss_bytes)
                phase.ram_available_min_bytes = min(
                    phase.ram_available_min_bytes or s.ram_available_bytes, s.ram_available_bytes
                )
                if s.nvml_used_bytes is not None:
                    phase.nvml_peak_bytes = max(phase.nvml_peak_bytes or 0, s.nvml_used_bytes)
            new_peak = phase is not None and s.rss_bytes == phase.rss_peak_bytes
            if new_peak or s.t_s - self._last_series_t >= self.series_interval_s:
                self.samples.append(s)
                self._last_series_t = s.t_s
        return s

    # -- phases --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        """Attribute everything sampled inside to `name`; device allocator peaks are reset at its start."""
        accelerator = self.backend is not None and getattr(self.backend, "is_accelerator", False)
        outer = self._current
        if accelerator:
            if outer is not None:  # a phase inside another (validation inside train): the outer keeps its peak so far
                so_far = self.backend.memory_stats()
                o = outer
                o.device_max_allocated_bytes = max(o.device_max_allocated_bytes or 0, so_far.max_allocated_bytes)
                o.device_max_reserved_bytes = max(o.device_max_reserved_bytes or 0, so_far.max_reserved_bytes)
            self.backend.reset_peak_memory_stats()
        baseline = process_rss_bytes(self._proc)
        record = PhaseRecord(name=name, start_s=time.monotonic() - self._t0, rss_baseline_bytes=baseline,
                             rss_peak_bytes=baseline)
        prediction = self._pending_predictions.pop(name, None)
        if prediction:
            record.predicted_vram_bytes, record.predicted_ram_bytes = prediction
        with self._lock:
            previous = self._current
            self._current = record
            self.phases.append(record)
        self.sample()
        try:
            yield record
        finally:
            self.sample()
            if accelerator:
                stats = self.backend.memory_stats()
                r = record
                r.device_max_allocated_bytes = max(r.device_max_allocated_bytes or 0, stats.max_allocated_bytes)
                r.device_max_reserved_bytes = max(r.device_max_reserved_bytes or 0, stats.max_reserved_bytes)
                if outer is not None:
                    self.backend.reset_peak_memory_stats()  # the outer phase's peak goes on from here, not from ours
            record.end_s = time.monotonic() - self._t0
            with self._lock:
                self._current = previous
            self.write()

    def set_prediction(self, phase: str, *, vram_bytes: int | None = None, ram_bytes: int | None = None) -> None:
        """Record the plan's predicted peaks for a phase (shown beside the measured ones)."""
        for record in reversed(self.phases):
            if record.name == phase:
                record.predicted_vram_bytes, record.predicted_ram_bytes = vram_bytes, ram_bytes
                return
        self._pending_predictions[phase] = (vram_bytes, ram_bytes)

    # -- output --------------------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        with self._lock:
            phases = [{"type": "phase", **asdict(p)} for p in self.phases]
            samples = [{"type": "sample", **asdict(s)} for s in self.samples]
        return phases + samples

    def write(self) -> None:
        if self.run_dir is None:
            return
        lines = "".join(json.dumps(r) + "\n" for r in self.records())
        atomic_write_text(self.run_dir / MEMORY_FILE, lines)

    def finish(self, console=None) -> list[PhaseRecord]:
        """Stop sampling, write memory.jsonl, print the summary table when a rich console is given."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.write()
        if console is not None:
            console.print(summary_table([asdict(p) for p in self.phases]))
        return self.phases


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file another process may be appending to: a partial last line is left out (it is
    still being written); a broken line before it raises ValueError naming the line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline after it yet: the writer is mid-line
                break
            raise ValueError(f"line {i} is not JSON") from None
        if not isinstance(rec, dict):
            raise ValueError(f"line {i} is not a JSON object")
        out.append(rec)
    return out


def read_memory_file(path: Path) -> tuple[list[dict], list[dict]]:
    """(phases, samples) from a run's memory.jsonl."""
    phases, samples = [], []
    for rec in read_jsonl(path):
        (phases if rec.get("type") == "phase" else samples).append(rec)
    return phases, samples


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def summary_table(phases: list[dict]):
    """A rich table: per phase, measured peaks beside the plan's predictions (GiB). Empty columns are left out."""
    from rich.table import Table

    columns = [
        ("phase", lambda p: p["name"]),
        ("seconds", lambda p: "-" if p.get("end_s") is None else f"{p['end_s'] - p['start_s']:.1f}"),
        ("RSS peak", lambda p: _gib(p["rss_peak_bytes"])),
        ("RSS +", lambda p: _gib(max(0, p["rss_peak_bytes"] - p["rss_baseline_bytes"]))),
        ("RAM avail min", lambda p: _gib(p.get("ram_available_min_bytes"))),
        ("VRAM max alloc", lambda p: _gib(p.get("device_max_allocated_bytes"))),
        ("VRAM max reserved", lambda p: _gib(p.get("device_max_reserved_bytes"))),
        ("VRAM (driver)", lambda p: _gib(p.get("nvml_peak_bytes"))),
        ("pred. VRAM", lambda p: _gib(p.get("predicted_vram_bytes"))),
        ("pred. RAM", lambda p: _gib(p.get("predicted_ram_bytes"))),
    ]
    rows = [[cell(p) for _, cell in columns] for p in phases]
    keep = [i for i, _ in enumerate(columns) if i < 4 or any(r[i] != "-" for r in rows)]
    table = Table(title="Memory per phase (GiB)")
    for i in keep:
        table.add_column(columns[i][0], justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table


# --------------------------------------------------------------------------------------------------------------------
# `lowvram report`: the run folder as a dashboard (works while the run is still writing it)

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


@dataclass
class RunView:
    """What a run folder holds right now: run.json (settings, plan, total steps), phases, samples, step metrics."""

    run_dir: Path
    info: dict
    phases: list[dict]
    samples: list[dict]
    metrics: list[dict]
    metrics_age_s: float | None = None  # seconds since metrics.jsonl last grew

    @property
    def total_steps(self) -> int | None:
        return self.info.get("total_steps")

    @property
    def last_step(self) -> int:
        return int(self.metrics[-1]["step"]) if self.metrics else 0

    @property
    def finished(self) -> bool:
        ended = any(p["name"] == "train" and p.get("end_s") is not None for p in self.phases)
        return ended or (self.total_steps is not None and self.last_step >= self.total_steps)


def load_run(run_dir: Path) -> RunView:
    """Read a run folder (UsageError when it holds no run; LowvramError when a file in it is damaged)."""
    from lowvram.errors import LowvramError, UsageError

    run_dir = Path(run_dir)
    memory, metrics, info = run_dir / MEMORY_FILE, run_dir / METRICS_FILE, run_dir / RUN_FILE
    if not memory.is_file() and not metrics.is_file():
        raise UsageError(f"{run_dir} has no {MEMORY_FILE}: pass the folder of a run (its --output-dir)")
    try:
        phases, samples = read_memory_file(memory) if memory.is_file() else ([], [])
    except (ValueError, KeyError) as e:
        raise LowvramError(f"{memory} is not a lowvram memory file: {e}") from None
    try:
        steps = [r for r in read_jsonl(metrics) if isinstance(r.get("step"), int)] if metrics.is_file() else []
    except ValueError as e:
        raise LowvramError(f"{metrics} is not a lowvram metrics file: {e}") from None
    try:
        run_info = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
    except ValueError:
        run_info = {}  # written atomically by lowvram: damaged only by hand; the report works without it
    age = time.time() - metrics.stat().st_mtime if metrics.is_file() else None
    return RunView(run_dir, run_info if isinstance(run_info, dict) else {}, phases, samples, steps, age)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def run_summary(view: RunView, recent: int = 20) -> list[str]:
    """One screen of text: progress, plan, speed (predicted vs measured), ETA while running, loss."""
    lines = []
    total, step = view.total_steps, view.last_step
    if view.finished:
        state = f"finished at step {step}" + (f"/{total}" if total else "")
    elif view.metrics:
        pct = f" ({100 * step / total:.0f}%)" if total else ""
        age = f", last step {_fmt_s(view.metrics_age_s)} ago" if view.metrics_age_s is not None else ""
        state = f"in progress (or stopped): step {step}" + (f"/{total}" if total else "") + pct + age
    else:
        state = "no training step yet" + (f" ({view.phases[-1]['name']} done)" if view.phases else "")
    lines.append(f"run {view.run_dir}: {state}")
    plan = view.info.get("plan")
    cfg = view.info.get("config") or {}
    if cfg:
        d, t, m = cfg.get("data", {}), cfg.get("train", {}), cfg.get("model", {})
        lines.append(
            f"settings: {m.get('family')} {m.get('precision')}, {d.get('resolution')} x {d.get('frames')} frames, "
            f"batch {t.get('batch_size')}, LoRA rank {cfg.get('lora', {}).get('rank')}"
        )
    predicted_sps = None
    if plan:
        verdict = "fits" if plan.get("fits") else "does NOT fit"
        chosen = {k.removeprefix("memory."): v for k, v in (plan.get("settings") or {}).items()
                  if k.startswith("memory.") and v not in (None, False, 0)}  # fmt: skip
        lines.append(f"plan: {verdict} profile '{plan.get('profile')}'; memory: "
                     + (", ".join(f"{k}={v}" for k, v in chosen.items()) or "defaults"))  # fmt: skip
        predicted_sps = plan.get("step_seconds_estimate")
    elif view.info:
        lines.append("plan: none (tiny model on CPU)")
    if view.metrics:
        tail = [r["s_per_step"] for r in view.metrics[-recent:] if isinstance(r.get("s_per_step"), (int, float))]
        if tail:
            mean = sum(tail) / len(tail)
            pred = f" (plan predicted {predicted_sps:.2f} s/step)" if predicted_sps else ""
            lines.append(f"speed: {mean:.2f} s/step = {1 / mean if mean else 0:.2f} steps/s over the last "
                         f"{len(tail)} steps{pred}")  # fmt: skip
            if total and not view.finished:
                lines.append(f"ETA: {_fmt_s(mean * max(0, total - step))} for {max(0, total - step)} steps left")
        losses = [float(r["loss"]) for r in view.metrics if isinstance(r.get("loss"), (int, float))]
        if losses:
            ema = smoothed(losses)
            lines.append(f"loss: {losses[0]:.4f} at step {view.metrics[0]['step']} -> {losses[-1]:.4f} now "
                         f"(smoothed {ema[-1]:.4f}); lr {view.metrics[-1].get('lr', 0):.3g}")  # fmt: skip
    return lines


def phases_with_live_train(view: RunView) -> list[dict]:
    """The phases of memory.jsonl, plus the running train phase from metrics.jsonl (peaks so far) while it runs."""
    phases = list(view.phases)
    if view.metrics and not any(p["name"] == "train" for p in phases):
        vram = [r["peak_vram_bytes"] for r in view.metrics if r.get("peak_vram_bytes")]
        rss = [r["rss_bytes"] for r in view.metrics if r.get("rss_bytes")]
        train = ((view.info.get("plan") or {}).get("phases") or {}).get("train") or {}
        phases.append({
            "name": "train (so far)", "start_s": 0.0, "end_s": None, "rss_baseline_bytes": min(rss, default=0),
            "rss_peak_bytes": max(rss, default=0), "device_max_allocated_bytes": max(vram) if vram else None,
            "predicted_vram_bytes": train.get("vram_peak_bytes"), "predicted_ram_bytes": train.get("ram_peak_bytes"),
        })  # fmt: skip
    return phases


def check_png_destination(png: Path) -> Path:
    """Refuse (UsageError, one line) a --png that is a folder, not a .png, or cannot be written, before any work."""
    import errno
    import os
    import tempfile

    from lowvram.errors import UsageError

    png = Path(png).expanduser()
    if png.is_dir():
        raise UsageError(f"--png {png} is a folder: give a file name such as {png}/memory.png")
    if png.suffix.lower() != ".png":
        raise UsageError(f"--png {png}: the timeline is a PNG: give a name ending in .png")
    folder = png.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {png}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system"}.get(e.errno, (e.strerror or str(e)).lower())  # fmt: skip
        raise UsageError(f"cannot write {png}: {reason}; choose a writable folder") from None
    return png


def _plot_memory(ax, phases: list[dict], samples: list[dict]) -> None:
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in samples]
    ax.plot(t, [s["rss_bytes"] / 2**30 for s in samples], label="host RSS", color="tab:blue")
    if any(s.get("device_reserved_bytes") is not None for s in samples):
        ax.plot(t, [(s.get("device_reserved_bytes") or 0) / 2**30 for s in samples], label="VRAM reserved",
                color="tab:red")
    if any(s.get("nvml_used_bytes") is not None for s in samples):
        ax.plot(t, [(s.get("nvml_used_bytes") or 0) / 2**30 for s in samples], label="VRAM (driver)",
                color="tab:orange", alpha=0.6)
    colors = plt.cm.Pastel1.colors
    for i, p in enumerate(phases):
        end = p.get("end_s") if p.get("end_s") is not None else (t[-1] if t else p["start_s"])
        ax.axvspan(p["start_s"], end, color=colors[i % len(colors)], alpha=0.5, lw=0)
        ax.text((p["start_s"] + end) / 2, 0.98, p["name"], transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8)
        for key, color in (("predicted_vram_bytes", "tab:red"), ("predicted_ram_bytes", "tab:blue")):
            if p.get(key):
                ax.hlines(p[key] / 2**30, p["start_s"], end, colors=color, linestyles="dashed")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.set_title("memory (dashed: plan's predicted peaks)")
    ax.legend(loc="upper left")


def _plot_training(ax, metrics: list[dict]) -> None:
    steps = [r["step"] for r in metrics if isinstance(r.get("loss"), (int, float))]
    losses = [float(r["loss"]) for r in metrics if isinstance(r.get("loss"), (int, float))]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(steps, smoothed(losses), color="tab:blue", lw=2, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_steps = [r["step"] for r in metrics if isinstance(r.get("lr"), (int, float))]
    lr_ax = ax.twinx()
    lr_ax.plot(lr_steps, [r["lr"] for r in metrics if isinstance(r.get("lr"), (int, float))], color="tab:green",
               lw=1.5, label="lr")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax.set_title("training (raw and smoothed loss, learning rate)")


def render_timeline(run_dir: Path, out_png: Path | None = None) -> Path:
    """Plot memory over time (phases shaded, predicted peaks dashed) and, once steps are logged, loss (raw and
    smoothed) and learning rate over steps beside it; returns the PNG path. Reads what is there (a run may be live).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowvram.fsutil import atomic_path

    view = load_run(Path(run_dir))
    out_png = Path(out_png) if out_png else Path(run_dir) / "memory.png"
    panels = [p for p, present in (("memory", view.samples or view.phases), ("training", view.metrics)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "memory":
            _plot_memory(ax, view.phases, view.samples)
        else:
            _plot_training(ax, view.metrics)
    fig.suptitle(f"lowvram run: {Path(run_dir).name}")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png
