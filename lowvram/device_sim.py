"""The simulated accelerator: a device backend that runs on CPU but behaves like a separate GPU, for tests and tools.

Onloads are fresh copies charged to a byte budget, offloaded weights are poisoned stand-ins whose use raises, every
live storage not registered as host memory is device memory, and a copy engine is modelled on a simulated clock.
It does not model kernels' speed beyond matmul/attention FLOPs, nor fragmentation (allocated == reserved).

Stream races (on by default; `check_races=False` or LOWVRAM_SIM_RACES=0 turns them off) are checked the way
PyTorch's CUDA stream sanitizer checks them, with vector clocks: every op is a numbered launch on the current
stream, an event records its stream's clock, `wait_event`/`wait_stream` join clocks, and host synchronizes join
every stream. Every device and host storage remembers its last write (stream, launch) and its reads since; a read
not ordered after the last write, a write not ordered after earlier reads (or the last write) on other streams, and
the free of a storage another stream may still use without `record_stream` raise `StreamRaceError` at the operation.
What each op reads and writes comes from where it is already seen, so the check is sound and cheap: the dispatch
mode of `session()` sees every aten op (the op schema's `(a!)` arguments are its writes, every other tensor argument
a read, new outputs are written by it, view ops touch no data), and the seam's own copies (`to_device`, `copy_`,
`to_host`, `pin`) record their source read and destination written on the current stream -- or on the host, for a
copy (or op) touching host buffers only, which the host performs at once: host work is ordered before anything
enqueued after it, and after a stream's work only through a synchronize or a blocking copy. Ops and copies are
issued in program order, so a race is reported at the first op that could observe it. A free is checked when the
storage dies and reported at the next op (where its memory could be reused). Autograd's saved tensors are checked
too: a saved view of a buffer the seam refilled since (a weight ring recycled without checkpointing: OneTrainer
#1306) raises instead of giving plausible but wrong gradients. Names in messages (module, parameter, slot) are
looked up only when a race is reported; labels come from `Backend.label`.
It does not see work done in other threads (their ops bypass the dispatch mode), nor races on memory outside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lowvram.device import Backend, MemoryStats, leaf_tensors, map_leaves, register_backend


class UseAfterOffloadError(RuntimeError):
    """A computation read a weight that an offload strategy had moved to the host."""


class StreamRaceError(RuntimeError):
    """Two accesses to one storage on different streams with no happens-before edge between them.

    `kind`: read-after-write, write-after-read, write-after-write, use-after-free or stale-saved-tensor.
    """

    def __init__(self, message: str, *, kind: str, module: str, tensor: str, stream: str, other_stream: str,
                 op: str, other_op: str, phase: str):
        super().__init__(message)
        self.kind, self.module, self.tensor, self.phase = kind, module, tensor, phase
        self.stream, self.other_stream, self.op, self.other_op = stream, other_stream, op, other_op


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
    """A queue on the simulated clock. The compute stream's time is the backend's clock; a copy stream has its own.

    `vc` is its vector clock for race checking: for every other stream, the last launch it is ordered after.
    """

    def __init__(self, sim: SimBackend, is_compute: bool, name: str = "compute stream"):
        self._sim = sim
        self.is_compute = is_compute
        self.busy_until_s = 0.0
        self.name = name
        self.vc: dict[object, int] = {}
        self.last_seq = 0  # this stream's newest launch

    def __repr__(self) -> str:
        return f"<SimStream {self.name}>"

    def time_s(self) -> float:
        return self._sim._clock_s if self.is_compute else max(self.busy_until_s, 0.0)

    def _wait_until(self, t: float) -> None:
        if self.is_compute:
            if t > self._sim._clock_s:
                self._sim._stall_s += t - self._sim._clock_s
                self._sim._clock_s = t
        else:
            self.busy_until_s = max(self.busy_until_s, t)

    def _snapshot(self) -> dict[object, int]:
        snap = dict(self.vc)
        snap[self] = self.last_seq
        return snap

    def _join(self, snap: dict[object, int] | None) -> None:
        if not snap:
            return
        vc = self.vc
        for stream, seq in snap.items():
            if stream is not self and vc.get(stream, 0) < seq:
                vc[stream] = seq

    def wait_event(self, event: SimEvent) -> None:
        self._wait_until(event.time_s)
        self._join(event.vc)

    def wait_stream(self, other: SimStream) -> None:
        self._wait_until(other.time_s())
        self._join(other._snapshot())

    def synchronize(self) -> None:
        self._sim._host_wait(self.time_s())
        self._sim._host_sync(self._snapshot())


class _HostQueue:
    """The host as a pseudo-stream: its own copies happen at once, ordered before any later launch on any stream."""

    name = "host"

    def __init__(self) -> None:
        self.vc: dict[object, int] = {}
        self.last_seq = 0

    def __repr__(self) -> str:
        return "<host>"


class SimEvent:
    def __init__(self, sim: SimBackend):
        self._sim = sim
        self.time_s = 0.0
        self.vc: dict[object, int] | None = None  # the recording stream's clock; None: never recorded (waits pass)

    def record(self, stream: SimStream | None = None) -> None:
        stream = stream or self._sim._current
        self.time_s = stream.time_s()
        self.vc = stream._snapshot()

    def wait(self, stream: SimStream | None = None) -> None:
        (stream or self._sim._current).wait_event(self)

    def synchronize(self) -> None:
        self._sim._host_wait(self.time_s)
        self._sim._host_sync(self.vc)

    def query(self) -> bool:
        return self.time_s <= self._sim._clock_s


class _Record:
    """What the race checker remembers about one storage: who allocated it, its last write and its reads since."""

    __slots__ = ("alloc", "host", "w_stream", "w_seq", "w_op", "reads", "recorded", "label", "refills")

    def __init__(self, alloc, host: bool, w_stream=None, w_seq: int = 0, w_op=None):
        self.alloc = alloc  # stream current at allocation (the caching allocator's pool for the storage)
        self.host = host
        self.w_stream, self.w_seq, self.w_op = w_stream, w_seq, w_op
        self.reads: dict[object, tuple[int, object]] = {}  # stream -> (launch, op) of its latest read since the write
        self.recorded: set | None = None  # streams named by record_stream
        self.label: str | None = None
        self.refills = 0  # writes by the seam's copy_ into this existing storage (a ring slot's refills)


_WRITES: dict[object, tuple[frozenset[int], frozenset[str]]] = {}
_COPY = torch.ops.aten.copy_.default


def _written_arguments(func) -> tuple[frozenset[int], frozenset[str]]:
    """Positions and names of the arguments an op writes (`Tensor(a!)` in its schema); cached per op."""
    found = _WRITES.get(func)
    if found is None:
        positions, names = set(), set()
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                names.add(arg.name)
                if not arg.kwarg_only:
                    positions.add(i)
        found = _WRITES[func] = (frozenset(positions), frozenset(names))
    return found


def _races_default() -> bool:
    value = os.environ.get("LOWVRAM_SIM_RACES", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off"):
        raise ValueError(f"LOWVRAM_SIM_RACES={value!r} is not a switch: use 1 (check stream races) or 0 (don't)")
    return value in ("1", "true", "on")


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
    """Sees every op: refuses stand-in inputs, charges new output storages, advances the simulated clock, and (with
    race checking on) records what each op reads and writes on which stream."""

    def __init__(self, sim: SimBackend):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        if sim._paused:
            return func(*args, **kwargs)
        if sim.check_races:
            return self._checked(func, args, kwargs)
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

    def _checked(self, func, args, kwargs):
        sim = self.sim
        if sim._pending_race is not None:
            sim._raise_pending(func)
        if func.is_view:  # a view reads and writes no data
            out = func(*args, **kwargs)
            for t in _tensors(out):
                sim._charge(t)
            return out
        positions, names = _written_arguments(func)
        accesses: list = []
        gather = sim._gather
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                gather(arg, i in positions, func, accesses)
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, torch.Tensor):
                        gather(item, i in positions, func, accesses)
        for name, arg in kwargs.items():
            if isinstance(arg, torch.Tensor):
                gather(arg, name in names, func, accesses)
            elif isinstance(arg, (list, tuple)):
                for item in arg:
                    if isinstance(item, torch.Tensor):
                        gather(item, name in names, func, accesses)
        stream = sim._launch(accesses)
        for rec, is_write, leaf in accesses:
            if is_write:
                sim._write(rec, stream, func, leaf)
            else:
                sim._read(rec, stream, func, leaf)
        if func is _COPY and stream is not sim._hostq:
            if not (args[2] if len(args) > 2 else kwargs.get("non_blocking")):
                sim._blocking_copy(stream, accesses)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            sim._charge(t, writer=stream, op=func)
        if sim.tflops and sim._current.is_compute:
            flops = _flop_count(func, args, kwargs, out)
            if flops:
                sim._clock_s += flops / (sim.tflops * 1e12)
        return out


class SimBackend(Backend):
    """A pretend GPU with `budget_bytes` of memory (None: unlimited), `h2d_gbps` copies and `tflops` of matmul.

    Use `with sim.session():` around the work to account (ops outside a session are not seen, except the seam's own
    copies). `place_module` charges a module's resident tensors; `set_budget` may lower the budget mid-run.
    `check_races` (default: on, or LOWVRAM_SIM_RACES) raises `StreamRaceError` on unordered cross-stream accesses.
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
        check_races: bool | None = None,
        disk_gbps: float | None = None,
    ):
        self.budget_bytes = budget_bytes
        self.check_races = _races_default() if check_races is None else bool(check_races)
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
        self._streams.add(self._compute)
        self._current = self._compute
        self._paused = 0
        # race checking (see the module docstring)
        self._records: dict[int, _Record] = {}  # storage id -> accesses, for device and host storages alike
        self._seq = 0  # launches so far, on all streams
        self._hostq = _HostQueue()
        self._pending_race: StreamRaceError | None = None  # found when a storage died; raised at the next op
        self._module_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._roots: list[weakref.ref] = []

    # -- accounting ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[SimBackend]:
        """Account every op run inside (forward, backward, optimizer) as work on this device."""
        mode = _Tracking(self)
        if not self.check_races:
            with mode:
                yield self
            return
        with mode, torch.autograd.graph.saved_tensors_hooks(self._pack_saved, self._unpack_saved):
            yield self
        if self._pending_race is not None:
            self._raise_pending("the end of the session")

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

    def _charge(self, t: torch.Tensor, writer=None, op=None) -> None:
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
            if self.check_races:
                self._records[key] = _Record(self._current, False, writer, self._seq, op)
            weakref.finalize(storage, self._release_device, key)

    def _release_device(self, key: int, freed: bool = True) -> None:
        self._live -= self._device.pop(key, 0)
        rec = self._records.pop(key, None) if self._records else None
        if rec is None or rec.host or not freed or self._pending_race is not None:
            return
        # The caching allocator hands a freed block to the next allocation on its stream at once: every other
        # stream's use must be ordered before that stream's next launch, or be announced by record_stream.
        alloc, host = rec.alloc, self._hostq
        uses = [(rec.w_stream, rec.w_seq, rec.w_op)] if rec.w_stream is not None else []
        uses += [(stream, seq, op) for stream, (seq, op) in rec.reads.items()]
        for stream, seq, op in uses:
            if stream is alloc or stream is host or (rec.recorded and stream in rec.recorded):
                continue
            if alloc.vc.get(stream, 0) < seq:
                self._pending_race = self._race_error(
                    "use-after-free",
                    rec,
                    None,
                    alloc,
                    "free",
                    stream,
                    op,
                    advice=f"call record_stream(tensor, {stream.name}) where {stream.name} uses it, or keep it "
                    f"alive until {alloc.name} waits for {stream.name}",
                )
                return

    def _register_host(self, t: torch.Tensor, writer=None, op=None) -> torch.Tensor:
        for leaf in leaf_tensors(t):
            storage = leaf.untyped_storage()
            key = storage._cdata
            if key in self._host:
                continue
            if key in self._device:  # moved by ownership, e.g. a device tensor declared host: stop charging it
                self._release_device(key, freed=False)
            nbytes = storage.nbytes()
            self._host[key] = nbytes
            self._host_live += nbytes
            if self.check_races:
                self._records[key] = _Record(None, True, writer, self._seq, op)
            weakref.finalize(storage, self._release_host, key)
        return t

    def _release_host(self, key: int) -> None:
        self._host_live -= self._host.pop(key, 0)
        if self._records:
            rec = self._records.get(key)
            if rec is not None and rec.host:
                del self._records[key]

    # -- race checking ---------------------------------------------------------------------------------------------
    def _gather(self, t: torch.Tensor, is_write: bool, func, accesses: list) -> None:
        """Refuse a stand-in input; note (record, write?, leaf) for every tracked storage `t` holds."""
        leaves = (t,) if type(t) is torch.Tensor or type(t) is torch.nn.Parameter else leaf_tensors(t)
        for leaf in leaves:
            key = leaf.untyped_storage()._cdata
            if key in self._standins:
                raise UseAfterOffloadError(
                    f"{func} read offloaded weight '{self._standins[key]}' (it lives on the host now)"
                )
            rec = self._records.get(key)
            if rec is not None:
                accesses.append((rec, is_write, leaf))

    def _launch(self, accesses: list, stream=None):
        """Number one launch; returns who performs it: `stream`, the host (an op on host buffers only), or the
        current stream."""
        if stream is None:
            stream = self._current
            if accesses:
                for rec, _, _ in accesses:
                    if not rec.host:
                        break
                else:
                    stream = self._hostq
        self._seq += 1
        stream.last_seq = self._seq
        return stream

    def _read(self, rec: _Record, stream, op, leaf) -> None:
        writer = rec.w_stream
        if writer is not None and writer is not stream and writer is not self._hostq:
            if stream.vc.get(writer, 0) < rec.w_seq:
                raise self._race_error("read-after-write", rec, leaf, stream, op, writer, rec.w_op)
        if stream is not self._hostq:  # host work is ordered before every later launch anyway
            rec.reads[stream] = (self._seq, op)

    def _write(self, rec: _Record, stream, op, leaf) -> None:
        writer = rec.w_stream
        vc = stream.vc
        for reader, (seq, read_op) in rec.reads.items():
            if reader is not stream and vc.get(reader, 0) < seq:
                raise self._race_error("write-after-read", rec, leaf, stream, op, reader, read_op)
        if writer is not None and writer is not stream and writer is not self._hostq:
            if vc.get(writer, 0) < rec.w_seq:
                raise self._race_error("write-after-write", rec, leaf, stream, op, writer, rec.w_op)
        rec.w_stream, rec.w_seq, rec.w_op = stream, self._seq, op
        if rec.reads:
            rec.reads = {}

    def _seam_copy(self, op: str, reads, writes, stream=None):
        """Record a seam copy: `reads` and `writes` (tensors already tracked) on `stream` (default: the current one,
        or the host when every buffer is host memory). Returns who performed it."""
        if self._pending_race is not None:
            self._raise_pending(op)
        accesses: list = []
        for t in reads:
            self._gather(t, False, op, accesses)
        for t in writes:
            self._gather(t, True, op, accesses)
        if stream is None:
            on_device = any(_storage_id(leaf) in self._device for t in (*reads, *writes) for leaf in leaf_tensors(t))
            stream = self._current if on_device else self._hostq
        self._launch([], stream)
        for rec, is_write, leaf in accesses:
            if is_write:
                self._write(rec, stream, op, leaf)
            else:
                self._read(rec, stream, op, leaf)
        return stream

    def _blocking_copy(self, stream, accesses: list) -> None:
        """A blocking copy between host and device memory returns once its stream has done it: the host waits."""
        if any(rec.host for rec, _, _ in accesses):
            self._host_sync(stream._snapshot())

    def _host_sync(self, snap: dict | None) -> None:
        """The host waited for `snap` (a stream's or event's clock): so does everything any stream launches next."""
        if not self.check_races or not snap:
            return
        host = self._hostq
        for stream, seq in snap.items():
            if host.vc.get(stream, 0) < seq:
                host.vc[stream] = seq
        for stream in list(self._streams):
            stream._join(host.vc)

    def _raise_pending(self, where) -> None:
        error, self._pending_race = self._pending_race, None
        raise StreamRaceError(
            f"{error} (seen at {where})",
            kind=error.kind,
            module=error.module,
            tensor=error.tensor,
            stream=error.stream,
            other_stream=error.other_stream,
            op=error.op,
            other_op=error.other_op,
            phase=error.phase,
        )

    def _pack_saved(self, t):
        """Autograd saves `t`: remember its version (hooks turn autograd's own check off) and, for a buffer the seam
        refills (a ring slot), how many refills it has seen."""
        if not isinstance(t, torch.Tensor):
            return t
        refills = None
        if self._records:
            for leaf in (t,) if type(t) is torch.Tensor or type(t) is torch.nn.Parameter else leaf_tensors(t):
                rec = self._records.get(leaf.untyped_storage()._cdata)
                if rec is not None and rec.refills:
                    refills = (refills or []) + [(rec, rec.refills, leaf)]
        # A saved output holding itself (with its grad_fn) would be a reference cycle, freed only at exit (measured),
        # so tensors with a grad_fn are kept detached. Leaves and frozen tensors are kept as they are: a `.data` swap
        # after saving (diffusers #12610) must still reach backward, where the stand-in check catches it.
        saved = t if t.grad_fn is None else t.detach()
        if refills is None:
            return (saved, t._version, None, None, None)
        return (saved, t._version, refills, self._phase()[0], self._module_at_frame())

    def _unpack_saved(self, packed):
        if not isinstance(packed, tuple):
            return packed
        t, version, refills, phase, module = packed
        for rec, seen, leaf in refills or ():
            if rec.refills != seen:
                writer = rec.w_stream.name if rec.w_stream is not None else "?"
                name = self._tensor_name(rec, leaf)
                message = (
                    f"stream race (stale-saved-tensor) in backward: autograd saved a view of {name} in {phase} of "
                    f"module '{module}', and {rec.w_op} on {writer} refilled that buffer since ({rec.refills - seen} "
                    "time(s)): backward would read another block's bytes (plausible but wrong gradients, OneTrainer "
                    "#1306). A ring that recycles weight buffers needs gradient checkpointing."
                )
                raise StreamRaceError(
                    message,
                    kind="stale-saved-tensor",
                    module=module,
                    tensor=name,
                    stream="compute stream",
                    other_stream=writer,
                    op="backward",
                    other_op=str(rec.w_op),
                    phase="backward",
                )
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"{type(t).__name__} {list(t.shape)} is at version {t._version}; expected version {version} instead"
            )
        return t

    # -- naming, only when a race is reported ----------------------------------------------------------------------
    def _phase(self) -> tuple[str, str | None]:
        graph_task = getattr(torch._C, "_current_graph_task_id", None)
        if graph_task is None or graph_task() == -1:
            return "forward", None
        node = torch._C._current_autograd_node() if hasattr(torch._C, "_current_autograd_node") else None
        return "backward", None if node is None else node.name()

    def _module_at_frame(self) -> str:
        frame = sys._getframe(1)
        while frame is not None:
            obj = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if isinstance(obj, torch.nn.Module):
                return self._module_names.get(obj) or type(obj).__name__
            frame = frame.f_back
        return "(no module)"

    def _tensor_name(self, rec: _Record, leaf: torch.Tensor | None) -> str:
        if rec.label:
            return f"'{rec.label}'"
        key = leaf.untyped_storage()._cdata if leaf is not None else None
        if key is not None:
            for ref in self._roots:
                root = ref()
                if root is None:
                    continue
                for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]:
                    if any(_storage_id(x) == key for x in leaf_tensors(tensor.detach())):
                        return f"'{name}'"
        where = "host" if rec.host else "device"
        shape = f" {list(leaf.shape)} {leaf.dtype}" if leaf is not None else ""
        return f"an unnamed {where} tensor{shape}"

    def _race_error(self, kind, rec, leaf, stream, op, other, other_op, advice=None) -> StreamRaceError:
        phase, node = self._phase()
        module = self._module_at_frame()
        if phase == "backward" and module != "(no module)":
            phase = "backward (checkpoint recompute)"
        elif phase == "backward" and node:
            phase = f"backward ({node})"
        name = self._tensor_name(rec, leaf)
        verb = {"read-after-write": "reads", "use-after-free": "frees"}.get(kind, "writes")
        other_verb = "wrote" if kind in ("read-after-write", "write-after-write") else "used"
        if kind == "write-after-read":
            other_verb = "read"
        advice = advice or (
            f"make {stream.name} wait for {other.name} (an event recorded after that access, then wait_event)"
        )
        message = (
            f"stream race ({kind}) in {phase} of module '{module}': {op} on {stream.name} {verb} {name}, which "
            f"{other_op} on {other.name} {other_verb} with no happens-before edge between them: {advice}"
        )
        return StreamRaceError(
            message,
            kind=kind,
            module=module,
            tensor=name,
            stream=stream.name,
            other_stream=other.name,
            op=str(op),
            other_op=str(other_op),
            phase=phase,
        )

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
        caller = sys._getframe(1)
        owner = caller.f_locals.get("self") if "self" in caller.f_code.co_varnames else None
        made_by = type(owner).__name__ if owner is not None else caller.f_code.co_name
        stream = SimStream(self, is_compute=False, name=f"side stream {len(self._streams)} ({made_by})")
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
        # The clock: streams are joined through events. The race model: the host now waits for every stream.
        for stream in list(self._streams):
            self._host_sync(stream._snapshot())

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        for leaf in leaf_tensors(tensor):
            rec = self._records.get(_storage_id(leaf))
            if rec is not None:
                rec.recorded = (rec.recorded or set()) | {stream}

    def label(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        for leaf in leaf_tensors(tensor):
            rec = self._records.get(_storage_id(leaf))
            if rec is not None:
                rec.label = name
        return tensor

    def clock_s(self) -> float:
        """The simulated compute clock (matmul/attention FLOPs at `tflops`, copies at `h2d_gbps`, stalls)."""
        return self._clock_s

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        self.set_budget(cap_bytes)

    def wait_on_host(self, event) -> None:
        return None  # simulated copies finish when issued (the clock models their duration through events)

    def disk_read_cost(self, nbytes: int) -> None:
        if self.disk_gbps:
            self._copy_cost(nbytes, self.disk_gbps)

    # -- memory placement ------------------------------------------------------------------------------------
    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        writer = None
        if self.check_races:  # a synchronous copy: the host reads the source once the current stream is done
            self._host_sync(self._current._snapshot())
            writer = self._seam_copy("pin", [tensor], [], self._hostq)
        with self._untracked():
            host = map_leaves(tensor, lambda t: t.detach().contiguous().clone())
        return self._register_host(host, writer, "pin")

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        with self._untracked():
            host = torch.empty(shape, dtype=dtype)
        return self._register_host(host)

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
        op = "to_device (host to device copy)"
        writer = self._seam_copy(op, [tensor], [], self._current) if self.check_races else None
        if writer is not None and not non_blocking:
            self._host_sync(writer._snapshot())
        with self._untracked():
            out = map_leaves(tensor, lambda t: t.detach().clone())
        nbytes = sum(leaf.untyped_storage().nbytes() for leaf in leaf_tensors(out))
        self._charge(out, writer, op)
        if self.check_races:
            source = self._records.get(_storage_id(leaf_tensors(tensor)[0]))
            if source is not None and source.label:
                self.label(out, source.label)
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
        if self.check_races:
            stream = self._seam_copy("copy_", [src], [dst])
            if not non_blocking and stream is not self._hostq:
                self._host_sync(stream._snapshot())
            for leaf in leaf_tensors(dst):
                rec = self._records.get(_storage_id(leaf))
                if rec is not None:
                    rec.refills += 1
        with self._untracked():
            return dst.copy_(src)

    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        op = "to_host (device to host copy)"
        writer = self._seam_copy(op, [tensor], [], self._current) if self.check_races else None
        with self._untracked():
            out = map_leaves(tensor, lambda t: t.detach().clone())
        self._d2h += sum(leaf.untyped_storage().nbytes() for leaf in leaf_tensors(out))
        self._register_host(out, writer, op)
        if writer is not None and not non_blocking:  # a blocking copy returns once the stream has done it
            self._host_sync(self._current._snapshot())
        return out

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
        if self.check_races:  # names for race messages: modules by object, tensors looked up only on a race
            for name, sub in module.named_modules():
                self._module_names.setdefault(sub, name or type(sub).__name__)
            self._roots.append(weakref.ref(module))

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
