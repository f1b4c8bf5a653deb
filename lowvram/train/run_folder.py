"""A run folder's safety: one writer at a time (an OS lock), and no trained run lost by resuming or starting over.

It decides, before any work, where a run starts (a verified checkpoint, or step 0) and refuses whatever would
overwrite something trained. It does not write checkpoints (checkpoint.py) or train (loop.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.train.checkpoint import CHECKPOINTS_DIR, list_checkpoints, resolve_resume, verify_checkpoint

LORA_FILE = "lora.safetensors"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lowvram.lock"
PREVIOUS_RUNS_DIR = "previous-runs"
DAMAGED_PREFIX = "damaged-"
# What a training writes into its folder; `--start-over` moves these aside together. The caches (cache/,
# quant-cache/) are keyed by their settings and stay: the new run reuses them.
RUN_OUTPUTS = (CHECKPOINTS_DIR, LORA_FILE, METRICS_FILE, "memory.jsonl", "memory.png", "validation", "ranks")


# --------------------------------------------------------------------------------------------------------------------
# One writer per folder


class RunFolderLocked(LowvramError):
    """Another live process holds the run folder (exit 1: wait for it, or choose another folder)."""


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path, *, command: str = "train") -> Iterator[Path]:
    """Hold an exclusive lock on `run_dir` for the duration, or raise RunFolderLocked naming its holder.

    An OS lock (`flock`) on `run_dir/.lowvram.lock`: the kernel drops it when its process dies, however it dies, so
    a lock left by a killed run is never in the way (no pid guessing, no stale-lock cleanup). The file itself stays
    (deleting it would let a second process lock a new inode while a third still holds the old one); it records
    the holder's pid, host, start time and command, for the message a second start gets.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder is not locked there (README says so)
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderLocked(
                f"{run_dir} is in use by another lowvram run ({_holder(path)}): wait for it to finish, stop it, "
                "or choose another --output-dir"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"lowvram {info['command']}, pid {info['pid']} on {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"


# --------------------------------------------------------------------------------------------------------------------
# Where a run starts


@dataclass(frozen=True)
class RunStart:
    """Where the run starts: `resume` is a verified checkpoint folder, or None for step 0."""

    resume: Path | None
    set_aside: Path | None = None  # where --start-over moved the previous run's files


def trained_outputs(run_dir: str | Path) -> list[str]:
    """What in `run_dir` holds training a new run at step 0 would overwrite: checkpoint folders and the LoRA.

    A metrics log without either is a run killed before its first checkpoint: nothing trained to lose.
    """
    run_dir = Path(run_dir)
    found = [f"{CHECKPOINTS_DIR}/{p.name}" for p in list_checkpoints(run_dir)]
    found += [f"{CHECKPOINTS_DIR}/{p.name}" for p in _damaged(run_dir)]
    if (run_dir / LORA_FILE).is_file():
        found.append(LORA_FILE)
    return found


def choose_start(
    run_dir: str | Path, resume: str | None, *, start_over: bool = False, say: Callable[[str], None] = print
) -> RunStart:
    """Decide, before any work, where the run in `run_dir` starts; refuse (exit 1) what would lose a trained run.

    - `resume=None`: step 0 in a folder holding no trained run; one holding checkpoints or a LoRA is refused unless
      `start_over`, which moves that run's files to `previous-runs/<time>/` (nothing is deleted).
    - `resume='latest'`: the newest checkpoint that verifies. Damaged newer ones are renamed `damaged-step-N`,
      named with what failed, and kept. None verifies: refused unless `start_over`. No run there at all: step 0.
    - `resume=FOLDER`: that checkpoint, verified (a damaged one is refused whatever `start_over` says).
    """
    run_dir = Path(run_dir).expanduser()
    if resume and resume != "latest":
        return RunStart(resume=resolve_resume(run_dir, resume))
    damaged = {} if not resume else {p: verify_checkpoint(p) for p in list_checkpoints(run_dir)}
    damaged = {p: why for p, why in damaged.items() if why}
    found = trained_outputs(run_dir)
    latest = next((p for p in reversed(list_checkpoints(run_dir)) if p not in damaged), None) if resume else None
    if latest is not None:
        for path, why in damaged.items():
            if path.name > latest.name:
                kept = _keep_damaged(path)
                say(f"checkpoint {path.name} is damaged ({why}): kept as {CHECKPOINTS_DIR}/{kept.name}")
        if any(p.name > latest.name for p in damaged):
            say(f"resuming from the newest verified checkpoint, {latest.name}")
        return RunStart(resume=latest)
    if not found:
        if resume:
            say(f"--resume latest: {run_dir} holds no checkpoint yet: starting a new run at step 0")
        return RunStart(resume=None)
    if start_over:
        aside = set_aside_run(run_dir)
        say(f"--start-over: the previous run's files are kept in {aside}; starting at step 0")
        return RunStart(resume=None, set_aside=aside)
    if resume:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged.items()) or "no checkpoint folder"
        raise LowvramError(
            f"--resume latest: no checkpoint in {run_dir / CHECKPOINTS_DIR} verifies ({reasons}); nothing was "
            f"changed: resume from another folder with --resume FOLDER, or add --start-over to keep this run's files "
            f"in {PREVIOUS_RUNS_DIR}/ and start at step 0"
        )
    raise LowvramError(
        f"{run_dir} already holds a trained run ({', '.join(found[-3:])}): continue it with --resume latest, choose "
        f"another --output-dir, or add --start-over to keep its files in {PREVIOUS_RUNS_DIR}/ and start at step 0"
    )


def set_aside_run(run_dir: str | Path) -> Path:
    """Move the run outputs of `run_dir` into a new `previous-runs/<UTC time>/` folder (renames: nothing copied)."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = run_dir / PREVIOUS_RUNS_DIR / stamp
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / PREVIOUS_RUNS_DIR / f"{stamp}-{n}"
    aside.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return aside


def _damaged(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS_DIR
    return sorted(root.glob(DAMAGED_PREFIX + "*")) if root.is_dir() else []


def _keep_damaged(path: Path) -> Path:
    """Rename a checkpoint that does not verify out of the way (pruning and resaving never touch it)."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    os.replace(path, target)
    return target
