"""Where quantized loading reads tensors from: safetensors files read positionally (no mmap of the whole file), an
in-memory state dict, and what both `stream.py` (the loader) and `cache.py` (the quantized cache) share about keys
and checksums. It imports neither of them.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lowvram.errors import LowvramError

KeyMap = Callable[[str], str | None] | Mapping[str, str] | None
QUANT_SEP = "::"  # cache keys of quantized parts: "<module>.weight::<part>"


class TensorSource(Protocol):
    """What `load_quantized` reads from. `SafetensorsSource` is one; a models-side reader that converts keys or
    dequantizes fp8 checkpoints can be another. `get_rows` is optional (without it a weight is read whole)."""

    files: list[Path]  # fingerprinted for the quantized cache

    def keys(self) -> set[str]: ...  # model keys

    def get(self, model_key: str) -> torch.Tensor: ...

    def mapping(self) -> list[tuple[str, str]]: ...  # (source key, model key) pairs: part of the cache identity


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


def crc32(tensor: torch.Tensor) -> int:
    """Checksum of a tensor's bytes (zlib crc32, ~5 GB/s here): cheap enough to verify every cached tensor."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy())
