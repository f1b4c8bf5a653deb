"""Bytes each precision really stores for a Linear weight (data + scales + zero-points + codebooks), as pure math.

The planner sizes weights with these functions; `allocated_bytes` measures a real module so tests can hold the math
to what the libraries allocate. Nothing here quantizes or imports a quantization library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from lowvram.quant.precision import Precision, parse_precision

# bitsandbytes 4-bit layout (Linear4bit defaults, which lowvram uses): one absmax per 64 weights, the absmax values
# themselves quantized to uint8 in groups of 256 ("compress_statistics"/double quantization).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
_NF4_CODE_BYTES = 16 * 4  # the 16-entry nf4 codebook, float32, one per layer
_NF4_NESTED_CODE_BYTES = 256 * 4  # the 8-bit dynamic codebook for absmax, float32, one per layer
_NF4_OFFSET_BYTES = 4  # mean absmax, float32 scalar


def quantized_weight_bytes(shape: Sequence[int], dtype: torch.dtype, precision: str | Precision) -> int:
    """Bytes of one Linear weight of `shape` (out, in) stored at `precision`; `dtype` is the unquantized dtype.

    Counts the weight's data and every tensor that travels with it (scales, zero-points, codebooks), not the bias.
    """
    p = parse_precision(precision)
    out_features = int(shape[0])
    numel = math.prod(int(s) for s in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if p in (Precision.BF16, Precision.FP32):
        return numel * itemsize
    if p is Precision.INT8_QUANTO:
        return numel + out_features * itemsize  # int8 data + per-row scale in the weight's dtype
    if p is Precision.INT8_TORCHAO:
        return numel + out_features * 4 + out_features  # int8 data + fp32 per-row scale + int8 zero-point
    if p is Precision.FP8_TORCHAO:
        return numel + out_features * 4  # e4m3 data + fp32 per-row scale
    if p is Precision.NF4_BNB:
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        nested_blocks = math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
        return (
            math.ceil(numel / 2)
            + blocks  # uint8 absmax
            + nested_blocks * 4  # fp32 absmax of the absmax
            + _NF4_CODE_BYTES
            + _NF4_NESTED_CODE_BYTES
            + _NF4_OFFSET_BYTES
        )
    raise AssertionError(f"no layout for {p}")


def quantized_linear_bytes(
    in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, precision: str | Precision
) -> int:
    """Bytes of a whole quantized Linear: weight layout + bias (kept in `dtype`) + per-module buffers."""
    p = parse_precision(precision)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = quantized_weight_bytes((out_features, in_features), dtype, p)
    if bias:
        total += out_features * itemsize
    if p is Precision.INT8_QUANTO:
        total += 2 * itemsize  # QLinear's input_scale and output_scale scalar buffers
    return total


def predicted_module_bytes(
    module: torch.nn.Module,
    precision: str | Precision,
    exclude: Sequence[str] = (),
    *,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> int:
    """Bytes `module` (any device, meta included) will hold once loaded by `load_quantized` at `precision`.

    Quantizable Linears (see exclude.py; `prefix` is the module's name in its model, e.g. "transformer_blocks.3.")
    use their backend layout, every other floating tensor is stored in `dtype`; tied parameters count once.
    """
    from lowvram.quant.exclude import quantizable_names

    p = parse_precision(precision)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    counted: set[int] = set()
    quantized_params: set[int] = set()
    for name in quantizable_names(module, exclude, prefix) if p.quantized else []:
        sub = module.get_submodule(name)
        total += quantized_linear_bytes(
            sub.in_features, sub.out_features, bias=sub.bias is not None, dtype=dtype, precision=p
        )
        quantized_params.update(id(t) for t in sub.parameters())
    for param in module.parameters():
        if id(param) in quantized_params:
            continue
        size = itemsize if param.is_floating_point() else param.element_size()
        total += param.numel() * size
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is None or id(buf) in counted:
                continue
            counted.add(id(buf))
            # A checkpoint's (persistent) float buffers are cast to `dtype`; computed ones stay as built.
            cast = buf.is_floating_point() and name not in sub._non_persistent_buffers_set
            total += buf.numel() * (itemsize if cast else buf.element_size())
    return total


def allocated_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers, looking inside quantized tensors."""
    seen: set[int] = set()
    total = 0
    for tensor in _module_tensors(module):
        for leaf in _leaf_tensors(tensor):
            storage = leaf.untyped_storage()
            key = storage.data_ptr()
            if leaf.device.type == "meta" or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _leaf_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors holding the bytes of `tensor`: itself, the inner tensors of a subclass, a bnb quant state."""
    if type(tensor) is torch.nn.Parameter:
        tensor = tensor.data
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(tensor, name))
        return
    yield tensor
    state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit keeps its statistics here
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
