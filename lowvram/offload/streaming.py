"""Weight streaming (RamTorch-style): frozen Linear weights live in pinned host memory and are copied in per call.

Each streamed Linear runs through an autograd Function that never computes a gradient for its frozen weight and saves
no weight for backward: backward streams the weight again. The next layer is prefetched on a side stream, in the
order the previous step fetched weights (forward, checkpoint recompute and backward alike). Quantized weights stream
quantized and are dequantized on the device only for backward. It does not touch trainable (LoRA) parameters.
"""

from __future__ import annotations

import fnmatch
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowvram.device import Backend, leaf_tensors
from lowvram.errors import UsageError
from lowvram.offload.weights import HostWeight, is_movable, is_plain, offload_parameter, set_contents


def _in_backward() -> bool:
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if is_plain(weight):
        return weight.to(dtype)
    return weight.dequantize().to(dtype)


def streamable_reason(module: nn.Module) -> str | None:
    """None when `module` is a frozen Linear this strategy can stream; else why not."""
    if not isinstance(module, nn.Linear):
        return "not a Linear"
    weight = module._parameters.get("weight")
    if weight is None or weight.requires_grad:
        return "trainable weight"
    if getattr(module, "activation_qtype", None) is not None:
        return "quantizes its activations"
    if not is_plain(weight) and not hasattr(weight, "dequantize"):
        return f"weight type {type(weight).__name__} cannot be dequantized"
    if not is_movable(weight):
        return f"weight type {type(weight).__name__} cannot be taken apart for copying"
    return None


class _StreamedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, streamer: WeightStreaming, index: int, bias: torch.Tensor | None):
        weight = streamer.fetch(index)
        ctx.streamer, ctx.index = streamer, index
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.streamer.fetch(ctx.index)
            grad_x = grad_out.matmul(_dense(weight, grad_out.dtype))
        # The frozen weight and bias get no gradient: that is the ramtorch bug (a full dW per layer) we avoid.
        return grad_x, None, None, None


def _streamed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    streamer, index = self._lowvram_stream
    return _StreamedLinear.apply(x, streamer, index, self.bias)


@dataclass
class WeightStreaming:
    """The applied strategy: which weights stream, what moved, and how to undo it."""

    backend: Backend
    weights: list[HostWeight]
    prefetch: bool = True
    copied_bytes: int = 0  # host -> device bytes this strategy has copied (all backends count it)
    _trace: list[int] = field(default_factory=list)
    _recording: list[int] = field(default_factory=list)
    _cursor: int = 0
    _pending: dict[int, tuple[torch.Tensor, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._copy_stream = self.backend.new_stream() if self.backend.supports_streams else None

    @property
    def offloaded_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def working_set_bytes(self) -> int:
        """Device bytes this strategy holds at most at once: the weight in use and the one prefetched."""
        sizes = sorted((w.nbytes for w in self.weights), reverse=True)
        return sum(sizes[: 2 if self.prefetch else 1])

    def names(self) -> list[str]:
        return [w.label for w in self.weights]

    # -- fetching --------------------------------------------------------------------------------------------------
    def _copy(self, index: int) -> tuple[torch.Tensor, object]:
        backend = self.backend
        host = self.weights[index].host
        self.copied_bytes += self.weights[index].nbytes
        if self._copy_stream is None:
            return backend.to_device(host), None
        with backend.use_stream(self._copy_stream):
            weight = backend.to_device(host, non_blocking=True)
            event = backend.new_event()
            event.record(self._copy_stream)
        return weight, event

    def fetch(self, index: int) -> torch.Tensor:
        """The device copy of weight `index` (prefetched or copied now); schedules the copy predicted next."""
        if not _in_backward() and self._recording and index == self._recording[0]:
            self._trace, self._recording = self._recording, []  # a new step began: last step's order is the guide
        self._recording.append(index)
        if index in self._pending:
            weight, event = self._pending.pop(index)
        else:
            weight, event = self._copy(index)
        if event is not None:
            compute = self.backend.current_stream()
            compute.wait_event(event)
            for leaf in leaf_tensors(weight):
                self.backend.record_stream(leaf, compute)
        if self.prefetch:
            self._prefetch_after(index)
        return weight

    def _prefetch_after(self, index: int) -> None:
        trace = self._trace
        if not trace:
            return
        if self._cursor < len(trace) and trace[self._cursor] == index:
            self._cursor += 1
        else:
            try:
                self._cursor = trace.index(index, min(self._cursor, len(trace))) + 1
            except ValueError:
                self._cursor = trace.index(index) + 1 if index in trace else len(trace)
        if self._cursor >= len(trace):
            return
        upcoming = trace[self._cursor]
        if upcoming in self._pending or upcoming == index:
            return
        self._pending.clear()  # a wrong guess is dropped, so at most one prefetched weight is ever held
        self._pending[upcoming] = self._copy(upcoming)

    # -- undo ------------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Put every weight back on the device (as a fresh copy) and restore the original forwards."""
        self._pending.clear()
        for w in self.weights:
            set_contents(w.param, self.backend.to_device(w.host))
            del w.module.forward
            del w.module._lowvram_stream


def select_layers(
    module: nn.Module, *, share: float | None = None, patterns: list[str] | tuple[str, ...] | str | None = None
) -> list[tuple[str, nn.Linear]]:
    """The frozen Linears to stream: all that match `patterns` (globs on module names), then `share` of them.

    A share keeps layers spread evenly through the model (every other one for 0.5), so each streamed copy has
    resident layers' compute to hide behind.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    candidates = [(name, m) for name, m in module.named_modules() if streamable_reason(m) is None]
    if patterns:
        candidates = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if share is None or share >= 1.0:
        return candidates
    if not 0.0 <= share <= 1.0:
        raise UsageError(f"ramtorch share {share} must be between 0 and 1 (e.g. 0.5 streams every other Linear)")
    picked, acc = [], 0.0
    for name, m in candidates:
        acc += share
        if acc >= 1.0 - 1e-9:
            acc -= 1.0
            picked.append((name, m))
    return picked


def apply_weight_streaming(
    module: nn.Module,
    backend: Backend,
    *,
    share: float | None = 1.0,
    patterns: list[str] | tuple[str, ...] | str | None = None,
    prefetch: bool = True,
) -> WeightStreaming:
    """Stream the frozen Linear weights of `module` (under peft: the base layers) from pinned host memory.

    Apply after quantization and LoRA injection, before `backend.place_module(module)`.
    """
    layers = select_layers(module, share=share, patterns=patterns)
    if not layers:
        raise UsageError("ramtorch matched no frozen Linear layer: check the share or the module-name pattern")
    streaming = WeightStreaming(backend=backend, weights=[], prefetch=prefetch)
    for index, (name, linear) in enumerate(layers):
        streaming.weights.append(offload_parameter(backend, linear, "weight", f"{name}.weight"))
        linear._lowvram_stream = (streaming, index)
        linear.forward = types.MethodType(_streamed_forward, linear)
    return streaming
