"""Activation offload at checkpoint boundaries: each checkpointed block's inputs wait in pinned host memory.

With gradient checkpointing the activations left on the device are the block-boundary hidden states, one per block;
this keeps them on the host (copied out on a side stream while the block computes) and copies each back only when
its block is recomputed in backward. Inputs shared by every block (text embeddings, timestep embeddings, rotary
tables) stay where they are: offloading them saves nothing. It does not checkpoint anything finer than a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowvram.device import Backend, leaf_tensors
from lowvram.offload.weights import tensor_bytes


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a block without saving anything but its (host-resident) boundary inputs; recompute it in backward."""

    @staticmethod
    def forward(ctx, offload: ActivationOffload, run, _grad_anchor: torch.Tensor, *args):
        ctx.offload, ctx.run = offload, run
        backend, stream = offload.backend, offload._copy_stream
        ctx.rng_state = backend.get_rng_state()
        ctx.cpu_rng_state = torch.get_rng_state()
        ctx.copied = None
        stored = []
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and i in offload.chain_positions:
                backend.label(arg, f"activation boundary (block input {i})")
                if stream is None:
                    host = backend.to_host(arg.detach(), non_blocking=True)
                else:
                    # On a side stream, so the block computes while its input goes to the host: the copy waits for
                    # the input to be computed, and the input's memory is not reused until the copy has read it.
                    stream.wait_stream(backend.current_stream())
                    with backend.use_stream(stream):
                        host = backend.to_host(arg.detach(), non_blocking=True)
                    for leaf in leaf_tensors(arg):
                        backend.record_stream(leaf, stream)
                    ctx.copied = backend.new_event()
                    ctx.copied.record(stream)
                backend.label(host, f"activation boundary (block input {i}) on the host")
                stored.append(("host", host, arg.requires_grad))
                offload.stored_bytes += tensor_bytes(arg)
            elif isinstance(arg, torch.Tensor):
                stored.append(("device", arg.detach(), arg.requires_grad))
            else:
                stored.append(("object", arg, False))
        ctx.stored = stored
        with torch.no_grad():
            out = run(*args)
        offload._note_outputs(out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        offload = ctx.offload
        if ctx.copied is not None:  # the host copy must be complete before it is copied back
            offload.backend.current_stream().wait_event(ctx.copied)
        inputs = []
        for kind, value, requires_grad in ctx.stored:
            if kind == "host":
                offload.copied_bytes += tensor_bytes(value)
                value = offload.backend.to_device(value).requires_grad_(requires_grad)
            elif kind == "device":
                value = value.detach().requires_grad_(requires_grad)
            inputs.append(value)
        ctx.stored = None
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.cpu_rng_state)
            saved = offload.backend.get_rng_state()
            offload.backend.set_rng_state(ctx.rng_state)
            try:
                with torch.enable_grad():
                    out = ctx.run(*inputs)
            finally:
                offload.backend.set_rng_state(saved)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs)
        return (None, None, None, *input_grads)


@dataclass
class ActivationOffload:
    """The applied strategy. `chain_positions`: argument positions fed by the previous block's outputs."""

    backend: Backend
    chain_positions: set[int] = field(default_factory=set)
    stored_bytes: int = 0  # boundary bytes sent to the host during the current (or last) forward
    largest_stored_bytes: int = 0
    copied_bytes: int = 0  # host -> device bytes copied back for recompute (all backends count it)
    _previous_outputs: set[int] = field(default_factory=set)
    _anchor: torch.Tensor | None = None
    _copy_stream: object | None = None  # device -> host copies of block inputs

    def checkpoint(self, module: nn.Module, *args):
        """diffusers' `gradient_checkpointing_func` signature: (block, *positional args)."""
        if self._previous_outputs:
            for i, arg in enumerate(args):
                if isinstance(arg, torch.Tensor) and id(arg) in self._previous_outputs:
                    self.chain_positions.add(i)
        if self._anchor is None:
            # An input that requires grad, so blocks fed only by frozen layers still get a backward (their LoRA).
            self._anchor = torch.empty(0, requires_grad=True)
        before = self.stored_bytes
        out = _OffloadedCheckpoint.apply(self, module.__call__, self._anchor, *args)
        self.largest_stored_bytes = max(self.largest_stored_bytes, self.stored_bytes - before)
        return out

    def _note_outputs(self, out) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        self._previous_outputs = {id(o) for o in outs if isinstance(o, torch.Tensor)}

    def _start_forward(self) -> None:
        self._previous_outputs = set()
        self.stored_bytes = 0

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes this strategy keeps off the device: the boundaries of one forward."""
        return self.stored_bytes

    @property
    def working_set_bytes(self) -> int:
        """One block's boundary is back on the device while that block is recomputed."""
        return self.largest_stored_bytes


def apply_activation_offload(transformer: nn.Module, backend: Backend) -> ActivationOffload:
    """Enable block checkpointing on a diffusers transformer with boundary inputs kept in pinned host memory.

    The first step learns which arguments chain block to block (and offloads them from its second block on).
    """
    offload = ActivationOffload(backend=backend)
    offload._copy_stream = backend.new_stream() if backend.supports_streams else None
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=offload.checkpoint)
    transformer.register_forward_pre_hook(lambda m, a: offload._start_forward())
    return offload
