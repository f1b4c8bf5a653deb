"""Block swap (musubi-style H2D-only ring): the frozen weights of N transformer blocks live on the host and are
copied into a small ring of device slots just before each block runs.

Each swapped block owns one flat pinned host buffer; a slot is one flat device buffer of the largest block's size;
block i+1 is prefetched on a side stream while block i computes, gated by events; backward (checkpoint recompute)
walks the ring in reverse. Frozen weights are never copied back. It needs gradient checkpointing in training and
leaves trainable (LoRA) parameters resident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowvram.device import Backend, leaf_tensors, map_leaves
from lowvram.errors import UsageError
from lowvram.offload.weights import frozen_parameters, is_plain, refuse_unmovable, set_contents, stand_in_like

_ALIGN_BYTES = 64  # every tensor in a flat buffer starts 64-byte aligned, so its typed view is legal and fast


def _in_backward() -> bool:
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


def choose_swapped_blocks(num_blocks: int, blocks_to_swap: int, placement: str = "spread") -> tuple[int, ...]:
    """Which blocks live on the host. `spread`: evenly through the stack; `last`: the final N (musubi's choice).

    Spread wins when a block's copy takes longer than its compute: every swapped block then has resident blocks'
    compute to hide behind (tools/bench_offload.py measures both on the simulated clock).
    """
    if not 0 <= blocks_to_swap <= num_blocks:
        raise UsageError(
            f"blocks_to_swap={blocks_to_swap} but the transformer has {num_blocks} blocks: use 0..{num_blocks}"
        )
    if placement == "last":
        return tuple(range(num_blocks - blocks_to_swap, num_blocks))
    if placement != "spread":
        raise UsageError(f"block swap placement '{placement}' is unknown: use 'spread' or 'last'")
    if blocks_to_swap == 0:
        return ()
    # Bresenham-style: block i is swapped when floor((i+1)*N/L) steps up; ends with the last block swapped.
    return tuple(
        i for i in range(num_blocks) if (i + 1) * blocks_to_swap // num_blocks > i * blocks_to_swap // num_blocks
    )


@dataclass
class _Entry:
    module: nn.Module
    name: str
    label: str
    stand_in: torch.Tensor
    template: torch.Tensor  # the stand-in's structure; leaves are replaced by views into a slot
    offsets: list[tuple[int, torch.dtype, tuple[int, ...]]]  # per leaf: byte offset, dtype, shape


@dataclass
class _SwappedBlock:
    index: int
    entries: list[_Entry]
    host: torch.Tensor  # flat pinned uint8 buffer
    nbytes: int


def _layout(entries_leaves: list[list[torch.Tensor]]) -> tuple[list[list[int]], int]:
    offsets, cursor = [], 0
    for leaves in entries_leaves:
        row = []
        for leaf in leaves:
            cursor = (cursor + _ALIGN_BYTES - 1) // _ALIGN_BYTES * _ALIGN_BYTES
            row.append(cursor)
            cursor += leaf.numel() * leaf.element_size()
        offsets.append(row)
    return offsets, cursor


def _typed_view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return flat[offset : offset + nbytes].view(dtype).view(shape)


def _assemble(template: torch.Tensor, views) -> torch.Tensor:
    """A tensor shaped like `template` (plain or quantized subclass) whose leaves are the next `views`."""
    if is_plain(template):
        return next(views)
    return map_leaves(template, lambda _: next(views))


@dataclass
class BlockSwap:
    """The applied strategy. `swapped` are block indices in forward order."""

    backend: Backend
    blocks: nn.ModuleList
    swapped: tuple[int, ...]
    ring_slots: int = 2
    _blocks: dict[int, _SwappedBlock] = field(default_factory=dict)
    _slots: list[torch.Tensor] = field(default_factory=list)
    _slot_block: list[int | None] = field(default_factory=list)  # which block's bytes a slot holds
    _slot_ready: list[object] = field(default_factory=list)  # event: the slot's copy is done
    _slot_free: list[object] = field(default_factory=list)  # event: compute no longer reads the slot
    _slot_used: list[int] = field(default_factory=list)  # tick of last use, for least-recently-used reuse
    _bound: dict[int, int] = field(default_factory=dict)  # block index -> slot its parameters point into
    _tick: int = 0
    _copy_stream: object | None = None
    _root_checkpointing: Callable[[], bool] = lambda: False
    copied_bytes: int = 0  # host -> device bytes this strategy has copied (all backends count it)
    _handles: list = field(default_factory=list)

    @property
    def offloaded_bytes(self) -> int:
        return sum(
            sum(leaf.numel() * leaf.element_size() for e in b.entries for leaf in leaf_tensors(e.template))
            for b in self._blocks.values()
        )

    @property
    def working_set_bytes(self) -> int:
        return sum(s.numel() for s in self._slots)

    @property
    def host_bytes(self) -> int:
        return sum(b.host.numel() for b in self._blocks.values())

    def _arm(self, transformer: nn.Module) -> None:
        """Allocate the device ring (slots the size of the largest swapped block) and hook the swapped blocks and the
        root module, once every block's host master is in place (`apply_block_swap` and the disk tier's staged swap)."""
        slot_bytes = max((b.nbytes for b in self._blocks.values()), default=0)
        for _ in range(self.ring_slots if self.swapped else 0):
            self._slots.append(self.backend.empty((slot_bytes,), torch.uint8))
            self._slot_block.append(None)
            self._slot_ready.append(None)
            self._slot_free.append(self.backend.new_event())
            self._slot_used.append(0)
        for index in self.swapped:
            block = self.blocks[index]
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=index: self._before_block(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, i=index: self._after_block(i)))
        self._handles.append(transformer.register_forward_pre_hook(lambda m, a: self._prefetch_first()))

    # -- binding ---------------------------------------------------------------------------------------------------
    def _bind(self, index: int, slot: int) -> None:
        flat = self._slots[slot]
        for entry in self._blocks[index].entries:
            views = iter(_typed_view(flat, off, dt, shape) for off, dt, shape in entry.offsets)
            set_contents(entry.module._parameters[entry.name], _assemble(entry.template, views))
        self._bound[index] = slot

    def _unbind(self, index: int) -> None:
        if self._bound.pop(index, None) is None:
            return
        for entry in self._blocks[index].entries:
            set_contents(entry.module._parameters[entry.name], entry.stand_in)

    def _load(self, index: int, exclude: int | None) -> int:
        """Start copying block `index` into the least recently used slot (not `exclude`); returns the slot."""
        candidates = [s for s in range(len(self._slots)) if s != exclude] or list(range(len(self._slots)))
        slot = min(candidates, key=lambda s: self._slot_used[s])
        previous = self._slot_block[slot]
        if previous is not None:
            self._unbind(previous)
        backend = self.backend
        block = self._blocks[index]
        backend.label(self._slots[slot], f"block swap ring slot {slot} (last loaded: block {index})")
        self.copied_bytes += block.nbytes
        if self._copy_stream is None:
            backend.copy_(self._slots[slot][: block.nbytes], block.host)
            self._slot_ready[slot] = None
        else:
            with backend.use_stream(self._copy_stream):
                # The slot's previous block may still be computing: the copy waits for that, not for everything.
                self._copy_stream.wait_event(self._slot_free[slot])
                backend.copy_(self._slots[slot][: block.nbytes], block.host, non_blocking=True)
                event = backend.new_event()
                event.record(self._copy_stream)
            self._slot_ready[slot] = event
        self._slot_block[slot] = index
        self._tick += 1
        self._slot_used[slot] = self._tick
        return slot

    def _slot_of(self, index: int) -> int | None:
        for slot, held in enumerate(self._slot_block):
            if held == index:
                return slot
        return None

    def _neighbour(self, index: int, backward: bool) -> int | None:
        pos = self.swapped.index(index)
        pos = pos - 1 if backward else pos + 1
        return self.swapped[pos] if 0 <= pos < len(self.swapped) else None

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _before_block(self, index: int) -> None:
        backward = _in_backward()
        slot = self._slot_of(index)
        if slot is None:
            slot = self._load(index, exclude=None)
        if self._slot_ready[slot] is not None:
            self.backend.current_stream().wait_event(self._slot_ready[slot])
        self._tick += 1
        self._slot_used[slot] = self._tick
        if index not in self._bound:
            self._bind(index, slot)
        # Whatever computed from the other slots has been issued by now: copies into them wait for this point.
        for other in range(len(self._slots)):
            if other != slot:
                self._slot_free[other] = self._record_compute()
        nxt = self._neighbour(index, backward)
        if nxt is not None and self._slot_of(nxt) is None:
            self._load(nxt, exclude=slot)

    def _after_block(self, index: int) -> None:
        if not _in_backward() and torch.is_grad_enabled() and not self._checkpointing():
            raise UsageError(
                "block swap needs gradient checkpointing in training: enable memory.gradient_checkpointing"
            )
        if not _in_backward():
            # Forward under checkpointing keeps no reference to the weights: poison them so a stray read is caught.
            # In recompute they stay bound: that block's backward (quanto saves the Parameter itself) reads them next.
            self._unbind(index)

    def _record_compute(self):
        event = self.backend.new_event()
        event.record(self.backend.current_stream())
        return event

    def _checkpointing(self) -> bool:
        return bool(self._root_checkpointing())

    def _prefetch_first(self) -> None:
        if self.swapped and not _in_backward() and self._slot_of(self.swapped[0]) is None:
            self._load(self.swapped[0], exclude=None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for index, block in self._blocks.items():
            self._unbind(index)
            for entry in block.entries:
                views = iter(_typed_view(block.host, off, dt, shape) for off, dt, shape in entry.offsets)
                value = self.backend.to_device(_assemble(entry.template, views))
                set_contents(entry.module._parameters[entry.name], value)
        self._slots.clear()


def swappable_blocks(transformer: nn.Module, blocks_attr: str) -> nn.ModuleList:
    """The transformer's blocks a ring can swap, or a one-line refusal: no such ModuleList, or checkpointing off
    (training would keep every block's weights for backward: OneTrainer #1306's recycled-buffer bug)."""
    blocks = getattr(transformer, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(
            f"block swap needs the transformer's '{blocks_attr}' ModuleList; {type(transformer).__name__} has none"
        )
    if not getattr(transformer, "is_gradient_checkpointing", False):
        raise UsageError("block swap needs gradient checkpointing in training: enable memory.gradient_checkpointing")
    return blocks


def apply_block_swap(
    transformer: nn.Module,
    backend: Backend,
    *,
    blocks_to_swap: int,
    placement: str = "spread",
    ring_slots: int = 2,
    blocks_attr: str = "transformer_blocks",
) -> BlockSwap:
    """Keep the frozen weights of `blocks_to_swap` blocks on the host and stream them through a ring of device slots.

    Refuses up front when gradient checkpointing is off (training would keep every block's weights for backward).
    Apply after quantization and LoRA injection, before `backend.place_module(transformer)`.
    """
    blocks = swappable_blocks(transformer, blocks_attr)
    refuse_unmovable(blocks, "block swap")
    if ring_slots < 2:
        raise UsageError("block swap needs at least 2 ring slots (one computing, one loading)")
    swapped = choose_swapped_blocks(len(blocks), blocks_to_swap, placement)
    # Swapping no more blocks than there are slots saves nothing (each stays in its slot), but is harmless.
    swap = BlockSwap(backend=backend, blocks=blocks, swapped=swapped, ring_slots=min(ring_slots, len(swapped)))
    swap._copy_stream = backend.new_stream() if backend.supports_streams else None
    swap._root_checkpointing = lambda: getattr(transformer, "is_gradient_checkpointing", False)
    for index in swapped:
        params = frozen_parameters(blocks[index], prefix=f"{blocks_attr}.{index}")
        leaves_per = [leaf_tensors(mod._parameters[name].detach()) for mod, name, _ in params]
        offsets, total = _layout(leaves_per)
        host = backend.empty_pinned((total,), torch.uint8)
        entries = []
        for (mod, name, label), leaves, offs in zip(params, leaves_per, offsets, strict=True):
            for leaf, off in zip(leaves, offs, strict=True):
                _typed_view(host, off, leaf.dtype, tuple(leaf.shape)).copy_(leaf.contiguous())
            param = mod._parameters[name]
            stand_in = stand_in_like(backend, param.detach(), label)
            entries.append(
                _Entry(
                    module=mod,
                    name=name,
                    label=label,
                    stand_in=stand_in,
                    template=stand_in,
                    offsets=[(off, leaf.dtype, tuple(leaf.shape)) for leaf, off in zip(leaves, offs, strict=True)],
                )
            )
            set_contents(param, stand_in)
        swap._blocks[index] = _SwappedBlock(index=index, entries=entries, host=host, nbytes=total)
    swap._arm(transformer)
    return swap
