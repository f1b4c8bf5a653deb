"""FSDP2 under torchrun on the tiny model: 2 gloo processes train the same LoRA as one process with the same global
batch, and a checkpoint saved by 2 processes resumes in 1.

Two real `run_train(..., nproc=2)` (each launches torchrun) and two in-process single-process runs over the same
cached dataset. Batch 3 over 2 ranks splits 2 + 1 rows, and the epoch's leftover batch of 1 leaves rank 1 with no
rows: the uneven split, the masked first-frame tokens and the empty rank are all inside the equality.
"""

import pytest
import torch
from safetensors.torch import load_file

from lowvram.config import RunConfig
from lowvram.train.checkpoint import list_checkpoints
from lowvram.train.loop import read_metrics
from lowvram.train.run import run_train

pytestmark = pytest.mark.distributed

STEPS = 4
# fp32 on CPU; the only differences are summation order (gloo's reduce, per-rank matmul shapes). Measured max abs
# difference over the LoRA after 4 steps: ~1e-8 (values ~1e-2..1).
ATOL, RTOL = 1e-6, 1e-5


def run_config(out, dataset, cache, *, resume=None, activation_offload=None) -> RunConfig:
    return RunConfig.model_validate(
        {
            "memory": {"activation_offload": activation_offload},
            "model": {"family": "tiny", "precision": "fp32"},
            "data": {
                "dataset_dir": str(dataset),
                "cache_dir": str(cache),
                "resolution": "64x64",
                "frames": 17,
                "fps": 25.0,
                "audio": True,
                "max_text_tokens": 32,
            },
            "lora": {"rank": 4},
            "optim": {
                "optimizer": "adamw",
                "learning_rate": 1e-3,
                "lr_scheduler": "constant",
                "lr_warmup_steps": 0,
                "max_grad_norm": 1.0,
            },
            "train": {
                "batch_size": 3,
                "max_train_steps": STEPS,
                "seed": 5,
                "mixed_precision": "fp32",
                "first_frame_conditioning_p": 0.5,
            },
            "checkpoint": {"every_n_steps": 2, "keep_last": 3, "resume": None if resume is None else str(resume)},
            "output": {"output_dir": str(out)},
        }
    )


def checkpoint_tensors(run_dir, step: int) -> dict[str, torch.Tensor]:
    folder = next(p for p in list_checkpoints(run_dir) if p.name == f"step-{step:08d}")
    lora = {f"lora/{k}": v for k, v in load_file(str(folder / "lora.safetensors")).items()}
    opt = {f"optimizer/{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()}
    return {**lora, **opt}


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-process run A, single-process reference B; C resumes A's step 2 in one process, D B's step 2 in two
    (with activation offload)."""
    from lowvram.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("dist")
    dataset, cache = root / "clips", root / "cache"
    make_synthetic_dataset(dataset, n_clips=4, width=64, height=64, frames=17, fps=25, seed=0, audio=True)
    threads = torch.get_num_threads()
    try:
        assert run_train(run_config(root / "a", dataset, cache), nproc=2) == 0
        assert run_train(run_config(root / "b", dataset, cache), nproc=1) == 0
        resume_from = next(p for p in list_checkpoints(root / "a") if p.name == "step-00000002")
        assert run_train(run_config(root / "c", dataset, cache, resume=resume_from), nproc=1) == 0
        resume_from = next(p for p in list_checkpoints(root / "b") if p.name == "step-00000002")
        # D also keeps the checkpointed block inputs on the host (activation offload: exact, so the LoRA is the same).
        d = run_config(root / "d", dataset, cache, resume=resume_from, activation_offload=True)
        assert run_train(d, nproc=2) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def test_two_processes_train_the_same_lora_and_optimizer_state_as_one(runs):
    for step in (2, STEPS):
        assert_same_state(checkpoint_tensors(runs / "a", step), checkpoint_tensors(runs / "b", step))
    exported_a = load_file(str(runs / "a" / "lora.safetensors"))
    exported_b = load_file(str(runs / "b" / "lora.safetensors"))
    assert exported_a.keys() == exported_b.keys() and all(k.startswith("diffusion_model.") for k in exported_a)
    assert_same_state(exported_a, exported_b)
    # The LoRA moved: equality is not two untouched initialisations.
    assert any(v.abs().max() > 0 for k, v in exported_a.items() if "lora_B" in k)


def test_loss_logged_by_rank_zero_is_the_global_batch_loss(runs):
    a, b = read_metrics(runs / "a"), read_metrics(runs / "b")
    assert [m["step"] for m in a] == list(range(1, STEPS + 1))
    for got, want in zip(a, b, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    # Rank 1 logs beside it, never into the run's own metrics file.
    assert (runs / "a" / "ranks" / "rank-1" / "metrics.jsonl").is_file()


def test_checkpoint_saved_by_two_processes_resumes_in_one(runs):
    assert_same_state(checkpoint_tensors(runs / "c", STEPS), checkpoint_tensors(runs / "b", STEPS))
    assert [m["step"] for m in read_metrics(runs / "c")] == [3, 4]


def test_checkpoint_saved_by_one_process_resumes_in_two_with_activation_offload(runs):
    assert_same_state(checkpoint_tensors(runs / "d", STEPS), checkpoint_tensors(runs / "b", STEPS))


def test_checkpoints_are_written_once_and_whole(runs):
    from lowvram.train.checkpoint import verify_checkpoint

    folders = list_checkpoints(runs / "a")
    assert [p.name for p in folders] == ["step-00000002", "step-00000004"]
    assert all(verify_checkpoint(p) is None for p in folders)
    assert not any(p.name.startswith(".") for p in (runs / "a" / "checkpoints").iterdir())


IN_TURN_SCRIPT = """
import sys, time
from pathlib import Path
from lowvram.train import distributed

distributed.start("cpu")
env = distributed.current()
with distributed.in_turn():
    start = time.monotonic()
    time.sleep(0.3)
    Path(sys.argv[1], f"rank-{env.rank}").write_text(f"{start} {time.monotonic()}")
distributed.stop()
"""


def test_ranks_load_in_turn_so_the_host_holds_one_whole_model_at_a_time(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "in_turn.py"
    script.write_text(IN_TURN_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)
    spans = [tuple(map(float, (tmp_path / f"rank-{r}").read_text().split())) for r in range(3)]
    assert all(spans[r][1] <= spans[r + 1][0] for r in range(2)), spans  # rank 0, then 1, then 2: never overlapping
