"""Quantized cache: quantize once, then load the quantized weights directly (one .safetensors + backend metadata).

Keyed by the source checkpoint's fingerprint (size, mtime, hash of header + first MiB), precision, dtype, exclude
list, key mapping, model shapes and library versions; every tensor carries a crc32. Not here: where caches live.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import torch
from torch import nn

from lowvram.errors import LowvramError
from lowvram.fsutil import clean_stale_temp_files, save_safetensors_atomic
from lowvram.quant.backends import QuantBackend
from lowvram.quant.precision import Precision
from lowvram.quant.source import QUANT_SEP, SafetensorsSource, crc32, expected_keys

FORMAT_VERSION = 1
METADATA_KEY = "lowvram_quant"
FINGERPRINT_HEAD_BYTES = 2**20


class CacheCorrupt(Exception):
    """A cached tensor does not match its checksum (found while loading)."""


def fingerprint(path: Path) -> dict:
    """Cheap identity of a checkpoint file: size, mtime and a hash of its safetensors header plus the first MiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        digest.update(head)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            digest.update(f.read(min(header_len, 100 * 2**20)))
        digest.update(f.read(FINGERPRINT_HEAD_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": digest.hexdigest()}


def _library_versions(precision: Precision) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    package = {"int8-quanto": "optimum-quanto", "nf4-bnb": "bitsandbytes"}.get(precision.value, "torchao")
    with contextlib.suppress(PackageNotFoundError):
        out[package] = version(package)
    return out


def cache_identity(
    files: list[Path],
    mapping: list[tuple[str, str]],
    precision: Precision,
    dtype: torch.dtype,
    exclude,
    model: nn.Module,
) -> dict:
    """Everything a cached result depends on (incl. the skeleton's parameter shapes); its sha256 is the cache key."""
    shapes = sorted((name, list(p.shape)) for name, p in model.named_parameters(remove_duplicate=False))
    ident = {
        "model_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "format": FORMAT_VERSION,
        "precision": precision.value,
        "dtype": str(dtype).removeprefix("torch."),
        "exclude": sorted(exclude),
        "files": [fingerprint(f) for f in files],
        "mapping_sha256": hashlib.sha256(json.dumps(mapping).encode()).hexdigest(),
        "versions": _library_versions(precision),
    }
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def _slot(files: list[Path], precision: Precision) -> str:
    """File-name prefix shared by every cache of the same source files and precision (older ones are stale)."""
    where = hashlib.sha256("\n".join(str(f.resolve()) for f in files).encode()).hexdigest()[:8]
    return f"{files[0].stem}-{where}-{precision.value}-"


def cache_file(cache_dir: Path, files: list[Path], precision: Precision, ident: dict) -> Path:
    return cache_dir / f"{_slot(files, precision)}{ident['key'][:16]}.safetensors"


class CacheReader:
    """Checked random access to a cache file: keys, per-module metadata, tensors verified against their crc32."""

    def __init__(self, path: Path, info: dict, source: SafetensorsSource):
        self.path = path
        self.info = info
        self.modules: dict[str, dict] = info["modules"]
        self.crc: dict[str, int] = info["crc32"]
        self.source = source

    def keys(self) -> set[str]:
        return set(self.crc)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.source.get(key)
        if crc32(tensor) != self.crc[key]:
            raise CacheCorrupt(f"tensor {key} of {self.path.name} fails its checksum")
        return tensor

    def close(self) -> None:
        self.source.close()


def open_cache(path: Path, ident: dict, model: nn.Module, quantized: set[str]) -> tuple[CacheReader | None, str | None]:
    """(reader, None) for a usable cache; (None, why) for a corrupt or mismatched one; (None, None) when absent."""
    if not path.is_file():
        return None, None
    try:
        source = SafetensorsSource([path])
        info = json.loads(source.metadata[METADATA_KEY])
        keys = source.keys()
    except (LowvramError, KeyError, ValueError, OSError) as err:  # unreadable, truncated, foreign: rebuild
        return None, f"corrupt: {type(err).__name__}: {str(err)[:160]}"
    reason = _mismatch(info, keys, ident, model, quantized)
    if reason:
        source.close()
        return None, reason
    return CacheReader(path, info, source), None


def _mismatch(info: dict, keys: set[str], ident: dict, model: nn.Module, quantized: set[str]) -> str | None:
    if info.get("identity", {}).get("key") != ident["key"]:
        return "stale: cache key differs from the source checkpoint and settings"
    if set(info.get("modules", {})) != quantized:
        return "stale: the cached set of quantized modules differs from this model's"
    if keys != set(info.get("crc32", {})):
        return "corrupt: tensor list does not match the checksum table"
    groups, _ = expected_keys(model)
    inside = tuple(f"{name}." for name in quantized)
    for group in groups:
        if not group[0].startswith(inside) and not any(k in keys for k in group):
            return f"corrupt: missing tensor {group[0]}"
    return None


def stale_reason(cache_dir: Path, files: list[Path], precision: Precision, current: Path) -> str | None:
    """Why there is no usable cache at `current`: an older cache of the same source exists (stale) or none does."""
    siblings = [p for p in cache_dir.glob(_slot(files, precision) + "*.safetensors") if p != current]
    return "stale: source checkpoint or settings changed since the cache was written" if siblings else None


def write_cache(path: Path, model: nn.Module, backend: QuantBackend, quantized: set[str], ident: dict) -> None:
    """Save the loaded model's quantized weights (atomic), then remove older caches of the same source."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name in sorted(quantized):
        module = model.get_submodule(name)
        parts, meta = backend.export(module)
        for part, tensor in parts.items():
            tensors[f"{name}.weight{QUANT_SEP}{part}"] = tensor
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()
        modules[name] = {"meta": meta, "parts": sorted(parts)}
    inside = tuple(f"{name}." for name in quantized)
    _, buffer_keys = expected_keys(model)
    for key, tensor in model.named_parameters():  # one entry per tied group
        if not key.startswith(inside):
            tensors[key] = tensor.detach()
    for key in buffer_keys:
        if not key.startswith(inside):
            tensors[key] = model.get_buffer(key)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    info = {"identity": ident, "modules": modules, "crc32": {k: crc32(t) for k, t in tensors.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent)
    save_safetensors_atomic(tensors, path, metadata={METADATA_KEY: json.dumps(info)})
    slot = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(slot + "*.safetensors"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
