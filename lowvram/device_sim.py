"""The simulated accelerator: a device backend that runs on CPU but behaves like a separate GPU, for tests and tools.

Onloads are fresh copies charged to a byte budget, offloaded weights are poisoned stand-ins whose use raises, every
live storage not registered as host memory is device memory, and a copy engine is modelled on a simulated clock.
It does not model kernels' speed beyond matmul/attention FLOPs, nor fragmentation (allocated == reserved).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lowvram.device import Backend, MemoryStats, leaf_tensors, map_leaves, register_backend


class UseAfterOffloadError(RuntimeError):
    """A computation read a weight that an offload strategy had moved to the host."""


@dataclass(frozen=True)
class SimStats:
    live_bytes: int  # device bytes alive now
    peak_bytes: int  # device high-water mark since the last reset
    h2d_bytes: int  # host -> device bytes copied since the last reset
    d2h_bytes: int  # device -> host bytes copied since the last reset
    host_bytes: int  # registered host (pinned) bytes alive now
    compute_s: float  # simulated clock: matmul/attention FLOPs at the configured rate, plus stalls
    stall_s: float  # simulated time compute waited for host -> device copies


class SimStream:
    """A queue on the simulated clock. The compute stream's time is the backend's clock; a copy stream has its own."""

    def __init__(self, sim: SimBackend, is_compute: bool):
        self._sim = sim
        self.is_compute = is_compute
        self.busy_until_s = 0.0

    def time_s(self) -> float:
        return self._sim._clock_s if self.is_compute else max(self.busy_until_s, 0.0)

    def _wait_until(self, t: float) -> None:
        if self.is_compute:
            if t > self._sim._clock_s:
                self._sim._stall_s += t - self._sim._clock_s
                self._sim._clock_s = t
        else:
            self.busy_until_s = max(self.busy_until_s, t)

    def wait_event(self, event: SimEvent) -> None:
        self._wait_until(event.time_s)

    def wait_stream(self, other: SimStream) -> None:
        self._wait_until(other.time_s())

    def synchronize(self) -> None:
        self._sim._host_wait(self.time_s())


class SimEvent:
    def __init__(self, sim: SimBackend):
        self._sim = sim
        self.time_s = 0.0

    def record(self, stream: SimStream | None = None) -> None:
        self.time_s = (stream or self._sim._current).time_s()

    def wait(self, stream: SimStream | None = None) -> None:
        (stream or self._sim._current).wait_event(self)

    def synchronize(self) -> None:
        self._sim._host_wait(self.time_s)

    def query(self) -> bool:
        return self.time_s <= self._sim._clock_s


def _tensors(obj):
    """Tensors in an op's arguments or results (they nest at most a list deep), without pytree's cost."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from (t for t in item if isinstance(t, torch.Tensor))


def _flop_count(func, args, kwargs, out) -> int:
    fn = flop_registry.get(func) or flop_registry.get(func.overloadpacket)
    if fn is None:
        return 0
    try:
        return int(fn(*args, **kwargs, out_val=out))
    except Exception:  # a formula that cannot read these arguments costs nothing on the simulated clock
        return 0


class _Tracking(TorchDispatchMode):
    """Sees every op: refuses stand-in inputs, charges new output storages, advances the simulated clock."""

    def __init__(self, sim: SimBackend):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        if sim._paused:
            return func(*args, **kwargs)
        # Checked even with no stand-ins registered, so every run pays the same instrumentation (fair timings).
        if not func.is_view:
            for t in _tensors(args):
                sim._check_not_stand_in(t, func)
            for t in _tensors(tuple(kwargs.values())):
                sim._check_not_stand_in(t, func)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            sim._charge(t)
        if sim.tflops and sim._current.is_compute:
            flops = _flop_count(func, args, kwargs, out)
            if flops:
                sim._clock_s += flops / (sim.tflops * 1e12)
        return out


class SimBackend(Backend):
    """A pretend GPU with `budget_bytes` of memory (None: unlimited), `h2d_gbps` copies and `tflops` of matmul.

    Use `with sim.session():` around the work to account (ops outside a session are not seen, except the seam's own
    copies). `place_module` charges a module's resident tensors; `set_budget` may lower the budget mid-run.
    """

    name = "sim"
    device = torch.device("cpu")
    is_accelerator = True
    supports_streams = True

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        h2d_gbps: float = 24.0,
        tflops: float = 165.0,
        disk_gbps: float | None = None,
    ):
        self.budget_bytes = budget_bytes
        self.h2d_gbps = h2d_gbps
        # The disk is one more copy engine: reads issued on a stream of their own (offload/disk_tier.py) occupy it at
        # this rate, and the host-to-device copies that follow wait for them through events. None: reads are free.
        self.disk_gbps = disk_gbps
        self.tflops = tflops
        self._device: dict[int, int] = {}  # storage id -> bytes
        self._host: dict[int, int] = {}
        self._standins: dict[int, str] = {}  # storage id -> label of the offloaded weight
        self._standin_refs: list[torch.Tensor] = []
        self._live = 0
        self._peak = 0
        self._h2d = 0
        self._d2h = 0
        self._host_live = 0
        self._clock_s = 0.0
        self._stall_s = 0.0
        self._clock_origin_s = 0.0  # reset_counters moves the origin, never the clock: recorded events stay valid
        self._stall_origin_s = 0.0
        self._streams: weakref.WeakSet[SimStream] = weakref.WeakSet()
        self._compute = SimStream(self, is_compute=True)
        self._current = self._compute
        self._mode: _Tracking | None = None
        self._paused = 0

    # -- accounting ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[SimBackend]:
        """Account every op run inside (forward, backward, optimizer) as work on this device."""
        mode = _Tracking(self)
        with mode:
            yield self

    @contextlib.contextmanager
    def _untracked(self) -> Iterator[None]:
        """Run the seam's own host-side work without the dispatch mode accounting it (the seam accounts it)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _check_not_stand_in(self, t: torch.Tensor, func) -> None:
        for leaf in leaf_tensors(t):
            label = self._standins.get(_storage_id(leaf))
            if label is not None:
                raise UseAfterOffloadError(f"{func} read offloaded weight '{label}' (it lives on the host now)")

    def _charge(self, t: torch.Tensor) -> None:
        for leaf in leaf_tensors(t):
            if leaf.device.type != "cpu":
                continue
            storage = leaf.untyped_storage()
            key = storage._cdata
            if key in self._device or key in self._host or key in self._standins:
                continue
            nbytes = storage.nbytes()
            if nbytes == 0:
                continue
            if self.budget_bytes is not None and self._live + nbytes > self.budget_bytes:
                raise torch.OutOfMemoryError(
                    f"simulated device out of memory: tried to allocate {nbytes} bytes with {self._live} of "
                    f"{self.budget_bytes} in use"
                )
            self._device[key] = nbytes
            self._live += nbytes
            self._peak = max(self._peak, self._live)
            weakref.finalize(storage, self._release_device, key)

    def _release_device(self, key: int) -> None:
        self._live -= self._device.pop(key, 0)

    def _register_host(self, t: torch.Tensor) -> torch.Tensor:
        for leaf in leaf_tensors(t):
            storage = leaf.untyped_storage()
            key = storage._cdata
            if key in self._host:
                continue
            if key in self._device:  # moved by ownership, e.g. a device tensor declared host: stop charging it
                self._release_device(key)
            nbytes = storage.nbytes()
            self._host[key] = nbytes
            self._host_live += nbytes
            weakref.finalize(storage, self._release_host, key)
        return t

    def _release_host(self, key: int) -> None:
        self._host_live -= self._host.pop(key, 0)

    def _host_wait(self, t: float) -> None:
        self._compute._wait_until(t)

    def _copy_cost(self, nbytes: int, gbps: float | None = None) -> None:
        gbps = self.h2d_gbps if gbps is None else gbps
        seconds = nbytes / (gbps * 1e9) if gbps else 0.0
        if self._current.is_compute:
            self._stall_s += seconds
            self._clock_s += seconds
        else:
            start = max(self._current.busy_until_s, self._clock_s)
            self._current.busy_until_s = start + seconds

    def stats(self) -> SimStats:
        return SimStats(
            live_bytes=self._live,
            peak_bytes=self._peak,
            h2d_bytes=self._h2d,
            d2h_bytes=self._d2h,
            host_bytes=self._host_live,
            compute_s=self._clock_s - self._clock_origin_s,
            stall_s=self._stall_s - self._stall_origin_s,
        )

    def reset_counters(self) -> None:
        """Peak back to the live bytes; copied bytes and the simulated clock's readings back to zero."""
        self._peak = self._live
        self._h2d = self._d2h = 0
        self._clock_origin_s = self._clock_s
        self._stall_origin_s = self._stall_s

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the device size mid-run (tests of OOM recovery lower it between steps)."""
        self.budget_bytes = budget_bytes

    def is_device_tensor(self, t: torch.Tensor) -> bool:
        return all(_storage_id(leaf) in self._device for leaf in leaf_tensors(t))

    def is_host_tensor(self, t: torch.Tensor) -> bool:
        return all(_storage_id(leaf) in self._host for leaf in leaf_tensors(t))

    # -- streams and events ----------------------------------------------------------------------------------
    def new_stream(self) -> SimStream:
        stream = SimStream(self, is_compute=False)
        self._streams.add(stream)
        return stream

    def current_stream(self) -> SimStream:
        return self._current

    @contextlib.contextmanager
    def use_stream(self, stream: SimStream) -> Iterator[None]:
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def new_event(self) -> SimEvent:
        return SimEvent(self)

    def synchronize(self) -> None:
        return None  # streams are joined through events; the host never races the simulated copy engine

    def wait_on_host(self, event) -> None:
        return None  # simulated copies finish when issued (the clock models their duration through events)

    def disk_read_cost(self, nbytes: int) -> None:
        if self.disk_gbps:
            self._copy_cost(nbytes, self.disk_gbps)

    # -- memory placement ------------------------------------------------------------------------------------
    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._untracked():
            host = map_leaves(tensor, lambda t: t.detach().contiguous().clone())
        return self._register_host(host)

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        with self._untracked():
            host = torch.empty(shape, dtype=dtype)
        return self._register_host(host)

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        with self._untracked():
            out = map_leaves(tensor, lambda t: t.detach().clone())
        nbytes = sum(leaf.untyped_storage().nbytes() for leaf in leaf_tensors(out))
        self._charge(out)
        self._h2d += nbytes
        self._copy_cost(nbytes)
        return out

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        nbytes = src.numel() * src.element_size()
        if self.is_host_tensor(src) and not self.is_host_tensor(dst):
            self._h2d += nbytes
            self._copy_cost(nbytes)
        elif self.is_host_tensor(dst) and not self.is_host_tensor(src):
            self._d2h += nbytes
        with self._untracked():
            return dst.copy_(src)

    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        with self._untracked():
            out = map_leaves(tensor, lambda t: t.detach().clone())
        self._d2h += sum(leaf.untyped_storage().nbytes() for leaf in leaf_tensors(out))
        return self._register_host(out)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        with self._untracked():
            out = torch.empty(shape, dtype=dtype)
        self._charge(out)
        return out

    def stand_in(self, like: torch.Tensor, label: str) -> torch.Tensor:
        with self._untracked():
            out = super().stand_in(like, label)
        self._standins[_storage_id(out)] = label
        self._standin_refs.append(out)  # keeps the storage (and so its id) alive and unique
        return out

    def place_module(self, module: torch.nn.Module) -> None:
        """Charge the module's resident tensors (stand-ins and registered host tensors stay free)."""
        for t in [*module.parameters(), *module.buffers()]:
            self._charge(t)

    # -- memory stats ----------------------------------------------------------------------------------------
    def memory_stats(self) -> MemoryStats:
        return MemoryStats(self._live, self._live, self._peak, self._peak)

    def reset_peak_memory_stats(self) -> None:
        self._peak = self._live

    def mem_get_info(self) -> tuple[int, int]:
        if self.budget_bytes is None:
            return (0, 0)
        return (max(0, self.budget_bytes - self._live), self.budget_bytes)


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


register_backend("sim", SimBackend)
