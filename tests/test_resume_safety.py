"""No run is lost by resuming: a damaged checkpoint is named and kept, `--resume latest` falls back to the newest
verified one and says so, and a resume that cannot resume stops before any work with every file as it was.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_checkpoint_files import _objects, _save  # tests/ is on sys.path (rootdir conftest)

from lowvram.config import RunConfig
from lowvram.errors import LowvramError, UsageError
from lowvram.train.run_folder import LOCK_FILE, PREVIOUS_RUNS_DIR, choose_start

STEPS = 4


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (but the lock, which exists to be written) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}  # fmt: skip


def a_trained_run(run_dir: Path, steps=(2,)) -> None:
    """A run folder as training leaves it: checkpoints, the LoRA, metrics.jsonl, memory.jsonl."""
    objs = _objects()
    for step in steps:
        _save(run_dir, step, *objs)
    (run_dir / "lora.safetensors").write_bytes(b"trained LoRA")
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, max(steps) + 1)))
    (run_dir / "memory.jsonl").write_text('{"type": "phase", "name": "train"}\n')


def said() -> tuple[list[str], callable]:
    lines: list[str] = []
    return lines, lines.append


# ---------------------------------------------------------------------------------------------------------------
# Deciding where a run starts (before any work)


def test_the_only_checkpoint_damaged_stops_naming_file_and_checksum_and_changes_nothing(tmp_path):
    a_trained_run(tmp_path)
    flip_a_byte(tmp_path / "checkpoints" / "step-00000002" / "lora.safetensors")
    before = snapshot(tmp_path)
    with pytest.raises(LowvramError) as err:
        choose_start(tmp_path, "latest")
    assert err.value.exit_code == 1
    assert str(err.value) == (
        f"--resume latest: no checkpoint in {tmp_path / 'checkpoints'} verifies (step-00000002: lora.safetensors "
        "does not match its checksum); nothing was changed: resume from another folder with --resume FOLDER, or add "
        "--start-over to keep this run's files in previous-runs/ and start at step 0"
    )
    assert snapshot(tmp_path) == before


def test_a_damaged_newest_checkpoint_is_kept_and_latest_falls_back_saying_so(tmp_path):
    a_trained_run(tmp_path, steps=(2, 4))
    flip_a_byte(tmp_path / "checkpoints" / "step-00000004" / "optimizer.safetensors")
    damaged = snapshot(tmp_path / "checkpoints" / "step-00000004")
    lines, say = said()
    start = choose_start(tmp_path, "latest", say=say)
    assert start.resume == tmp_path / "checkpoints" / "step-00000002"
    assert lines == [
        "checkpoint step-00000004 is damaged (optimizer.safetensors does not match its checksum): kept as "
        "checkpoints/damaged-step-00000004",
        "resuming from the newest verified checkpoint, step-00000002",
    ]
    assert snapshot(tmp_path / "checkpoints" / "damaged-step-00000004") == damaged


def test_start_over_keeps_the_previous_run_in_previous_runs(tmp_path):
    a_trained_run(tmp_path)
    flip_a_byte(tmp_path / "checkpoints" / "step-00000002" / "rng.safetensors")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "entry").write_bytes(b"cached latents")
    before = snapshot(tmp_path)
    lines, say = said()
    start = choose_start(tmp_path, "latest", start_over=True, say=say)
    assert start.resume is None and start.set_aside.parent == tmp_path / PREVIOUS_RUNS_DIR
    assert lines == [f"--start-over: the previous run's files are kept in {start.set_aside}; starting at step 0"]
    prefix = str(start.set_aside.relative_to(tmp_path)) + "/"
    after = {k.removeprefix(prefix): v for k, v in snapshot(tmp_path).items()}
    assert after == before  # every byte still there; only the run's own files moved (the cache stays for reuse)
    assert (tmp_path / "cache" / "entry").is_file() and not (tmp_path / "lora.safetensors").exists()


def test_resume_latest_into_a_folder_without_a_run_says_so_and_starts_at_step_0(tmp_path):
    lines, say = said()
    assert choose_start(tmp_path / "new", "latest", say=say).resume is None
    assert lines == [f"--resume latest: {tmp_path / 'new'} holds no checkpoint yet: starting a new run at step 0"]


def test_a_run_killed_before_its_first_checkpoint_restarts_at_step_0(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # nothing trained was saved: nothing to lose
    assert choose_start(tmp_path, "latest", say=lambda _: None).resume is None


def test_a_fresh_start_into_a_trained_run_is_refused(tmp_path):
    a_trained_run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(LowvramError) as err:
        choose_start(tmp_path, None)
    assert str(err.value) == (
        f"{tmp_path} already holds a trained run (checkpoints/step-00000002, lora.safetensors): continue it with "
        "--resume latest, choose another --output-dir, or add --start-over to keep its files in previous-runs/ and "
        "start at step 0"
    )
    assert snapshot(tmp_path) == before


def test_a_named_damaged_checkpoint_is_refused_even_with_start_over(tmp_path):
    a_trained_run(tmp_path)
    path = tmp_path / "checkpoints" / "step-00000002"
    flip_a_byte(path / "state.json")
    with pytest.raises(LowvramError, match="state.json does not match its checksum"):
        choose_start(tmp_path, str(path), start_over=True)
    with pytest.raises(UsageError, match="no such checkpoint folder"):
        choose_start(tmp_path, str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------------------
# Through the real run (what `lowvram train` calls)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from lowvram.data.synthetic import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(folder, n_clips=2, width=64, height=64, frames=17)
    return folder


def config(run_dir: Path, dataset: Path, resume: str | None = None, start_over: bool = False) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny", "precision": "fp32"},
            "data": {"dataset_dir": str(dataset), "resolution": "64x64", "frames": 17, "max_text_tokens": 32,
                     "cache_dir": str(dataset.parent / "cache")},  # fmt: skip
            "lora": {"rank": 4},
            "optim": {"learning_rate": 2e-3, "lr_warmup_steps": 1, "lr_scheduler": "cosine"},
            "train": {"batch_size": 2, "max_train_steps": STEPS, "seed": 7, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 2, "keep_last": 3, "resume": resume, "start_over": start_over},
            "output": {"output_dir": str(run_dir)},
        }
    )


def train(cfg: RunConfig) -> tuple[object, str]:
    from lowvram.train.run import run

    out = io.StringIO()
    return run(cfg, console=Console(file=out, width=400)), out.getvalue()


def test_run_refuses_a_resume_with_no_verified_checkpoint_before_any_work(tmp_path, dataset):
    a_trained_run(tmp_path / "run")
    flip_a_byte(tmp_path / "run" / "checkpoints" / "step-00000002" / "lora.safetensors")
    before = snapshot(tmp_path / "run")
    with pytest.raises(LowvramError, match="lora.safetensors does not match its checksum"):
        train(config(tmp_path / "run", dataset, resume="latest"))
    assert snapshot(tmp_path / "run") == before  # LoRA, metrics.jsonl, memory.jsonl, the checkpoint: untouched


def test_run_falls_back_to_the_verified_checkpoint_and_ends_bit_identical(tmp_path, dataset):
    reference, _ = train(config(tmp_path / "ref", dataset))
    assert reference.exit_code == 0
    train(config(tmp_path / "run", dataset))
    flip_a_byte(tmp_path / "run" / "checkpoints" / "step-00000004" / "lora.safetensors")
    result, log = train(config(tmp_path / "run", dataset, resume="latest"))
    assert result.exit_code == 0
    assert "checkpoint step-00000004 is damaged (lora.safetensors does not match its checksum)" in log
    assert "resumed from" in log and "step-00000002 at step 2" in log
    assert (tmp_path / "run" / "checkpoints" / "damaged-step-00000004").is_dir()
    ref, got = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("ref", "run"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_damaged_only_checkpoint_exits_1_in_one_line(tmp_path, cli):
    a_trained_run(tmp_path)
    manifest = tmp_path / "checkpoints" / "step-00000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # cut short, as by a disk that lost its tail
    before = snapshot(tmp_path)
    r = cli("train", "--output-dir", str(tmp_path), "--resume", "latest")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowvram: error: --resume latest: no checkpoint in"), r.stderr
    assert "unreadable manifest" in lines[0] and "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before


def test_resuming_with_another_optimizer_or_rank_is_refused_before_any_work(tmp_path, dataset):
    train(config(tmp_path / "run", dataset))
    before = snapshot(tmp_path / "run")
    step4 = tmp_path / "run" / "checkpoints" / "step-00000004"
    cfg = config(tmp_path / "run", dataset, resume="latest")
    other = {"optim": cfg.optim.model_copy(update={"optimizer": "adamw_bf16"})}
    with pytest.raises(LowvramError) as err:
        train(cfg.model_copy(update=other))
    assert str(err.value) == (
        f'checkpoint {step4} was trained with optim.optimizer = "adamw" and this run sets "adamw_bf16": resume with '
        'optim.optimizer = "adamw", or train into another --output-dir'
    )
    with pytest.raises(LowvramError, match='lora.rank = 4 and this run sets 8'):
        train(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": 8})}))
    assert snapshot(tmp_path / "run") == before  # memory.jsonl and metrics.jsonl included


def test_a_resume_failing_while_loading_leaves_memory_and_metrics_as_they_were(tmp_path, dataset, monkeypatch):
    from lowvram.train import checkpoint

    train(config(tmp_path / "run", dataset))
    before = snapshot(tmp_path / "run")

    def unreadable(path, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict: size mismatch")

    monkeypatch.setattr(checkpoint, "load_checkpoint", unreadable)
    with pytest.raises(LowvramError) as err:  # after caching: the phases had rewritten memory.jsonl
        train(config(tmp_path / "run", dataset, resume="latest"))
    assert str(err.value).endswith("step-00000004: RuntimeError: Error(s) in loading state_dict: size mismatch")
    assert snapshot(tmp_path / "run") == before
