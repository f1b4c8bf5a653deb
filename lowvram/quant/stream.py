"""Streaming load: fill a meta-device model from safetensors one module at a time, quantizing each Linear on arrival.

Host RAM peaks near the quantized size (never the bf16 model); generic over any nn.Module and checkpoint key
layout. Deliberately not here: choosing the precision (the planner) and moving weights to the GPU (offload/).
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

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

if TYPE_CHECKING:
    from lowvram.profiles import HardwareProfile

KeyMap = Callable[[str], str | None] | Mapping[str, str] | None
QUANT_SEP = "::"  # cache keys of quantized parts: "<module>.weight::<part>"


class TensorSource(Protocol):
    """What `load_quantized` reads from. `SafetensorsSource` is one; a models-side reader that converts keys or
    dequantizes fp8 checkpoints can be another. `get_rows` is optional (without it a weight is read whole)."""

    files: list[Path]  # fingerprinted for the quantized cache

    def keys(self) -> set[str]: ...  # model keys

    def get(self, model_key: str) -> torch.Tensor: ...

    def mapping(self) -> list[tuple[str, str]]: ...  # (source key, model key) pairs: part of the cache identity


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


_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    file: int
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsSource:
    """Model-keyed random access to the tensors of one or more .safetensors files, read with plain file reads.

    Each read lands in fresh memory that is freed with the tensor. Not memory-mapped: safetensors' default mmap
    backend keeps every touched page of the file resident (and counted in RSS) while the file is open, and its
    sliced reads of the pread backend read the whole tensor (measured: 0.2 s per 8 MiB slice of a 128 MiB tensor).
    """

    def __init__(self, files: Sequence[Path], key_map: KeyMap = None):
        self.files = [Path(f) for f in files]
        self.index: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for i, path in enumerate(self.files):
            if not path.is_file():
                raise LowvramError(f"checkpoint file {path} does not exist")
            header, data_start = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                model_key = _map_key(key, key_map)
                if model_key is not None:
                    begin, end = info["data_offsets"]
                    self.index[model_key] = _Entry(
                        i, key, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end
                    )
        self._handles = [open(path, "rb", buffering=0) for path in self.files]  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        for handle in self._handles:
            handle.close()

    def keys(self) -> set[str]:
        return set(self.index)

    def shape(self, model_key: str) -> tuple[int, ...]:
        return self.index[model_key].shape

    def mapping(self) -> list[tuple[str, str]]:
        """(checkpoint key, model key) pairs, sorted: part of the quantized cache's identity."""
        return sorted((entry.key, model) for model, entry in self.index.items())

    def get(self, model_key: str) -> torch.Tensor:
        entry = self.index[model_key]
        return self._read(entry, entry.begin, entry.end).reshape(entry.shape)

    def get_rows(self, model_key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (first dimension), reading only their bytes."""
        entry = self.index[model_key]
        row_bytes = (entry.end - entry.begin) // max(1, entry.shape[0])
        rows = self._read(entry, entry.begin + start * row_bytes, entry.begin + stop * row_bytes)
        return rows.reshape((stop - start, *entry.shape[1:]))

    def _read(self, entry: _Entry, begin: int, end: int) -> torch.Tensor:
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        handle = self._handles[entry.file]
        handle.seek(begin)
        done = 0
        while done < len(view):
            n = handle.readinto(view[done:])
            if not n:
                raise LowvramError(f"{self.files[entry.file]} is truncated (tensor {entry.key}): re-download it")
            done += n
        return buffer.view(entry.dtype)


class DictSource:
    """A `TensorSource` over tensors already in memory (a state dict), e.g. from another loader."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], key_map: KeyMap = None):
        self.files: list[Path] = []
        self.tensors = {}
        self.source_keys = {}
        for key, tensor in tensors.items():
            model_key = _map_key(key, key_map)
            if model_key is not None:
                self.tensors[model_key] = tensor
                self.source_keys[model_key] = key

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, model_key: str) -> torch.Tensor:
        return self.tensors[model_key]

    def mapping(self) -> list[tuple[str, str]]:
        return sorted((source, model) for model, source in self.source_keys.items())


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the offset where its data starts; refuses a malformed file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LowvramError(f"{path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 2**20):
            raise LowvramError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LowvramError(f"{path} is not a safetensors file (unreadable header)") from None
    data_start = 8 + header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise LowvramError(f"{path}: tensor {key} has an unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size - data_start:
            raise LowvramError(f"{path} is truncated or corrupt (tensor {key} lies outside the file)")
        itemsize = torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()
        if end - begin != itemsize * math.prod(info["shape"]):
            raise LowvramError(f"{path} is corrupt (tensor {key}: size does not match its shape)")
    return header, data_start


def _map_key(key: str, key_map: KeyMap) -> str | None:
    if key_map is None:
        return key
    if callable(key_map):
        return key_map(key)
    return key_map.get(key)


def expected_keys(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    """Parameter keys grouped by tie (names sharing one Parameter) and persistent buffer keys of a skeleton."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    buffers = []
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                buffers.append(f"{module_name}.{name}" if module_name else name)
    return list(groups.values()), buffers


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


def crc32(tensor: torch.Tensor) -> int:
    """Checksum of a tensor's bytes (zlib crc32, ~5 GB/s here): cheap enough to verify every cached tensor."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy())
