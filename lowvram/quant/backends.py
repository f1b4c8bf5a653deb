"""Quantization backends: turn one real nn.Linear into its quantized module, and take it apart/rebuild it for the cache.

One backend per quantized precision (quanto int8, torchao int8 and fp8 weight-only, bitsandbytes nf4); the libraries
are imported on first use. Deliberately not here: reading checkpoints (stream.py), caching files (cache.py).
"""

from __future__ import annotations

import copy
import ctypes
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lowvram.quant.exclude import quantizable_names
from lowvram.quant.precision import Precision, parse_precision

# Row-wise schemes (one scale per output row) are quantized in slices of about this many source bytes: the same
# result bit for bit, but the library's fp32 temporaries (measured ~4x the layer for torchao) stay small, which is
# what keeps a streaming load's peak host RAM near the quantized size.
DEFAULT_CHUNK_BYTES = 8 * 2**20


class QuantBackend(ABC):
    """Quantize a Linear; export its weight as plain tensors + JSON metadata; rebuild it from them."""

    precision: Precision
    row_wise: bool  # one scale per output row: quantizing row slices separately gives the identical result

    @abstractmethod
    def _quantize_whole(self, linear: nn.Linear) -> nn.Module: ...

    @abstractmethod
    def export(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """The quantized weight as plain tensors (data, scales, ...) and JSON-able metadata; bias not included."""

    @abstractmethod
    def rebuild(
        self,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        *,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> nn.Module:
        """The quantized module from `export`'s output, without quantizing anything, on the tensors' device."""

    @abstractmethod
    def owns(self, module: nn.Module) -> bool:
        """True when `module` is a Linear quantized by this backend."""

    def quantize(self, linear: nn.Linear, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> nn.Module:
        """A frozen quantized replacement for `linear` (real CPU weights, already in the wanted dtype)."""
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if not self.row_wise or _rows_per_chunk(weight.shape[1], weight.element_size(), chunk_bytes) >= weight.shape[0]:
            return _frozen(self._quantize_whole(_shell(weight, bias)))
        return self.quantize_rows(
            lambda start, stop: weight[start:stop],
            out_features=weight.shape[0],
            in_features=weight.shape[1],
            bias=bias,
            dtype=weight.dtype,
            chunk_bytes=chunk_bytes,
        )

    def quantize_rows(
        self,
        read_rows: Callable[[int, int], torch.Tensor],
        *,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> nn.Module:
        """Quantize a row-wise scheme slice by slice: `read_rows(start, stop)` gives weight rows (any float dtype),
        so neither the unquantized weight nor the library's temporaries for all of it are ever in memory at once."""
        if not self.row_wise:
            raise TypeError(f"{self.precision.value} is not row-wise: quantize the whole weight")
        rows_per_chunk = _rows_per_chunk(in_features, torch.empty((), dtype=dtype).element_size(), chunk_bytes)
        full: dict[str, torch.Tensor] = {}
        meta: dict = {}
        for start in range(0, out_features, rows_per_chunk):
            rows = read_rows(start, min(out_features, start + rows_per_chunk)).to(dtype)
            parts, meta = self.export(self._quantize_whole(_shell(rows, None)))
            for name, part in parts.items():
                if name not in full:
                    full[name] = torch.empty((out_features, *part.shape[1:]), dtype=part.dtype)
                full[name][start : start + part.shape[0]].copy_(part)
            freed = rows.numel() * rows.element_size()
            del rows, parts
            release_freed_memory(freed)
        return self.rebuild(full, meta, in_features=in_features, out_features=out_features, bias=bias, dtype=dtype)


class _HeapTrimmer:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`) once enough bytes went through; no-op elsewhere.

    glibc serves the 1-32 MiB temporaries of quantization from its heap and keeps their pages after `free`. Measured
    here on a 0.2 GB int8 load (one 0.4 GB bf16 block): without trimming RSS ended at 0.35-0.37 GB; trimming after
    each module ends it at 0.20 GB; trimming after every 8 MiB slice too lowers the peak from +0.10 to +0.04 GB over
    the result but about doubles the load time, so slices trim every 32 MiB (peak +0.09 GB, no measurable cost).
    """

    def __init__(self, every_bytes: int):
        self.every_bytes = every_bytes
        self.pending = 0
        self.trim = None

    def __call__(self, freed_bytes: int = 0, *, force: bool = False) -> None:
        self.pending += freed_bytes
        if not force and self.pending < self.every_bytes:
            return
        self.pending = 0
        if self.trim is None:
            try:
                self.trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self.trim = False
        if self.trim:
            self.trim(0)


release_freed_memory = _HeapTrimmer(every_bytes=32 * 2**20)


def _rows_per_chunk(in_features: int, itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, in_features * itemsize))


class QuantoInt8(QuantBackend):
    precision = Precision.INT8_QUANTO
    row_wise = True  # quanto int8 weights: absmax scale per output row (axis 0)

    def _quantize_whole(self, linear: nn.Linear) -> nn.Module:
        from optimum.quanto import QLinear, qint8

        module = QLinear.from_module(linear, weights=qint8)
        module.freeze()
        return module

    def export(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        names, ctx = module.weight.__tensor_flatten__()
        return {name: getattr(module.weight, name) for name in names}, dict(ctx)

    def rebuild(self, tensors, meta, *, in_features, out_features, bias, dtype) -> nn.Module:
        from optimum.quanto import QLinear, qint8
        from optimum.quanto.tensor.weights import WeightQBytesTensor

        skeleton = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
        module = QLinear.qcreate(skeleton, weights=qint8, device="meta")
        ctx = {**meta, "size": str([out_features, in_features]), "stride": str([in_features, 1])}
        weight = WeightQBytesTensor.__tensor_unflatten__(dict(tensors), ctx, None, None)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        device = weight.device
        module.input_scale = torch.ones((), dtype=dtype, device=device)
        module.output_scale = torch.ones((), dtype=dtype, device=device)
        return module

    def owns(self, module: nn.Module) -> bool:
        return type(module).__name__ == "QLinear" and type(module.weight).__name__.endswith("QBytesTensor")


class _TorchaoWeightOnly(QuantBackend):
    row_wise = True  # torchao int8/fp8 weight-only default granularity: one scale per output row

    def _config(self):
        raise NotImplementedError

    def _quantize_whole(self, linear: nn.Linear) -> nn.Module:
        from torchao.quantization import quantize_

        quantize_(linear, self._config())
        return linear

    def export(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

        weight = module.weight
        names, _ = weight.__tensor_flatten__()
        meta = json.loads(json.dumps(weight, cls=TensorSubclassAttributeJSONEncoder))
        return {name: getattr(weight, name) for name in names}, meta

    def rebuild(self, tensors, meta, *, in_features, out_features, bias, dtype) -> nn.Module:
        from torchao.prototype.safetensors.safetensors_utils import object_from_dict

        spec = copy.deepcopy(meta)
        spec["_data"].update(tensors)
        weight = object_from_dict(spec)
        module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return module

    def owns(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear and type(module.weight).__name__ == self._tensor_class


class TorchaoInt8(_TorchaoWeightOnly):
    precision = Precision.INT8_TORCHAO
    _tensor_class = "Int8Tensor"

    def _config(self):
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()


class TorchaoFp8(_TorchaoWeightOnly):
    precision = Precision.FP8_TORCHAO
    _tensor_class = "Float8Tensor"

    def _config(self):
        # Weight-only: the dynamic-activation fp8 configs have no backward, and training needs one.
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()


class BnbNf4(QuantBackend):
    precision = Precision.NF4_BNB
    row_wise = False  # blocks of 64 over the flattened weight, absmax double-quantized around a global mean

    def _new_module(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit(
            in_features, out_features, bias=bias, compute_dtype=dtype, quant_type="nf4", device="meta"
        )

    def _quantize_whole(self, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        weight = linear.weight.detach()
        module = self._new_module(weight.shape[1], weight.shape[0], linear.bias is not None, weight.dtype)
        # Params4bit quantizes when it is moved to a real device.
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to("cpu")
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def export(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"data": module.weight.data, **module.weight.quant_state.as_dict(packed=True)}
        return tensors, {"quant_type": "nf4"}

    def rebuild(self, tensors, meta, *, in_features, out_features, bias, dtype) -> nn.Module:
        import bitsandbytes as bnb

        stats = dict(tensors)
        data = stats.pop("data")
        module = self._new_module(in_features, out_features, bias is not None, dtype)
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=data.device, module=module
        )
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return module

    def owns(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Linear4bit" and type(module.weight).__name__ == "Params4bit"


_BACKENDS: dict[Precision, type[QuantBackend]] = {
    Precision.INT8_QUANTO: QuantoInt8,
    Precision.INT8_TORCHAO: TorchaoInt8,
    Precision.FP8_TORCHAO: TorchaoFp8,
    Precision.NF4_BNB: BnbNf4,
}


def get_backend(precision: str | Precision) -> QuantBackend | None:
    """The backend of a quantized precision; None for bf16/fp32 (nothing to quantize)."""
    p = parse_precision(precision)
    cls = _BACKENDS.get(p)
    return None if cls is None else cls()


def quantize_model(
    model: nn.Module,
    precision: str | Precision,
    exclude: Sequence[str] = (),
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[str]:
    """Quantize, in place, every Linear of an already-loaded model that `exclude` spares; returns their names.

    For weights already in memory (tests, tiny models). Real checkpoints go through `load_quantized`, which never
    holds the unquantized model.
    """
    backend = get_backend(precision)
    if backend is None:
        return []
    names = quantizable_names(model, exclude)
    for name in names:
        linear = model.get_submodule(name)
        set_submodule(model, name, backend.quantize(linear, chunk_bytes=chunk_bytes))
    return names


def prepare_for_peft(model: nn.Module) -> None:
    """Mark a model holding bitsandbytes 4-bit layers the way peft expects, before injecting LoRA.

    peft picks its 4-bit LoRA layer only when `model.is_loaded_in_4bit` is set (transformers sets it; diffusers and
    our loader do not); without it peft reads the packed weight's shape as the layer's and builds wrong adapters.
    """
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        model.is_loaded_in_4bit = True


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shell(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear around existing tensors (no copy), so that in-place library calls never touch the caller's module."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _frozen(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module
