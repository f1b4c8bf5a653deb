"""Group offload: an adapter over diffusers' `apply_group_offloading` that is correct in LoRA training.

diffusers decides the groups (block_level / leaf_level) and when each onloads and offloads (its forward hooks); the
moving is ours, through the device seam, on a copy stream that compute waits for (no prefetch: see the refusal).
Offload rebinds the module's attribute to a stand-in Parameter instead of swapping `.data` of the Parameter autograd
saved, so backward reads the onloaded copy it saved, never the offloaded tensor (the device mismatch of diffusers
#12610 / SimpleTuner #1975). Combinations that cannot work are refused up front with one line: see
`group_offload_refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowvram.device import Backend, leaf_tensors
from lowvram.errors import UsageError
from lowvram.offload.weights import refuse_unmovable, stand_in_like, tensor_bytes


def group_offload_refusal(*, training: bool, gradient_checkpointing: bool, use_stream: bool) -> str | None:
    """Why a group offload setting cannot work in this run, or None when it can."""
    if training and not gradient_checkpointing:
        # diffusers has no backward hooks: every onloaded weight autograd saved stays alive until backward.
        return (
            "group offload saves no memory in training without gradient checkpointing (diffusers has no "
            "backward hooks): enable memory.gradient_checkpointing, or use blocks_to_swap"
        )
    if training and use_stream:
        # Its prefetch follows the forward order, which checkpoint recompute in backward does not (SimpleTuner
        # forces it off for the same reason).
        return (
            "group_offload_use_stream prefetches in forward order, which checkpoint recompute breaks: set "
            "memory.group_offload_use_stream=false (or use blocks_to_swap, which prefetches in both directions)"
        )
    return None


@dataclass
class _Slot:
    """One frozen parameter a group moves: where it is bound, its host copy and its stand-in Parameter."""

    module: nn.Module
    name: str
    host: torch.Tensor
    stand_in: nn.Parameter


@dataclass(eq=False)  # identity, not field-wise (fields hold tensors)
class _Group:
    slots: list[_Slot]
    diffusers_group: object
    onloaded: bool = False


@dataclass
class GroupOffload:
    backend: Backend
    groups: list[_Group] = field(default_factory=list)
    onloads: int = 0
    copied_bytes: int = 0  # host -> device bytes this strategy has copied (all backends count it)
    _names: dict[int, str] = field(default_factory=dict)  # id(module) -> dotted path, "" for the root
    blocks_prefix: str = "transformer_blocks."
    _onloaded: list[_Group] = field(default_factory=list)  # a handful at most: scanned on every onload
    _copy_stream: object | None = None

    @property
    def offloaded_bytes(self) -> int:
        return sum(tensor_bytes(s.host) for g in self.groups for s in g.slots)

    @property
    def working_set_bytes(self) -> int:
        """Device bytes held at once, as an upper bound: groups outside the checkpointed blocks (autograd may keep
        their onloaded copies until backward), plus one block's own group and its largest leaf group.
        """
        sizes = [(self._leader_name(g) or "", sum(tensor_bytes(s.host) for s in g.slots)) for g in self.groups]
        outside = sum(n for name, n in sizes if not name.startswith(self.blocks_prefix))
        inside = [(name, n) for name, n in sizes if name.startswith(self.blocks_prefix)]
        blocks = {name for name, _ in inside if name.count(".") == self.blocks_prefix.count(".")}
        block_own = max((n for name, n in inside if name in blocks), default=0)
        largest_leaf = max((n for name, n in inside if name not in blocks), default=0)
        return outside + block_own + largest_leaf

    def _leader_name(self, group: _Group) -> str | None:
        leader = getattr(group.diffusers_group, "onload_leader", None)
        return None if leader is None else self._names.get(id(leader))

    def _onload(self, group: _Group) -> None:
        if group.onloaded:
            return
        # Non-reentrant checkpointing stops a recompute early (by exception) once backward has what it needs, so
        # diffusers' post-forward offload never runs there and every recomputed group would stay onloaded. Whatever
        # is onloaded and does not enclose this group is therefore offloaded now.
        name = self._leader_name(group)
        if name is not None:
            for other in list(self._onloaded):
                other_name = self._leader_name(other)
                if other_name is None or other_name == "" or name == other_name or name.startswith(other_name + "."):
                    continue
                self._offload(other)
        backend, stream = self.backend, self._copy_stream
        values = []
        for slot in group.slots:
            if stream is None:
                values.append(backend.to_device(slot.host))
            else:
                # On the copy engine: the host runs ahead of the GPU, so the copy starts while compute still drains
                # the kernels queued before it, instead of queueing behind them on the compute stream.
                with backend.use_stream(stream):
                    values.append(backend.to_device(slot.host, non_blocking=True))
            self.copied_bytes += tensor_bytes(slot.host)
        if stream is not None and values:
            ready = backend.new_event()
            ready.record(stream)
            compute = backend.current_stream()
            compute.wait_event(ready)
            for value in values:  # freed by compute (when autograd lets go), allocated on the copy stream
                for leaf in leaf_tensors(value):
                    backend.record_stream(leaf, compute)
        for slot, value in zip(group.slots, values, strict=True):
            slot.module._parameters[slot.name] = nn.Parameter(value, requires_grad=False)
        group.onloaded = True
        self._onloaded.append(group)
        self.onloads += 1

    def _offload(self, group: _Group) -> None:
        for slot in group.slots:
            # A new object in the module; the onloaded Parameter lives on only where autograd saved it.
            slot.module._parameters[slot.name] = slot.stand_in
        group.onloaded = False
        if group in self._onloaded:
            self._onloaded.remove(group)


def apply_group_offload(
    module: nn.Module,
    backend: Backend,
    *,
    offload_type: str = "block_level",
    blocks_per_group: int = 1,
    use_stream: bool = False,
    gradient_checkpointing: bool | None = None,
    training: bool = True,
    blocks_attr: str = "transformer_blocks",
) -> GroupOffload:
    """Group-offload `module`'s frozen weights with diffusers' grouping; trainable (LoRA) parameters stay resident.

    `gradient_checkpointing` defaults to what the module reports. Apply after quantization and LoRA injection,
    before `backend.place_module(module)`.
    """
    if offload_type not in ("block_level", "leaf_level"):
        raise UsageError(f"group_offload_type '{offload_type}' is unknown: use block_level or leaf_level")
    if gradient_checkpointing is None:
        gradient_checkpointing = bool(getattr(module, "is_gradient_checkpointing", False))
    reason = group_offload_refusal(
        training=training, gradient_checkpointing=gradient_checkpointing, use_stream=use_stream
    )
    if reason:
        raise UsageError(reason)
    refuse_unmovable(module, "group offload")
    if use_stream:
        raise UsageError(
            "group_offload_use_stream needs diffusers' CUDA stream path, which this adapter replaces: "
            "set memory.group_offload_use_stream=false"
        )
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    owners: dict[int, tuple[nn.Module, str]] = {}
    for mod in module.modules():
        for name, param in mod._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (mod, name))

    # diffusers' own movers run once here on a host-resident module (a no-op); ours replace them right after.
    host = torch.device("cpu")
    apply_group_offloading(
        module,
        onload_device=backend.device,  # where diffusers sends each group's inputs
        offload_device=host,
        offload_type=offload_type,
        num_blocks_per_group=blocks_per_group if offload_type == "block_level" else None,
        use_stream=False,
    )
    adapter = GroupOffload(
        backend=backend, _names={id(m): n for n, m in module.named_modules()}, blocks_prefix=f"{blocks_attr}."
    )
    adapter._copy_stream = backend.new_stream() if backend.supports_streams else None
    seen: set[int] = set()
    for mod in module.modules():
        registry = getattr(mod, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is None or id(hook.group) in seen:
            continue
        seen.add(id(hook.group))
        diffusers_group = hook.group
        params = [p for m in diffusers_group.modules for p in m.parameters()] + list(diffusers_group.parameters)
        slots = []
        for param in dict.fromkeys(params):
            if param.requires_grad:
                continue  # LoRA weights, their grads and optimizer state stay on the device
            owner, name = owners[id(param)]
            if owner._parameters.get(name) is not param:
                continue  # already taken by another group
            label = f"{type(owner).__name__}.{name}"
            host_copy = backend.label(backend.pin(param.detach()), f"{adapter._names.get(id(owner))}.{name}")
            stand_in = nn.Parameter(stand_in_like(backend, param.detach(), label), requires_grad=False)
            owner._parameters[name] = stand_in
            slots.append(_Slot(module=owner, name=name, host=host_copy, stand_in=stand_in))
        group = _Group(slots=slots, diffusers_group=diffusers_group)
        adapter.groups.append(group)
        diffusers_group.onload_ = lambda g=group: adapter._onload(g)
        diffusers_group.offload_ = lambda g=group: adapter._offload(g)
    return adapter
