"""Every optimizer's state round-trips through a checkpoint: save, resume, and the continuation is bit-identical.

bitsandbytes' 8-bit AdamW nests its quantized state one level down; before the tree layout the first checkpoint
save died with `TypeError: Object of type Tensor is not JSON serializable`. A save that fails keeps the LoRA.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint_resume import (  # tests/ is on sys.path (rootdir conftest)
    _straight_and_resumed,
    batches,
    lora_tensors,
    tiny_config,
    tiny_samples,
    tiny_transformer,
)

from lowvram.config import OptimSection
from lowvram.errors import LowvramError
from lowvram.train import checkpoint
from lowvram.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from lowvram.train.loop import LORA_FILE, fit
from lowvram.train.optim import OPTIMIZERS, build_lr_scheduler, build_optimizer


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_training_resumed_from_a_checkpoint_is_bit_identical_for_every_optimizer(tmp_path, optimizer):
    straight, resumed = _straight_and_resumed(tmp_path, optimizer)
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), (optimizer, name)


class Big(torch.nn.Module):
    """One parameter above bitsandbytes' 4096-element threshold, so its states really are 8-bit."""

    def __init__(self, seed: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8192, generator=torch.Generator().manual_seed(seed)))


def _objects(optimizer: str, seed: int):
    model = Big(seed)
    cfg = OptimSection(optimizer=optimizer, learning_rate=1e-2, weight_decay=0.01)
    opt = build_optimizer(model.parameters(), cfg, seed=3)
    return model, opt, build_lr_scheduler(opt, cfg, 10), torch.Generator().manual_seed(seed)


def _step(model, opt, sched, step: int) -> None:
    model.w.grad = torch.randn(8192, generator=torch.Generator().manual_seed(100 + step))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_state_saved_and_loaded_continues_bit_identically(tmp_path, optimizer):
    model, opt, sched, gen = _objects(optimizer, seed=0)
    for step in range(3):
        _step(model, opt, sched, step)
    path = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, generator=gen,
                           data_position={"epoch": 0})  # fmt: skip
    assert verify_checkpoint(path) is None

    model2, opt2, sched2, gen2 = _objects(optimizer, seed=5)  # different weights: all must come from the file
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, generator=gen2)
    before = {k: v for k, v in opt.state[model.w].items() if isinstance(v, torch.Tensor)}
    after = {k: v for k, v in opt2.state[model2.w].items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys()
    for key in before:  # same dtype too: bitsandbytes' uint8 states must not come back as floats
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    for step in range(3, 6):
        _step(model, opt, sched, step)
        _step(model2, opt2, sched2, step)
    assert torch.equal(model.w, model2.w)


def test_adamw8bit_state_is_stored_8bit(tmp_path):
    model, opt, sched, gen = _objects("adamw8bit", seed=0)
    _step(model, opt, sched, 0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, generator=gen,
                           data_position={})  # fmt: skip
    stored = load_file(str(path / "optimizer.safetensors"))
    assert any(t.dtype == torch.uint8 and t.numel() == 8192 for t in stored.values()), list(stored)


def test_a_failed_checkpoint_save_keeps_the_lora_trained_so_far(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise TypeError("Object of type Tensor is not JSON serializable")

    monkeypatch.setattr(checkpoint, "save_checkpoint", broken_save)
    model = tiny_transformer()
    with pytest.raises(LowvramError) as err:
        fit(tiny_config(tmp_path, 4), model, batches(tiny_samples()), run_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint of step 2 could not be saved (TypeError: Object of type Tensor")
    assert f"the LoRA trained so far (step 2) is in {tmp_path / LORA_FILE}" in message
    exported = load_file(str(tmp_path / LORA_FILE))
    assert exported and all(k.startswith("diffusion_model.") for k in exported)
    # It is the step-2 LoRA: B moved off its zero initialisation.
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in exported.items())
