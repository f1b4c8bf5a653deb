"""Moving frozen weights between host and device through the seam: pinned host copies, stand-ins, rebinding.

Shared by every strategy. Quantized weights (quanto, torchao subclasses) move as their inner tensors, so they stay
quantized on the host and over the bus. It never decides what to offload (the strategies do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowvram.device import Backend, leaf_tensors, map_leaves
from lowvram.errors import UsageError


def is_plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__")


def is_movable(tensor: torch.Tensor) -> bool:
    """Plain tensors and subclasses that can be taken apart (quanto, torchao). bitsandbytes' Params4bit keeps its
    quantization state outside the tensor, so a copy of its data alone would be silently wrong.
    """
    return type(tensor) in (torch.Tensor, nn.Parameter) or hasattr(tensor, "__tensor_flatten__")


def refuse_unmovable(module: nn.Module, what: str) -> None:
    """One-line refusal, before anything is touched, when `module` holds frozen weights we cannot move."""
    for name, param in module.named_parameters():
        if not param.requires_grad and not is_movable(param):
            raise UsageError(
                f"{what} cannot move {type(param).__name__} weights ({name}): use int8-quanto or int8-torchao "
                "with offloading, or this precision without it"
            )


def tensor_bytes(tensor: torch.Tensor) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in leaf_tensors(tensor))


def set_contents(param: torch.Tensor, value: torch.Tensor) -> None:
    """Make `param` (same Python object, so optimizers and hooks keep their references) hold `value`'s data.

    `.data =` cannot take a wrapper subclass (it crashes the process), so quantized weights swap their inner tensors.
    """
    if is_plain(param):
        param.data = value
        return
    names, _ = param.__tensor_flatten__()
    for name in names:
        inner = getattr(value, name)
        current = getattr(param, name)
        if is_plain(current):
            setattr(param, name, inner)
        else:
            set_contents(current, inner)


def stand_in_like(backend: Backend, tensor: torch.Tensor, label: str) -> torch.Tensor:
    """A poisoned placeholder with `tensor`'s structure: plain, or the same subclass around stand-in leaves."""
    return map_leaves(tensor, lambda leaf: backend.stand_in(leaf, label))


@dataclass
class HostWeight:
    """One offloaded parameter: where it lives in the module, its pinned host copy and its stand-in."""

    module: nn.Module
    name: str
    label: str
    host: torch.Tensor
    stand_in: torch.Tensor

    @property
    def param(self) -> torch.Tensor:
        return self.module._parameters[self.name]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.host)


def offload_parameter(backend: Backend, module: nn.Module, name: str, label: str) -> HostWeight:
    """Copy a frozen parameter to pinned host memory and leave a stand-in in its place (the device copy is freed)."""
    param = module._parameters[name]
    if param.requires_grad:
        raise ValueError(f"{label} is trainable: only frozen weights are offloaded")
    host = backend.label(backend.pin(param.detach()), label)
    stand_in = stand_in_like(backend, param.detach(), label)
    set_contents(param, stand_in)
    return HostWeight(module=module, name=name, label=label, host=host, stand_in=stand_in)


def frozen_parameters(module: nn.Module, prefix: str = "") -> list[tuple[nn.Module, str, str]]:
    """(owner module, attribute name, dotted label) of every frozen parameter under `module`, each once."""
    seen: set[int] = set()
    out = []
    for mod_name, mod in module.named_modules():
        for name, param in mod._parameters.items():
            if param is None or param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            label = ".".join(p for p in (prefix, mod_name, name) if p)
            out.append((mod, name, label))
    return out
