"""The fake-tensor instrument: exact live bytes, per-section peaks and FLOPs of a run on fake tensors.

It counts tensor storages (what a caching allocator must hold between ops) and matmul/attention FLOPs; it does not
see kernel workspaces (cuBLAS, cuDNN) nor allocator rounding, which the profile's reserve covers.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


def _cpu_flash_flops(func, args, out) -> int | None:
    """FLOPs of the CPU flash-attention kernels, which FlopCounterMode's table does not list (CUDA ones only)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    if func is aten._scaled_dot_product_flash_attention_for_cpu.default:
        q, k, v = args[:3]
        return sdpa_flop_count(q.shape, k.shape, v.shape)
    if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        grad_out, q, k, v = args[:4]
        return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
    return None


class LiveBytes(TorchDispatchMode):
    """Live bytes of every storage created while active, their peak per named section, and FLOPs per section.

    Storages registered with `ignore` (parameters, buffers) never count, nor do views of them. A storage counts
    from the op that creates it until a finalizer sees it freed, so live bytes and peaks are exact.
    FLOPs use `torch.utils.flop_counter`'s formula table (what FlopCounterMode counts) plus the CPU flash kernels.
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._flop_registry = flop_registry
        # Storages keep their Python object alive as long as the storage lives (PyObject preservation), so a
        # finalizer on it fires exactly when the bytes are freed.
        self._known: weakref.WeakSet = weakref.WeakSet()
        self.live_bytes = 0
        self.section = "start"
        self.peaks: dict[str, int] = {}
        self.flops: dict[str, int] = {}
        self.marks: dict[str, int] = {}

    def ignore(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._known.add(t.untyped_storage())

    def enter_section(self, name: str) -> None:
        self.section = name
        self.peaks.setdefault(name, self.live_bytes)

    def mark(self, name: str) -> int:
        self.marks[name] = self.live_bytes
        return self.live_bytes

    def now(self) -> int:
        return self.live_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.peaks.values(), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._count_flops(func, args, kwargs, out)
        grew = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage in self._known:
                    continue
                self._known.add(storage)
                nbytes = storage.nbytes()
                self.live_bytes += nbytes
                weakref.finalize(storage, self._free, nbytes)
                grew = True
        if grew and self.live_bytes > self.peaks.get(self.section, -1):
            self.peaks[self.section] = self.live_bytes
        return out

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def _count_flops(self, func, args, kwargs, out) -> None:
        n = _cpu_flash_flops(func, args, out)
        if n is None:
            formula = self._flop_registry.get(func._overloadpacket)
            if formula is None:
                return
            n = formula(*args, **kwargs, out_val=out)
        self.flops[self.section] = self.flops.get(self.section, 0) + int(n)


@contextlib.contextmanager
def attention_backend(kind: str) -> Iterator[None]:
    """`flash`: the O(N) SDPA kernels (what fake CPU runs take by default); `math`: materialized O(N^2) scores."""
    if kind == "flash":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def register_module_storages(live: LiveBytes, module: torch.nn.Module) -> None:
    live.ignore(*module.parameters(), *module.buffers())
