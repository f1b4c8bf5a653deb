"""A checkpoint is complete and verified, or it is not a checkpoint: manifest, checksums, temp folders, pruning."""

import json

import pytest
import torch

from lowvram.errors import LowvramError, UsageError
from lowvram.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from lowvram.train.optim import build_lr_scheduler, build_optimizer


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(3, 3).requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(2, 3))
        self.lora_B = torch.nn.Parameter(torch.zeros(3, 2))


def _objects(seed=0):
    from lowvram.config import OptimSection

    torch.manual_seed(seed)
    model = Tiny()
    cfg = OptimSection(learning_rate=0.1, lr_warmup_steps=1, lr_scheduler="linear")
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=10)
    return model, opt, sched, torch.Generator().manual_seed(seed)


def _step(model, opt, sched):
    (model.lora_B @ model.lora_A).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(run_dir, step, model, opt, sched, gen, keep_last=3):
    return save_checkpoint(
        run_dir,
        step=step,
        model=model,
        optimizer=opt,
        scheduler=sched,
        generator=gen,
        data_position={"epoch": 0, "index": step},
        keep_last=keep_last,
    )


def test_saved_checkpoint_verifies_and_restores_every_state(tmp_path):
    model, opt, sched, gen = _objects()
    _step(model, opt, sched)
    torch.manual_seed(5)
    gen.manual_seed(9)
    path = _save(tmp_path, 1, model, opt, sched, gen)
    assert verify_checkpoint(path) is None
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == [
        "lora.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    expected_cpu, expected_gen = torch.rand(3), torch.rand(3, generator=gen)

    model2, opt2, sched2, gen2 = _objects(seed=1)
    info = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, generator=gen2)
    assert info.step == 1 and info.data_position == {"epoch": 0, "index": 1}
    assert torch.equal(model2.lora_A, model.lora_A) and torch.equal(model2.lora_B, model.lora_B)
    assert torch.equal(opt2.state[model2.lora_A]["exp_avg_sq"], opt.state[model.lora_A]["exp_avg_sq"])
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(3), expected_cpu) and torch.equal(torch.rand(3, generator=gen2), expected_gen)
    # Training on from both gives the same numbers.
    _step(model, opt, sched)
    _step(model2, opt2, sched2)
    assert torch.equal(model.lora_A, model2.lora_A)


def test_a_corrupted_file_fails_verification_and_latest_falls_back(tmp_path):
    objs = _objects()
    first = _save(tmp_path, 1, *objs)
    second = _save(tmp_path, 2, *objs)
    data = bytearray((second / "lora.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (second / "lora.safetensors").write_bytes(bytes(data))
    assert "checksum" in verify_checkpoint(second)
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(LowvramError, match="not a usable checkpoint"):
        resolve_resume(tmp_path, str(second))


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    objs = _objects()
    path = _save(tmp_path, 3, *objs)
    (path / "manifest.json").unlink()
    assert verify_checkpoint(path) == "no manifest (incomplete write)"
    assert latest_checkpoint(tmp_path) is None
    assert resolve_resume(tmp_path, "latest") is None


def test_interrupted_write_leaves_only_a_temp_folder_that_is_ignored_and_cleaned(tmp_path):
    objs = _objects()
    (tmp_path / "checkpoints" / ".tmp-step-00000009.abc").mkdir(parents=True)
    assert list_checkpoints(tmp_path) == []
    _save(tmp_path, 1, *objs)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_keep_last_prunes_older_checkpoints(tmp_path):
    objs = _objects()
    for step in range(1, 5):
        _save(tmp_path, step, *objs, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    model, opt, sched, gen = _objects()
    _save(tmp_path, 1, model, opt, sched, gen)
    with torch.no_grad():
        model.lora_A.add_(1)
    path = _save(tmp_path, 1, model, opt, sched, gen)
    assert verify_checkpoint(path) is None
    model2, opt2, sched2, gen2 = _objects(seed=3)
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, generator=gen2)
    assert torch.equal(model2.lora_A, model.lora_A)


def test_resume_arguments_are_checked(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(UsageError, match="no such checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_loading_into_a_different_lora_is_refused_naming_keys(tmp_path):
    path = _save(tmp_path, 1, *_objects())
    model, opt, sched, gen = _objects()
    model.lora_C = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(LowvramError, match="lora_C"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, generator=gen)
