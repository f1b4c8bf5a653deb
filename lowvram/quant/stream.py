"""Streaming load: fill a meta-device model from safetensors one module at a time, quantizing each Linear on arrival.

Host RAM peaks near the quantized size (never the bf16 model); generic over any nn.Module and checkpoint key
layout. Deliberately not here: choosing the precision (the planner) and moving weights to the GPU (offload/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lowvram.errors import LowvramError
from lowvram.quant.backends import (
    DEFAULT_CHUNK_BYTES,
    QuantBackend,
    _shell,
    get_backend,
    release_freed_memory,
    set_submodule,
)
from lowvram.quant.exclude import quantizable_names
from lowvram.quant.layout import allocated_bytes
from lowvram.quant.precision import Precision, check_backend_supported, parse_precision
from lowvram.quant.source import (
    QUANT_SEP,
    DictSource,
    KeyMap,
    SafetensorsSource,
    TensorSource,
    expected_keys,
)

if TYPE_CHECKING:
    from lowvram.profiles import HardwareProfile


@dataclass(frozen=True)
class LoadResult:
    """What `load_quantized` did. `weight_bytes` is measured on the loaded model (distinct storages)."""

    source: Literal["checkpoint", "cache"]
    precision: Precision
    quantized_modules: tuple[str, ...]
    weight_bytes: int
    cache_path: Path | None
    cache_status: Literal["off", "hit", "written", "rebuilt"]
    cache_problem: str | None = None  # why an existing cache was not used (stale, corrupt)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    # Parameters go to meta as they are registered, before any init touches their pages; buffers stay real because
    # non-persistent ones (rotary inv_freq, Gemma's embed_scale) are computed at construction and are in no checkpoint.
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call `factory()` (e.g. `lambda: Model(**config)`) with every parameter on meta and every buffer real."""
    with _parameters_on_meta():
        return factory()


def check_keys(model: nn.Module, available: set[str], *, strict: bool, what: str) -> None:
    """Refuse, before reading any tensor, a checkpoint that lacks weights the model needs (or has foreign ones)."""
    groups, _ = expected_keys(model)
    missing = [group[0] for group in groups if not any(k in available for k in group)]
    if missing:
        shown = ", ".join(missing[:3])
        raise LowvramError(
            f"{what} lacks {len(missing)} weight(s) the model needs (e.g. {shown}): wrong checkpoint or key mapping"
        )
    if strict:
        known = {k for group in groups for k in group}
        known.update(expected_keys(model)[1])
        unexpected = sorted(available - known)
        if unexpected:
            shown = ", ".join(unexpected[:3])
            raise LowvramError(
                f"{what} has {len(unexpected)} tensor(s) the model does not use (e.g. {shown}): "
                "wrong checkpoint or key mapping"
            )


def _is_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module._parameters.values() if p is not None)


def materialize(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    available: set[str],
    *,
    dtype: torch.dtype,
    quantized: set[str],
    make_quantized: Callable[[str, nn.Module], nn.Module],
    progress: Callable[[str | None], None] | None = None,
) -> None:
    """Give every meta parameter of `model` its tensor, one module at a time; modules in `quantized` are built by
    `make_quantized(name, skeleton_module)`. Modules already real are skipped, so a failed pass can be resumed.
    `progress(name)` is called before each module in turn and `progress(None)` after the last (the disk tier
    writes each finished block to its file there, so the whole model is never held)."""
    groups, buffer_keys = expected_keys(model)
    tie_of = {key: group for group in groups for key in group}
    for name, module in list(model.named_modules()):
        if progress is not None:
            progress(name)
        if not _is_meta(module):
            continue
        if name in quantized:
            set_submodule(model, name, make_quantized(name, module))
            release_freed_memory(force=True)
            continue
        for pname, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            key = f"{name}.{pname}" if name else pname
            source_key = next(k for k in tie_of[key] if k in available)
            tensor = read(source_key)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            loaded = nn.Parameter(tensor, requires_grad=False)
            for tied_key in tie_of[key]:  # every name of a tied parameter gets the one loaded Parameter
                owner_name, _, attr = tied_key.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner._parameters[attr] = loaded
            del tensor
    if progress is not None:
        progress(None)
    for key in buffer_keys:
        if key in available:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            tensor = read(key)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            owner._buffers[attr] = tensor
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise LowvramError(f"{len(leftover)} weight(s) were not loaded (e.g. {', '.join(leftover[:3])})")


def load_quantized(
    model: nn.Module,
    checkpoint: str | Path | Sequence[str | Path] | TensorSource,
    precision: str | Precision,
    *,
    dtype: torch.dtype | None = None,
    exclude: Sequence[str] = (),
    key_map: KeyMap = None,
    cache_dir: str | Path | None = None,
    strict: bool = True,
    profile: HardwareProfile | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[str | None], None] | None = None,
) -> LoadResult:
    """Load `checkpoint` into `model` (a `build_empty` skeleton, filled in place), quantizing to `precision`.

    `checkpoint`: .safetensors file(s), a state dict, or any `TensorSource` (e.g. one dequantizing fp8 weights).
    `dtype`: dtype of every unquantized tensor and of the quantizer's input (default fp32 for `fp32`, else bf16).
    `key_map`: checkpoint key -> model key (a dict or a function; None drops a tensor); files and state dicts.
    `cache_dir`: save the quantized weights after the first load and use them directly afterwards (cache.py).
    `profile`: refuse a precision the machine cannot run before anything is opened. Missing or foreign keys are
    refused before any tensor is read. All weights end with `requires_grad=False`. `progress`: see `materialize`
    (with it, a quantized cache is read but not written: the model then holds weights moved elsewhere).
    """
    p = parse_precision(precision)
    if profile is not None:
        check_backend_supported(p, profile)
    dtype = dtype or (torch.float32 if p is Precision.FP32 else torch.bfloat16)
    if isinstance(checkpoint, Mapping):  # an in-memory state dict (nothing to fingerprint: never cached)
        return _load(model, DictSource(checkpoint, key_map), p, dtype, exclude, None, strict, chunk_bytes, progress)
    if hasattr(checkpoint, "get") and hasattr(checkpoint, "keys"):
        return _load(model, checkpoint, p, dtype, exclude, cache_dir, strict, chunk_bytes, progress)
    files = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(f) for f in checkpoint]
    with contextlib.closing(SafetensorsSource(files, key_map)) as source:
        return _load(model, source, p, dtype, exclude, cache_dir, strict, chunk_bytes, progress)


def _load(
    model, source: TensorSource, p, dtype, exclude, cache_dir, strict, chunk_bytes, progress=None
) -> LoadResult:
    from lowvram.quant import cache as qcache

    files = [Path(f) for f in source.files]
    check_keys(model, source.keys(), strict=strict, what=f"checkpoint {files[0].name}" if files else "state dict")
    backend = get_backend(p)
    quantized = set()
    if backend is not None:
        quantized = {n for n in quantizable_names(model, exclude) if _is_meta(model.get_submodule(n))}

    cache_status: Literal["off", "hit", "written", "rebuilt"] = "off"
    problem = None
    cache_path = None
    if cache_dir is not None and backend is not None and files:
        ident = qcache.cache_identity(files, source.mapping(), p, dtype, exclude, model)
        cache_path = qcache.cache_file(Path(cache_dir), files, p, ident)
        hit, problem = qcache.open_cache(cache_path, ident, model, quantized)
        if hit is not None:
            try:
                _load_from_cache(model, hit, backend, dtype=dtype, quantized=quantized, progress=progress)
                return _result("cache", p, model, quantized, cache_path, "hit")
            except (qcache.CacheCorrupt, LowvramError) as err:  # tensors are verified one by one: finish from source
                problem = f"corrupt: {err}"
            finally:
                hit.close()
        if problem is None:
            problem = qcache.stale_reason(Path(cache_dir), files, p, cache_path)

    def quantize_from_source(name: str, skeleton: nn.Module) -> nn.Module:
        bias = source.get(f"{name}.bias").to(dtype) if skeleton.bias is not None else None
        if backend.row_wise and hasattr(source, "get_rows"):  # row slices: the bf16 weight never exists whole
            return backend.quantize_rows(
                lambda start, stop: source.get_rows(f"{name}.weight", start, stop),
                out_features=skeleton.out_features,
                in_features=skeleton.in_features,
                bias=bias,
                dtype=dtype,
                chunk_bytes=chunk_bytes,
            )
        weight = source.get(f"{name}.weight").to(dtype)
        return backend.quantize(_shell(weight, bias), chunk_bytes=chunk_bytes)

    materialize(
        model,
        source.get,
        source.keys(),
        dtype=dtype,
        quantized=quantized,
        make_quantized=quantize_from_source,
        progress=progress,
    )
    if cache_path is not None and progress is None:
        qcache.write_cache(cache_path, model, backend, quantized, ident)
        cache_status = "rebuilt" if problem else "written"
    return _result("checkpoint", p, model, quantized, cache_path, cache_status, problem)


def _load_from_cache(
    model: nn.Module, reader, backend: QuantBackend, *, dtype, quantized: set[str], progress=None
) -> None:
    def rebuild(name: str, skeleton: nn.Module) -> nn.Module:
        info = reader.modules[name]
        parts = {part: reader.get(f"{name}.weight{QUANT_SEP}{part}") for part in info["parts"]}
        bias = reader.get(f"{name}.bias") if skeleton.bias is not None else None
        return backend.rebuild(
            parts,
            info["meta"],
            in_features=skeleton.in_features,
            out_features=skeleton.out_features,
            bias=bias,
            dtype=dtype,
        )

    materialize(
        model, reader.get, reader.keys(), dtype=dtype, quantized=quantized, make_quantized=rebuild, progress=progress
    )


def _result(source, precision, model, quantized, cache_path, status, problem=None) -> LoadResult:
    return LoadResult(
        source=source,
        precision=precision,
        quantized_modules=tuple(sorted(quantized)),
        weight_bytes=allocated_bytes(model),
        cache_path=cache_path,
        cache_status=status,
        cache_problem=problem,
    )
