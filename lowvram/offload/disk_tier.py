"""Block swap from pageable RAM or from a file on disk: a worker thread fills a small ring of pinned staging buffers
ahead of use, and each is copied to a device slot on the copy stream, overlapped with compute like block swap.

The disk tier's weights stay in a file (its own, written block by block into the cache folder, or a safetensors
checkpoint whose dtype is the training precision); reads drop the page cache behind them so the process does not
grow with the file. It refuses a file that changed under it and a folder without room. It never chooses which blocks
or tiers (the planner does) and never touches a GPU except through the device seam.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowvram.device import Backend, leaf_tensors
from lowvram.errors import LowvramError, UsageError
from lowvram.offload.block_swap import (
    BlockSwap,
    _assemble,
    _Entry,
    _in_backward,
    _layout,
    _SwappedBlock,
    _typed_view,
    choose_swapped_blocks,
    swappable_blocks,
)
from lowvram.offload.weights import frozen_parameters, refuse_unmovable, set_contents, stand_in_like

FILE_ALIGN_BYTES = 4096  # each block starts page aligned in the disk tier's own file
FREE_SPACE_MARGIN_BYTES = 64 * 2**20  # left free beside the file (filesystem metadata, other writers)
_FINGERPRINT_BYTES = 2**20  # the file's first and last MiB (plus its header) identify its contents cheaply


class DiskTierError(LowvramError):
    """The disk tier cannot read or write its weight file (changed under it, no room, unreadable)."""


# --------------------------------------------------------------------------------------------------------------------
# The weight file


@dataclass(frozen=True)
class FileIdentity:
    """What a weight file looked like when the disk tier adopted it: a later read refuses a different file."""

    size: int
    mtime_ns: int
    fingerprint: str

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = os.stat(path)
        digest = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            if st.st_size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
                digest.update(f.read(_FINGERPRINT_BYTES))
        _drop_cache(path)
        return cls(st.st_size, st.st_mtime_ns, digest.hexdigest()[:32])


def _changed(path: Path, what: str) -> DiskTierError:
    return DiskTierError(
        f"disk tier weight file {path} changed under the run ({what}): it was rewritten or replaced while training; "
        "restart the run so the file is rebuilt"
    )


def _drop_cache(path: Path, fd: int | None = None, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop the file's clean pages (they are file-backed, never anonymous, but they crowd RAM)."""
    if not hasattr(os, "posix_fadvise"):
        return  # Windows/macOS: no fadvise; the pages stay reclaimable page cache
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        if own and fd is not None:
            os.close(fd)


@dataclass
class WeightFile:
    """A file holding swapped blocks: per block, (file offset, bytes, offset in the block's flat buffer) extents.

    Reads use positional reads into the caller's buffer (no mmap: mapped pages would stay in the page cache and be
    charged to the process as it walks the file), then drop the pages read. O_DIRECT is not used: checkpoint tensors
    are not block aligned, and the drop keeps the page cache from growing just as well.
    """

    path: Path
    identity: FileIdentity
    extents: dict[int, list[tuple[int, int, int]]]
    _fd: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    read_bytes: int = 0

    @classmethod
    def open(cls, path: str | os.PathLike, extents, expected: FileIdentity | None = None) -> WeightFile:
        path = Path(path)
        if not path.is_file():
            raise DiskTierError(f"disk tier weight file {path} does not exist")
        identity = FileIdentity.of(path)
        if expected is not None and identity != expected:
            what = (
                "size"
                if identity.size != expected.size
                else "mtime"
                if identity.mtime_ns != expected.mtime_ns
                else "fingerprint"
            )
            raise _changed(path, what)
        for index, rows in extents.items():
            for offset, nbytes, _ in rows:
                if offset + nbytes > identity.size:
                    raise DiskTierError(f"disk tier weight file {path} is truncated (block {index} lies outside it)")
        return cls(path, identity, dict(extents))

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def block_bytes(self, index: int) -> int:
        return max((dst + n for _, n, dst in self.extents[index]), default=0)

    def read_block(self, index: int, out: torch.Tensor) -> None:
        """Fill the flat uint8 CPU tensor `out` with block `index`; refuses a file whose size or mtime changed."""
        with self._lock:
            fd = self._descriptor()
            st = os.fstat(fd)
            if st.st_size != self.identity.size:
                raise _changed(self.path, "size")
            if st.st_mtime_ns != self.identity.mtime_ns:
                raise _changed(self.path, "mtime")
            view = memoryview(out.numpy())
            for offset, nbytes, dst in self.extents[index]:
                done = 0
                while done < nbytes:
                    chunk = view[dst + done : dst + nbytes]
                    if hasattr(os, "preadv"):
                        got = os.preadv(fd, [chunk], offset + done)
                    else:  # Windows: no positional reads in os
                        os.lseek(fd, offset + done, os.SEEK_SET)
                        got = os.readv(fd, [chunk])
                    if got <= 0:
                        raise _changed(self.path, "size")
                    done += got
                _drop_cache(self.path, fd, offset, nbytes)
                self.read_bytes += nbytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_free_space(folder: Path, nbytes: int) -> None:
    """Refuse, before writing anything, a folder whose filesystem cannot hold `nbytes` more."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < nbytes + FREE_SPACE_MARGIN_BYTES:
        raise DiskTierError(
            f"disk tier needs {nbytes / 2**30:.2f} GiB in {folder} but its filesystem has {free / 2**30:.2f} GiB free: "
            "free some space or set memory.disk_tier_dir to a folder on a larger disk"
        )


class DiskTierWriter:
    """Writes the disk tier's own file, one block at a time: a valid .safetensors file with one uint8 tensor per
    block (page aligned), written to a temporary name and renamed when complete (nothing half-written survives)."""

    def __init__(self, path: Path, sizes: dict[int, int]):
        self.path = Path(path)
        self.sizes = dict(sizes)
        data_bytes = 0
        self.offsets: dict[int, int] = {}
        for index, nbytes in self.sizes.items():
            data_bytes = math.ceil(data_bytes / FILE_ALIGN_BYTES) * FILE_ALIGN_BYTES
            self.offsets[index] = data_bytes
            data_bytes += nbytes
        header = {
            f"block.{i}": {"dtype": "U8", "shape": [n], "data_offsets": [self.offsets[i], self.offsets[i] + n]}
            for i, n in self.sizes.items()
        }
        header["__metadata__"] = {"format": "lowvram-disk-tier", "version": "1"}
        raw = json.dumps(header).encode()
        self.data_start = math.ceil((8 + len(raw)) / FILE_ALIGN_BYTES) * FILE_ALIGN_BYTES
        raw += b" " * (self.data_start - 8 - len(raw))  # safetensors allows trailing spaces in the header
        check_free_space(self.path.parent, self.data_start + data_bytes)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._total = self.data_start + data_bytes

    def write_block(self, index: int, flat: torch.Tensor) -> None:
        if flat.numel() != self.sizes[index]:
            raise ValueError(f"block {index}: {flat.numel()} bytes, expected {self.sizes[index]}")
        self._f.seek(self.data_start + self.offsets[index])
        self._f.write(memoryview(flat.contiguous().numpy()))
        self._f.flush()
        _drop_cache(self._tmp, self._f.fileno())  # written pages are clean after the flush to disk

    def finish(self) -> tuple[Path, dict[int, list[tuple[int, int, int]]]]:
        self._f.truncate(self._total)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        extents = {i: [(self.data_start + self.offsets[i], n, 0)] for i, n in self.sizes.items()}
        return self.path, extents

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


def checkpoint_extents(
    path: str | os.PathLike, keys: dict[int, list[tuple[str, int, torch.dtype, tuple[int, ...]]]]
) -> dict[int, list[tuple[int, int, int]]]:
    """Extents of swapped blocks inside a safetensors checkpoint: `keys[block]` lists (tensor key, offset in the
    block's flat buffer, dtype, shape). Refuses a tensor that is missing or stored in another dtype or shape (the
    disk tier reads the checkpoint directly only when it holds the training precision)."""
    from lowvram.quant.source import _DTYPES, read_header

    header, data_start = read_header(Path(path))
    out: dict[int, list[tuple[int, int, int]]] = {}
    for index, rows in keys.items():
        out[index] = []
        for key, dst, dtype, shape in rows:
            info = header.get(key)
            if info is None:
                raise DiskTierError(f"{path} has no tensor {key}: wrong checkpoint or key mapping for the disk tier")
            if _DTYPES[info["dtype"]] != dtype or tuple(info["shape"]) != tuple(shape):
                raise DiskTierError(
                    f"{path}: {key} is {info['dtype']} {info['shape']}, the model trains it as {dtype} {list(shape)}: "
                    "the disk tier reads a checkpoint directly only in the training precision (use the quantized cache)"
                )
            begin, end = info["data_offsets"]
            out[index].append((data_start + begin, end - begin, dst))
    return out


class _AppendWriter:
    """The disk tier's file when block sizes are only known as blocks arrive (quantized while loading): raw page
    aligned blocks, written to a temporary name and renamed when complete; the extents are kept by the caller."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "wb")
        self._cursor = 0

    def append(self, flat: torch.Tensor) -> int:
        self._cursor = math.ceil(self._cursor / FILE_ALIGN_BYTES) * FILE_ALIGN_BYTES
        self._f.seek(self._cursor)
        self._f.write(memoryview(flat.contiguous().numpy()))
        self._f.flush()
        _drop_cache(self._tmp, self._f.fileno())
        offset, self._cursor = self._cursor, self._cursor + flat.numel()
        return offset

    def finish(self) -> Path:
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


@dataclass
class PrewrittenBlocks:
    """Blocks the loader already wrote to the disk tier's file (their parameters hold placeholders)."""

    path: Path
    extents: dict[int, list[tuple[int, int, int]]]
    nbytes: dict[int, int]
    layout: dict[int, list[tuple[int, list[int]]]] = field(default_factory=dict)  # per block: (param id, offsets)


class DiskTierLoader:
    """Writes blocks to the disk tier's file while the model loads (`progress` of quant/stream.py `load_quantized`):
    when the loader moves past a disk-tier block, its weights are flattened, appended to the file and replaced by
    placeholders, so host RAM holds one block of them at most. `apply_staged_block_swap(prewritten=...)` adopts them.
    """

    def __init__(
        self, model: nn.Module, folder: str | os.PathLike, blocks: Sequence[int], blocks_attr: str,
        name: str = "transformer",
    ):  # fmt: skip
        self.model = model
        self.blocks_attr = blocks_attr  # may be dotted (the text encoder's `model.language_model.layers`)
        self.pending = sorted(blocks)
        self.writer = _AppendWriter(disk_tier_path(folder, name))
        self.extents: dict[int, list[tuple[int, int, int]]] = {}
        self.nbytes: dict[int, int] = {}
        self.layout: dict[int, list[tuple[int, list[int]]]] = {}
        self._current: int | None = None

    def _block_of(self, name: str | None) -> int | None:
        prefix = f"{self.blocks_attr}."
        if name is None or not name.startswith(prefix):
            return None
        head = name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def progress(self, name: str | None) -> None:
        block = self._block_of(name)
        if self._current is not None and block != self._current:
            self._write(self._current)
        self._current = block if block in self.pending else None

    def _write(self, index: int) -> None:
        block = self.model.get_submodule(self.blocks_attr)[index]
        params = frozen_parameters(block, prefix=f"{self.blocks_attr}.{index}")
        leaves = [leaf_tensors(mod._parameters[name].detach()) for mod, name, _ in params]
        offsets, total = _layout(leaves)
        check_free_space(self.writer.path.parent, total * len(self.pending))
        flat = torch.empty(total, dtype=torch.uint8)
        for ls, offs in zip(leaves, offsets, strict=True):
            for leaf, off in zip(ls, offs, strict=True):
                _typed_view(flat, off, leaf.dtype, tuple(leaf.shape)).copy_(leaf.contiguous())
        start = self.writer.append(flat)
        del flat, leaves
        cpu = Backend()
        for mod, name, label in params:
            set_contents(mod._parameters[name], stand_in_like(cpu, mod._parameters[name].detach(), label))
        self.extents[index] = [(start, total, 0)]
        self.nbytes[index] = total
        self.layout[index] = [
            (id(mod._parameters[name]), offs) for (mod, name, _), offs in zip(params, offsets, strict=True)
        ]
        self.pending.remove(index)

    def finish(self) -> PrewrittenBlocks:
        if self._current is not None:
            self._write(self._current)
            self._current = None
        if self.pending:
            self.writer.abort()
            raise DiskTierError(f"the loader never reached disk tier blocks {self.pending}: wrong model or blocks_attr")
        return PrewrittenBlocks(self.writer.finish(), self.extents, self.nbytes, self.layout)

    def abort(self) -> None:
        self.writer.abort()


# --------------------------------------------------------------------------------------------------------------------
# The staged ring


class _PageableSource:
    """Masters in ordinary (pageable) host RAM: the worker copies them into pinned staging."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}

    def read_block(self, index: int, out: torch.Tensor) -> None:
        src = self.buffers[index]
        out.numpy()[: src.numel()] = src.numpy()  # numpy copy: outside torch dispatch, releases the GIL

    def block_bytes(self, index: int) -> int:
        return self.buffers[index].numel()


@dataclass
class _Staging:
    buffer: torch.Tensor  # flat pinned uint8
    index: int | None = None  # which block it holds or is being filled with
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    copied: object | None = None  # device event: its last host-to-device copy is done (it may be refilled)
    read_done: object | None = None  # simulated disk engine: the read is done (copies wait for it)


@dataclass
class StagedBlockSwap(BlockSwap):
    """Block swap whose masters are pinned (as BlockSwap), pageable, or in a disk tier file, per block.

    A pageable or disk block's bytes go master -> pinned staging buffer (worker thread) -> device slot (copy stream).
    Reads are requested ahead in the order the blocks were loaded in the previous step (forward then backward), so
    from the second step on the worker runs ahead of compute; a mismatch (another pass shape) just reads on demand.
    """

    sources: dict[int, object] = field(default_factory=dict)  # block -> _PageableSource | WeightFile (absent: pinned)
    staging: list[_Staging] = field(default_factory=list)
    _queue: queue.Queue | None = None
    _worker: threading.Thread | None = None
    _disk_stream: object | None = None
    _order: list[int] = field(default_factory=list)  # staged loads of the last full step, in order
    _recording: list[int] = field(default_factory=list)
    _pos: int = 0
    _next_staging: int = 0
    staged_reads: int = 0
    staged_misses: int = 0  # loads whose block had not been read ahead (the step waited for the read)
    # slot -> block whose prefetch found its read still in flight: the copy is issued in that block's pre-hook, so
    # the host thread never waits on a read while the block before it is being queued
    _deferred: dict[int, int] = field(default_factory=dict)
    deferred_copies: int = 0
    disk_file: WeightFile | None = None
    owns_disk_file: bool = False

    @property
    def host_bytes(self) -> int:
        pinned = sum(b.host.numel() for i, b in self._blocks.items() if i not in self.sources)
        pageable = sum(s.block_bytes(i) for i, s in self.sources.items() if isinstance(s, _PageableSource))
        return pinned + pageable + sum(s.buffer.numel() for s in self.staging)

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk_file.block_bytes(i) for i, s in self.sources.items() if s is self.disk_file)

    # -- the worker ------------------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="lowvram-staging", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            index, stage = job
            try:
                if stage.copied is not None:
                    self.backend.wait_on_host(stage.copied)  # its previous copy to the device has finished
                self.sources[index].read_block(index, stage.buffer)
            except BaseException as err:  # handed to the training thread, which raises it
                stage.error = err
            stage.ready.set()

    def _request(self, index: int) -> _Staging:
        """Start reading block `index` into the next staging buffer (waiting for that buffer's last read first)."""
        stage = self.staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % len(self.staging)
        if stage.index is not None:
            stage.ready.wait()  # a read still in flight into this buffer (a wasted read-ahead) must land first
        stage.index, stage.error = index, None
        stage.ready.clear()
        if self._disk_stream is not None and self.sources[index] is self.disk_file:
            backend = self.backend
            with backend.use_stream(self._disk_stream):
                if stage.copied is not None:
                    self._disk_stream.wait_event(stage.copied)
                backend.disk_read_cost(self.disk_file.block_bytes(index))
                stage.read_done = backend.new_event()
                stage.read_done.record(self._disk_stream)
        else:
            stage.read_done = None
        self.staged_reads += 1
        self._queue.put((index, stage))
        return stage

    def _upcoming(self) -> list[int]:
        n = len(self._order)
        return [self._order[(self._pos + i) % n] for i in range(min(len(self.staging), n))]

    def _read_ahead(self) -> None:
        if not self._order:
            return
        upcoming = self._upcoming()
        waiting = set(self._deferred.values())
        for stage in self.staging:  # a read-ahead the step did not follow: its buffer is free again
            if stage.index is not None and stage.index not in upcoming and stage.index not in waiting \
                    and stage.ready.is_set():  # fmt: skip
                stage.index = None
        pending = {s.index for s in self.staging if s.index is not None}
        for index in upcoming:
            if index in pending:
                continue
            # only into a buffer holding nothing still to be copied
            if self.staging[self._next_staging].index is not None:
                break
            self._request(index)
            pending.add(index)

    def _take(self, index: int) -> _Staging:
        stage = next((s for s in self.staging if s.index == index), None)
        if stage is None:
            self.staged_misses += 1
            stage = self._request(index)
        stage.ready.wait()
        if stage.error is not None:
            err, stage.error, stage.index = stage.error, None, None
            if isinstance(err, LowvramError):
                raise err
            raise DiskTierError(f"disk tier read of block {index} failed: {err}") from err
        return stage

    # -- BlockSwap's copy, through staging -------------------------------------------------------------------------
    def _load(self, index: int, exclude: int | None) -> int:
        if index not in self.sources:
            return super()._load(index, exclude)
        candidates = [s for s in range(len(self._slots)) if s != exclude] or list(range(len(self._slots)))
        slot = min(candidates, key=lambda s: self._slot_used[s])
        previous = self._slot_block[slot]
        if previous is not None:
            self._unbind(previous)
        self._recording.append(index)
        if self._order:  # follow the recorded order from where this block next appears in it
            n = len(self._order)
            ahead = next((k for k in range(n) if self._order[(self._pos + k) % n] == index), None)
            if ahead is not None:
                self._pos = (self._pos + ahead + 1) % n
        self._deferred.pop(slot, None)
        self._slot_block[slot] = index
        self._tick += 1
        self._slot_used[slot] = self._tick
        ready = next((s for s in self.staging if s.index == index and s.ready.is_set()), None)
        if exclude is not None and ready is None and any(s.index == index for s in self.staging):
            # a prefetch whose read is still in flight: copy it when the block is about to run
            self._deferred[slot] = index
            self._slot_ready[slot] = None
            self.deferred_copies += 1
            self._read_ahead()
            return slot
        self._copy_staged(index, slot)
        self._read_ahead()
        return slot

    def _copy_staged(self, index: int, slot: int) -> None:
        """Wait for block `index`'s read and copy it from its staging buffer into `slot` (on the copy stream)."""
        stage = self._take(index)
        backend = self.backend
        block = self._blocks[index]
        self.copied_bytes += block.nbytes
        if self._copy_stream is None:
            backend.copy_(self._slots[slot][: block.nbytes], stage.buffer[: block.nbytes])
            self._slot_ready[slot] = None
        else:
            with backend.use_stream(self._copy_stream):
                self._copy_stream.wait_event(self._slot_free[slot])
                if stage.read_done is not None:
                    self._copy_stream.wait_event(stage.read_done)
                backend.copy_(self._slots[slot][: block.nbytes], stage.buffer[: block.nbytes], non_blocking=True)
                event = backend.new_event()
                event.record(self._copy_stream)
            self._slot_ready[slot] = event
            stage.copied = event
        stage.index = None  # free for the next read once `copied` has completed

    def _before_block(self, index: int) -> None:
        slot = self._slot_of(index)
        if slot is not None and self._deferred.get(slot) == index:
            del self._deferred[slot]
            self._copy_staged(index, slot)
            self._read_ahead()
        super()._before_block(index)

    def _prefetch_first(self) -> None:
        if not _in_backward() and self._recording:
            # a new step: the previous one's staged loads are the order to read ahead in
            self._order, self._recording, self._pos = self._recording, [], 0
            self._read_ahead()
        super()._prefetch_first()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.close()
        for index, block in self._blocks.items():
            self._unbind(index)
            source = self.sources.get(index)
            host = block.host
            if source is not None:
                host = torch.empty(block.nbytes, dtype=torch.uint8)
                source.read_block(index, host)
            for entry in block.entries:
                views = iter(_typed_view(host, off, dt, shape) for off, dt, shape in entry.offsets)
                set_contents(
                    entry.module._parameters[entry.name], self.backend.to_device(_assemble(entry.template, views))
                )
        self._slots.clear()
        if self.disk_file is not None:
            self.disk_file.close()
            if self.owns_disk_file:
                self.disk_file.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the worker thread (reads in flight finish first)."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        self._worker = None


def disk_block_indices(num_blocks: int, blocks_to_swap: int, blocks_on_disk: int, placement: str = "spread"):
    """Which blocks live in the disk tier: `blocks_on_disk` of the swapped ones, spread among them."""
    swapped = choose_swapped_blocks(num_blocks, blocks_to_swap, placement)
    return tuple(swapped[i] for i in choose_swapped_blocks(len(swapped), blocks_on_disk, "spread"))


def disk_tier_path(folder: str | os.PathLike, name: str = "transformer") -> Path:
    return Path(folder) / f"disk-tier-{name}.safetensors"


def apply_staged_block_swap(
    transformer: nn.Module,
    backend: Backend,
    *,
    blocks_to_swap: int,
    blocks_on_disk: int = 0,
    tier: str = "pinned",
    disk_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: Callable[[str], str] = lambda label: label,
    expected_identity: FileIdentity | None = None,
    prewritten: PrewrittenBlocks | None = None,
    placement: str = "spread",
    ring_slots: int = 2,
    staging_slots: int = 2,
    blocks_attr: str = "transformer_blocks",
    inference: bool = False,
    file_name: str = "transformer",
) -> StagedBlockSwap:
    """Block swap with `blocks_on_disk` of the swapped blocks read from a file and the others' masters in `tier` RAM
    (pinned: as `apply_block_swap`; pageable: copied through the pinned staging ring).

    Disk blocks come from `checkpoint` (a safetensors file in the training precision, `checkpoint_key(label)` naming
    each weight; the module's swapped weights may then be on the meta device: they are never read) or, without one,
    are written block by block to a file in `disk_dir` and freed from RAM. Refusals (no checkpointing, a folder
    without room, a changed or mismatched file) are one line, raised before the module is changed.

    `inference`: a frozen module that only runs forward (the text encoder while captions are cached): no
    checkpointing is needed, since with no parameter requiring grad autograd keeps no reference to the weights, so
    each block's weights may leave the moment it has run. A block with a trainable parameter is refused.
    """
    if inference:
        blocks = getattr(transformer, blocks_attr, None)
        if not isinstance(blocks, nn.ModuleList):
            raise UsageError(f"{type(transformer).__name__} has no '{blocks_attr}' ModuleList to stream")
        if any(p.requires_grad for p in blocks.parameters()):
            raise UsageError(f"streaming '{blocks_attr}' for inference needs frozen weights: one requires grad")
    else:
        blocks = swappable_blocks(transformer, blocks_attr)
    if tier not in ("pinned", "pageable"):
        raise UsageError(f"memory.swap_tier '{tier}' is unknown: use 'pinned' or 'pageable'")
    if not 0 <= blocks_on_disk <= blocks_to_swap:
        raise UsageError(
            f"memory.blocks_on_disk={blocks_on_disk} must be between 0 and memory.blocks_to_swap={blocks_to_swap}"
        )
    if blocks_on_disk and checkpoint is None and disk_dir is None and prewritten is None:
        raise UsageError("memory.blocks_on_disk needs a folder for the disk tier's file: set memory.disk_tier_dir")
    if ring_slots < 2 or staging_slots < 2:
        raise UsageError("block swap needs at least 2 ring slots and 2 staging buffers (one in use, one loading)")
    refuse_unmovable(blocks, "block swap")
    swapped = choose_swapped_blocks(len(blocks), blocks_to_swap, placement)
    on_disk = disk_block_indices(len(blocks), blocks_to_swap, blocks_on_disk, placement)
    staged = set(on_disk) | (set(swapped) if tier == "pageable" else set())

    plans = {}
    for index in swapped:
        params = frozen_parameters(blocks[index], prefix=f"{blocks_attr}.{index}")
        leaves = [leaf_tensors(mod._parameters[name].detach()) for mod, name, _ in params]
        offsets, total = _layout(leaves)
        plans[index] = (params, leaves, offsets, total)

    disk_file = None
    writer = None
    if prewritten is not None:
        if set(prewritten.extents) != set(on_disk):
            raise DiskTierError(
                f"the loader wrote blocks {sorted(prewritten.extents)} to the disk tier, the plan puts "
                f"{sorted(on_disk)} there: load and apply with the same memory settings"
            )
        disk_file = WeightFile.open(prewritten.path, prewritten.extents)
    elif on_disk and checkpoint is not None:
        keys = {}
        for index in on_disk:
            params, leaves, offsets, _ = plans[index]
            rows = []
            for (_, _, label), ls, offs in zip(params, leaves, offsets, strict=True):
                if len(ls) != 1:
                    raise DiskTierError(
                        f"{label} is quantized: the disk tier reads only plain weights from a checkpoint"
                    )
                rows.append((checkpoint_key(label), offs[0], ls[0].dtype, tuple(ls[0].shape)))
            keys[index] = rows
        disk_file = WeightFile.open(checkpoint, checkpoint_extents(checkpoint, keys), expected_identity)
    elif on_disk:
        writer = DiskTierWriter(disk_tier_path(disk_dir, file_name), {i: plans[i][3] for i in on_disk})

    swap = StagedBlockSwap(backend=backend, blocks=blocks, swapped=swapped, ring_slots=min(ring_slots, len(swapped)))
    swap._copy_stream = backend.new_stream() if backend.supports_streams else None
    swap._disk_stream = backend.new_stream() if backend.supports_streams else None
    # inference: nothing is kept for backward, which is what checkpointing guarantees in training
    swap._root_checkpointing = (
        (lambda: True) if inference else (lambda: getattr(transformer, "is_gradient_checkpointing", False))
    )
    pageable = _PageableSource()
    try:
        for index in swapped:
            params, leaves_per, offsets, total = plans.pop(index)  # drop its references: the weights free as we go
            if prewritten is not None and index in on_disk:
                # the same Parameters at the same offsets, or the bytes would land in the wrong weights
                mine = [(id(mod._parameters[name]), offs) for (mod, name, _), offs in zip(params, offsets, strict=True)]
                if mine != prewritten.layout[index] or total != prewritten.nbytes[index]:
                    raise DiskTierError(
                        f"block {index}'s weights changed between loading and block swap (layout differs from the "
                        "disk tier file): apply block swap to the module the loader filled"
                    )
            if index in on_disk:
                host = torch.empty(total if writer is not None else 0, dtype=torch.uint8)
            elif index in staged:
                host = torch.empty(total, dtype=torch.uint8)  # pageable: ordinary RAM
            else:
                host = backend.empty_pinned((total,), torch.uint8)
            entries = []
            for (mod, name, label), leaves, offs in zip(params, leaves_per, offsets, strict=True):
                if host.numel():
                    for leaf, off in zip(leaves, offs, strict=True):
                        _typed_view(host, off, leaf.dtype, tuple(leaf.shape)).copy_(leaf.contiguous())
                param = mod._parameters[name]
                stand_in = stand_in_like(backend, param.detach(), label)
                if param.device.type == "meta":  # never loaded (read from the checkpoint): a real Parameter now
                    param = mod._parameters[name] = nn.Parameter(torch.empty(0, dtype=param.dtype), False)
                entries.append(
                    _Entry(
                        mod,
                        name,
                        label,
                        stand_in,
                        stand_in,
                        [(o, lf.dtype, tuple(lf.shape)) for lf, o in zip(leaves, offs, strict=True)],
                    )
                )
                set_contents(param, stand_in)
            if writer is not None and index in on_disk:
                writer.write_block(index, host)
                host = torch.empty(0, dtype=torch.uint8)  # the block now lives only in the file
            if index in staged and index not in on_disk:
                pageable.buffers[index] = host
                host = torch.empty(0, dtype=torch.uint8)
            swap._blocks[index] = _SwappedBlock(index=index, entries=entries, host=host, nbytes=total)
            del leaves_per
        if writer is not None:
            path, extents = writer.finish()
            disk_file = WeightFile.open(path, extents)
            swap.owns_disk_file = True
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    swap.disk_file = disk_file
    swap.owns_disk_file = swap.owns_disk_file or prewritten is not None
    for index in staged:
        swap.sources[index] = disk_file if index in on_disk else pageable
    staging_bytes = max((swap._blocks[i].nbytes for i in staged), default=0)
    for _ in range(staging_slots if staged else 0):
        swap.staging.append(_Staging(buffer=backend.empty_pinned((staging_bytes,), torch.uint8)))
    if staged:
        swap._start_worker()
    swap._arm(transformer)
    return swap


def swapped_block_keys(
    blocks: Sequence[nn.Module], indices: Sequence[int], blocks_attr: str = "transformer_blocks"
) -> list[str]:
    """The dotted labels of the frozen weights of `indices` (what a checkpoint must hold for the disk tier)."""
    return [label for i in indices for _, _, label in frozen_parameters(blocks[i], prefix=f"{blocks_attr}.{i}")]
