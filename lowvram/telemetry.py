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


def read_memory_file(path: Path) -> tuple[list[dict], list[dict]]:
    """(phases, samples) from a run's memory.jsonl."""
    phases, samples = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
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


def render_timeline(run_dir: Path, out_png: Path | None = None) -> Path:
    """Plot memory over time with phases shaded and predicted peaks dashed; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowvram.fsutil import atomic_path

    phases, samples = read_memory_file(Path(run_dir) / MEMORY_FILE)
    out_png = Path(out_png) if out_png else Path(run_dir) / "memory.png"
    fig, ax = plt.subplots(figsize=(10, 4.5))
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
    ax.set_title(f"lowvram memory timeline: {Path(run_dir).name} (dashed: plan's predicted peaks)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png
