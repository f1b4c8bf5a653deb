"""Crash-safe resume: a tiny training run SIGKILLed at random moments (many inside file writes) ends bit-identical.

One driver process pays the imports once, then forks the training (`run_train`, exactly what `lowvram train` calls)
and kills it, again and again, resuming each time. After every kill it checks that every checkpoint on disk verifies
against its manifest and every cache file is byte-identical to the uninterrupted run's (complete or absent).
Run it alone: `python tests/test_faults_resume.py OUT_DIR` prints the JSON report (kills, observations, seconds).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MIN_KILLS = 20
STEPS = 12
SEED = 20261121


# ---------------------------------------------------------------------------------------------------------------
# The driver (runs in its own process)


def _config(run_dir: Path, dataset: Path):
    from lowvram.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {"family": "tiny", "precision": "fp32"},
            "data": {"dataset_dir": str(dataset), "resolution": "64x64", "frames": 17, "max_text_tokens": 32},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 2e-3, "lr_warmup_steps": 2, "lr_scheduler": "cosine"},
            "train": {"batch_size": 2, "max_train_steps": STEPS, "seed": 7, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 2, "keep_last": 2, "resume": "latest"},
            "output": {"output_dir": str(run_dir)},
        }
    )


def _install_write_hooks(kill_at: int, pipe_fd: int, only: str = "") -> None:
    """Count file-write events; at event `kill_at` tell the parent and wait to be killed.

    Events: a safetensors file half written (its temporary name holds half the bytes), and every rename about to
    happen (a complete temporary file or checkpoint folder not yet in place). Without a kill the write completes
    exactly as it would have, so behaviour is unchanged.
    """
    import safetensors.torch

    real_replace, real_save = os.replace, safetensors.torch.save_file
    count = [0]

    def event(label: str) -> None:
        if only not in label:  # e.g. only="step-": count checkpoint writes alone
            return
        count[0] += 1
        if count[0] == kill_at:
            os.write(pipe_fd, f"{label}\n".encode())
            time.sleep(120)

    def replace(src, dst, *a, **kw):
        event(f"rename {_where(src)} -> {Path(dst).name}")
        return real_replace(src, dst, *a, **kw)

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        with open(filename, "r+b") as f:
            f.truncate(len(data) // 2)
        event(f"half-written {_where(filename)}")
        Path(filename).write_bytes(data)

    os.replace = replace
    safetensors.torch.save_file = save_file


def _where(path) -> str:
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def _child(cfg, log: Path, kill_at: int | None, only: str, pipe_fd: int) -> None:
    code = 3
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if kill_at is not None:
            _install_write_hooks(kill_at, pipe_fd, only)
        from rich.console import Console

        from lowvram.train.run import run

        code = run(cfg, console=Console(file=sys.stdout, width=200)).exit_code
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _attempt(cfg, log: Path, *, kill_at: int | None = None, only: str = "", kill_after_s: float | None = None):
    """Fork one training run; kill it at a write event or after a delay. Returns (killed, where, exit code)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(cfg, log, kill_at, only, write_fd)
    os.close(write_fd)
    start = time.monotonic()
    where = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return False, None, os.waitstatus_to_exitcode(status)
            timeout = 0.02
            if kill_after_s is not None and time.monotonic() - start >= kill_after_s:
                where = f"after {kill_after_s:.2f} s"
                break
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if ready:
                message = os.read(read_fd, 4096).decode().strip()
                if not message:  # the child closed the pipe: it is exiting on its own
                    _, status = os.waitpid(pid, 0)
                    return False, None, os.waitstatus_to_exitcode(status)
                where = message
                break
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        return True, where, -signal.SIGKILL
    finally:
        os.close(read_fd)


def _observe(run_dir: Path, reference: Path) -> list[str]:
    """Everything visible must be whole: checkpoints verify, cache files and the LoRA equal the reference's."""
    from lowvram.fsutil import TMP_PREFIX
    from lowvram.train.checkpoint import list_checkpoints, verify_checkpoint

    problems = []
    for ckpt in list_checkpoints(run_dir):
        reason = verify_checkpoint(ckpt)
        if reason is not None:
            problems.append(f"corrupt checkpoint {ckpt.name}: {reason}")
    cache = run_dir / "cache"
    for f in sorted(cache.rglob("*")) if cache.is_dir() else []:
        if f.is_dir() or f.name.startswith(TMP_PREFIX):
            continue
        twin = reference / f.relative_to(run_dir)
        if f.name == "index.json":
            try:
                json.loads(f.read_text())
            except ValueError as e:
                problems.append(f"corrupt cache index: {e}")
        elif not twin.is_file() or not same_safetensors(f, twin):
            problems.append(f"cache file {f.relative_to(run_dir)} differs from the uninterrupted run's")
    lora = run_dir / "lora.safetensors"
    if lora.exists() and not same_safetensors(lora, reference / "lora.safetensors"):
        problems.append("lora.safetensors differs from the uninterrupted run's")
    return problems


def same_safetensors(a: Path, b: Path) -> bool:
    """Bit-identical tensors and equal metadata (the file bytes may differ: safetensors orders metadata keys by a
    hash map, differently in each process). An unreadable (partial) file is not the same."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
                return False
            for key in fa.keys():
                x, y = fa.get_tensor(key), fb.get_tensor(key)
                if x.dtype != y.dtype or x.shape != y.shape:
                    return False
                if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):  # bits, not values (NaN, -0.0)
                    return False
    except (SafetensorError, OSError):
        return False
    return True


def drive(out_dir: Path, min_kills: int = MIN_KILLS, seed: int = SEED) -> dict:
    import torch

    from lowvram.data.synthetic import make_synthetic_dataset

    torch.set_num_threads(1)
    t0 = time.monotonic()
    import lowvram.train.run  # noqa: F401  (imports paid once, before any fork)
    from lowvram.models.ltx2 import build_tiny_components

    build_tiny_components(seed=0)  # imports diffusers' and transformers' classes, which forked runs then share

    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = out_dir / "clips"
    make_synthetic_dataset(dataset, n_clips=4, width=64, height=64, frames=17)
    reference = out_dir / "reference"
    t_ref = time.monotonic()
    killed, _, code = _attempt(_config(reference, dataset), out_dir / "reference.log")
    ref_seconds = time.monotonic() - t_ref
    assert not killed and code == 0, (out_dir / "reference.log").read_text()[-3000:]

    rng = random.Random(seed)
    kills: list[str] = []
    problems: list[str] = []
    cycles = []
    while len(kills) < min_kills:
        run_dir = out_dir / f"run{len(cycles)}"
        cfg = _config(run_dir, dataset)
        attempts = 0
        while True:
            attempts += 1
            if attempts > 200:
                raise RuntimeError(f"{run_dir}: no progress after 200 attempts")
            if len(kills) >= min_kills:
                spec = {}
            elif attempts % 3 == 0:
                # Inside a checkpoint write (one checkpoint is ~9 events: files half-written, renamed, the folder).
                spec = {"kill_at": rng.randint(1, 14), "only": "step-"}
            elif attempts % 3 == 1:
                # The first attempt of a run writes the caches (~20 events); later ones mostly checkpoints.
                spec = {"kill_at": rng.randint(1, 20 if attempts == 1 else 30)}
            else:
                spec = {"kill_after_s": rng.uniform(0.05, 0.8 * ref_seconds)}
            killed, where, code = _attempt(cfg, out_dir / f"{run_dir.name}.log", **spec)
            problems += [f"{run_dir.name} after kill {len(kills)}: {p}" for p in _observe(run_dir, reference)]
            if killed:
                kills.append(where)
                continue
            if code != 0:
                raise RuntimeError(f"{run_dir}: exit {code}\n" + (out_dir / f"{run_dir.name}.log").read_text()[-3000:])
            break
        same = same_safetensors(run_dir / "lora.safetensors", reference / "lora.safetensors")
        from lowvram.fsutil import TMP_PREFIX

        # A finished run leaves no temporary file where it keeps state (the run folder's own are listed only).
        stale = [str(p.relative_to(run_dir)) for p in run_dir.rglob(TMP_PREFIX + "*")]
        cycles.append({"run": run_dir.name, "attempts": attempts, "bit_identical": same, "temp_files_left": stale})
    return {
        "kills": len(kills),
        "kills_inside_writes": sum(1 for k in kills if k.startswith(("half-written", "rename"))),
        "kills_inside_checkpoint_writes": sum(1 for k in kills if "step-" in k),
        "kills_inside_cache_writes": sum(
            1
            for k in kills
            if k.startswith(("half-written", "rename")) and ("text/" in k or "clips/" in k or "index.json" in k)
        ),
        "resumes_from_checkpoint": sum((out_dir / f"{c['run']}.log").read_text().count("resumed from") for c in cycles),
        "kill_points": kills,
        "problems": problems,
        "cycles": cycles,
        "reference_run_s": round(ref_seconds, 2),
        "total_s": round(time.monotonic() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------------------------
# The test


@pytest.mark.faults
def test_sigkill_at_random_moments_never_corrupts_and_resume_is_bit_identical(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "work"), str(report_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["kills"] >= MIN_KILLS
    assert report["kills_inside_writes"] >= MIN_KILLS // 3
    assert report["problems"] == []
    assert report["cycles"] and all(c["bit_identical"] for c in report["cycles"])
    for cycle in report["cycles"]:
        assert not [p for p in cycle["temp_files_left"] if p.startswith(("checkpoints", "cache"))], cycle
    # The kills landed in different kinds of writes: checkpoint files, cache entries, and folder renames.
    points = " ".join(report["kill_points"])
    assert "half-written" in points and "rename" in points
    assert report["kills_inside_checkpoint_writes"] >= 3 and report["kills_inside_cache_writes"] >= 1
    assert report["resumes_from_checkpoint"] >= 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    result = drive(Path(sys.argv[1]))
    text = json.dumps(result, indent=2)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text)
    print(text)
