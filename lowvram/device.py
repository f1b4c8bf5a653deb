"""The device seam: the ONLY module that touches `torch.cuda` (CUDA and ROCm alike).

Streams, events, pinned allocation, non-blocking copies, synchronize and memory stats behind one small `Backend`
interface, so offload strategies run unchanged on cuda, ROCm, cpu and the simulated accelerator used by tests.
It knows nothing about models or strategies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def leaf_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a quantized subclass's inner tensors (data, scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in leaf_tensors(getattr(tensor, name))]


def map_leaves(tensor: torch.Tensor, fn) -> torch.Tensor:
    """`fn` applied to every plain tensor inside `tensor`; a quantized subclass is rebuilt around the results."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return fn(tensor)
    names, ctx = tensor.__tensor_flatten__()
    inner = {name: map_leaves(getattr(tensor, name), fn) for name in names}
    return type(tensor).__tensor_unflatten__(inner, ctx, tensor.size(), tensor.stride())


@dataclass(frozen=True)
class MemoryStats:
    allocated_bytes: int
    reserved_bytes: int
    max_allocated_bytes: int
    max_reserved_bytes: int


class NullStream:
    """A stream on a device without asynchronous copies: everything is ordered already."""

    def wait_stream(self, other: object) -> None:
        return None

    def wait_event(self, event: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


class NullEvent:
    def record(self, stream: object | None = None) -> None:
        return None

    def wait(self, stream: object | None = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class Backend:
    """Interface every device backend implements. The CPU implementation is the reference semantics."""

    name = "cpu"
    device = torch.device("cpu")
    is_accelerator = False
    supports_streams = False

    # -- streams and events ----------------------------------------------------------------------------------
    def new_stream(self):
        return NullStream()

    def current_stream(self):
        return NullStream()

    @contextlib.contextmanager
    def use_stream(self, stream) -> Iterator[None]:
        yield

    def new_event(self):
        return NullEvent()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        """Tell the allocator `tensor` is used on `stream` (so it is not reused before that stream is done)."""
        return None

    def label(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Name `tensor`'s memory (a ring slot, a weight's host copy) for diagnostics; only the simulated device's
        race messages use it."""
        return tensor

    def synchronize(self) -> None:
        return None

    def clock_s(self) -> float:
        """Seconds on this device's clock once queued work is done (wall clock after a synchronize)."""
        self.synchronize()
        return time.perf_counter()

    def session(self) -> contextlib.AbstractContextManager:
        """Work inside is accounted as this device's (the simulated device counts it; real devices need nothing)."""
        return contextlib.nullcontext(self)

    def wait_on_host(self, event) -> None:
        """Block the calling host thread (a staging worker) until `event` has completed on its stream."""
        event.synchronize()

    def disk_read_cost(self, nbytes: int) -> None:
        """Account a file read of `nbytes` on the current stream (the simulated device's disk engine; no-op here)."""
        return None

    # -- memory placement ------------------------------------------------------------------------------------
    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` in page-locked memory (fast, asynchronous H2D). Plain contiguous on cpu."""
        return map_leaves(tensor, lambda t: t.detach().contiguous())

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        """Host -> device. On cpu the copy is a clone, so the result never aliases the host tensor."""
        return map_leaves(tensor, lambda t: t.detach().clone())

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        return dst.copy_(src)

    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return tensor.clone()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def stand_in(self, like: torch.Tensor, label: str) -> torch.Tensor:
        """What an offloaded weight's slot holds: one poisoned element broadcast to the shape (NaN for floats).

        It costs one element of device memory and turns any read into NaNs; the simulated device raises instead.
        """
        fill = float("nan") if like.dtype.is_floating_point else 0
        return torch.full((1,), fill, dtype=like.dtype, device=self.device).expand(like.shape)

    def place_module(self, module: torch.nn.Module) -> None:
        """Move what stays resident (LoRA, non-offloaded weights) to the device. Stand-ins already live there."""
        module.to(self.device)

    # -- random state (checkpoint recompute replays dropout exactly) -------------------------------------------
    def get_rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    # -- memory stats ----------------------------------------------------------------------------------------
    def memory_stats(self) -> MemoryStats:
        return MemoryStats(0, 0, 0, 0)

    def reset_peak_memory_stats(self) -> None:
        return None

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory; (0, 0) where there is no device memory."""
        return (0, 0)

    def empty_cache(self) -> None:
        return None

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        """Limit this process's device memory to `cap_bytes` (None: no limit). A process setting, not a device one."""
        return None


class CpuBackend(Backend):
    pass


class CudaBackend(Backend):
    """NVIDIA CUDA and AMD ROCm (HIP builds of torch report device type "cuda")."""

    name = "cuda"
    is_accelerator = True
    supports_streams = True

    def __init__(self, index: int = 0):
        self.device = torch.device("cuda", index)
        self.is_rocm = torch.version.hip is not None

    def new_stream(self):
        return torch.cuda.Stream(device=self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    @contextlib.contextmanager
    def use_stream(self, stream) -> Iterator[None]:
        with torch.cuda.stream(stream):
            yield

    def new_event(self):
        return torch.cuda.Event()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return map_leaves(tensor, lambda t: t.detach().to("cpu").contiguous().pin_memory())

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        return map_leaves(tensor, lambda t: t.to(self.device, non_blocking=non_blocking))

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        return dst.copy_(src, non_blocking=non_blocking)

    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if non_blocking:
            # A non-blocking D2H copy needs a pinned destination, or it silently becomes synchronous.
            return map_leaves(tensor, lambda t: _pinned_copy(t, non_blocking=True))
        return map_leaves(tensor, lambda t: t.to("cpu"))

    def get_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(
            allocated_bytes=torch.cuda.memory_allocated(self.device),
            reserved_bytes=torch.cuda.memory_reserved(self.device),
            max_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
            max_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
        )

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        # The caching allocator's per-process limit; the device itself (clocks, MIG, other processes) is untouched.
        total = torch.cuda.get_device_properties(self.device).total_memory
        fraction = 1.0 if cap_bytes is None else min(1.0, cap_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)


def _pinned_copy(t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=non_blocking)


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def enable_stream_sanitizer() -> tuple[type[BaseException], ...]:
    """Turn on PyTorch's CUDA stream sanitizer (what TORCH_CUDA_SANITIZER=1 does at import) for the rest of this
    process; returns the exception types it raises on a race. It checks every kernel's reads and writes against the
    streams' events like the simulated device does, but not frees: a missing record_stream shows only there.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA stream sanitizer needs a CUDA or ROCm device")
    from torch.cuda import _sanitizer

    if not _sanitizer.cuda_sanitizer.enabled:  # TORCH_CUDA_SANITIZER=1 may have enabled it at import already
        _sanitizer.enable_cuda_sanitizer()
    return (_sanitizer.CUDASanitizerErrors,)


def accelerator_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def accelerator_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index)


def accelerator_total_bytes(index: int = 0) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


def is_rocm() -> bool:
    return torch.version.hip is not None


_BACKENDS: dict[str, type[Backend]] = {"cpu": CpuBackend, "cuda": CudaBackend}
# Backends living in other modules, by name -> the module that registers it when imported (`register_backend`).
# Named, not imported: the seam knows where a plug-in lives, never what is in it, so `device_sim.py` (which builds on
# this module) is imported only when asked for, and the two never import each other.
_PLUGINS: dict[str, str] = {"sim": "lowvram.device_sim"}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Backends living elsewhere (the simulated accelerator) plug in here."""
    _BACKENDS[name] = cls


def get_backend(name: str = "auto", **kwargs) -> Backend:
    """`auto` picks cuda (ROCm included) when present, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in _BACKENDS and name in _PLUGINS:
        import importlib

        importlib.import_module(_PLUGINS[name])  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"unknown device backend '{name}'; valid: auto, {', '.join(sorted({*_BACKENDS, *_PLUGINS}))}")
    return _BACKENDS[name](**kwargs)
