"""Quantized cache: written once, then used; stale (source changed) and corrupt caches are detected and rebuilt."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowvram.fsutil import TMP_PREFIX
from lowvram.quant import Precision, allocated_bytes, build_empty, load_quantized

QUANTIZED = [p for p in Precision if p.quantized]
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _write_checkpoint(path, seed: int) -> Mlp:
    torch.manual_seed(seed)
    model = Mlp().requires_grad_(False)
    save_file(model.state_dict(), path)
    return model


def _load(path, cache_dir, precision="int8-quanto", **kwargs):
    model = build_empty(Mlp)
    result = load_quantized(model, path, precision, dtype=torch.float32, cache_dir=cache_dir, **kwargs)
    return model, result


@pytest.mark.parametrize("precision", QUANTIZED, ids=lambda p: p.value)
def test_second_load_uses_the_cache_and_gives_the_same_model(tmp_path, precision):
    ckpt = tmp_path / "mlp.safetensors"
    _write_checkpoint(ckpt, 0)
    first, r1 = _load(ckpt, tmp_path / "cache", precision)
    second, r2 = _load(ckpt, tmp_path / "cache", precision)
    assert (r1.source, r1.cache_status) == ("checkpoint", "written")
    assert (r2.source, r2.cache_status) == ("cache", "hit")
    assert r1.cache_path == r2.cache_path and r2.cache_path.is_file()
    assert r2.quantized_modules == ("fc1", "fc2")
    assert torch.equal(first(X), second(X))
    assert allocated_bytes(first) == allocated_bytes(second)
    assert not any(p.requires_grad for p in second.parameters())


def test_changed_checkpoint_makes_the_cache_stale_and_it_is_rebuilt(tmp_path):
    ckpt = tmp_path / "mlp.safetensors"
    cache = tmp_path / "cache"
    _write_checkpoint(ckpt, 0)
    _, r1 = _load(ckpt, cache)
    new_reference = _write_checkpoint(ckpt, 1)  # same size and layout, new values
    os.utime(ckpt, ns=(1, 1))  # even an mtime going backwards must not fool it: the head hash differs
    model, r2 = _load(ckpt, cache)
    assert r2.source == "checkpoint" and r2.cache_status == "rebuilt" and r2.cache_problem.startswith("stale")
    assert r2.cache_path != r1.cache_path and not r1.cache_path.exists()  # the old cache is removed
    assert (model(X) - new_reference(X)).norm() / new_reference(X).norm() < 0.02
    _, r3 = _load(ckpt, cache)
    assert r3.cache_status == "hit"


def test_changed_exclude_list_does_not_reuse_the_cache(tmp_path):
    ckpt = tmp_path / "mlp.safetensors"
    _write_checkpoint(ckpt, 0)
    _load(ckpt, tmp_path / "cache")
    model, result = _load(ckpt, tmp_path / "cache", exclude=("fc2",))
    assert result.source == "checkpoint" and result.quantized_modules == ("fc1",)
    assert type(model.fc2) is nn.Linear


def _corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))


def _corrupt_flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's data: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_truncate, _corrupt_header, _corrupt_flip_last_byte],
    ids=["truncated", "garbage-header", "flipped-data-byte"],
)
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, corrupt):
    ckpt = tmp_path / "mlp.safetensors"
    _write_checkpoint(ckpt, 0)
    good, r1 = _load(ckpt, tmp_path / "cache")
    corrupt(r1.cache_path)
    model, r2 = _load(ckpt, tmp_path / "cache")
    assert r2.cache_status == "rebuilt" and r2.cache_problem.startswith("corrupt")
    assert torch.equal(model(X), good(X))
    _, r3 = _load(ckpt, tmp_path / "cache")
    assert r3.cache_status == "hit"


def test_cache_writes_leave_no_temporary_files(tmp_path):
    ckpt = tmp_path / "mlp.safetensors"
    _write_checkpoint(ckpt, 0)
    _load(ckpt, tmp_path / "cache")
    names = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(names) == 1 and not any(n.startswith(TMP_PREFIX) for n in names)


def test_unquantized_precision_does_not_cache(tmp_path):
    ckpt = tmp_path / "mlp.safetensors"
    _write_checkpoint(ckpt, 0)
    _, result = _load(ckpt, tmp_path / "cache", precision="bf16")
    assert result.cache_status == "off" and not (tmp_path / "cache").exists()
