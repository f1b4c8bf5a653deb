"""Fingerprints that key the caches (models, source files) and a validity check for cached safetensors files.

A fingerprint changes when what a cache entry depends on changes; it is not a security hash of whole checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FIRST_BYTES = 1 << 20  # a source file is keyed by size, mtime and a hash of its first MB


def source_fingerprint(path: Path) -> dict:
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(FIRST_BYTES)).hexdigest()[:24]
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module) -> str:
    """Config + every tensor's name, shape, dtype and ~1024 evenly strided values (a weight update changes them).

    A strided sample, not a full hash or sum: a 12B-parameter text encoder fingerprints in milliseconds and without
    a float64 copy of its 1B-entry embedding.
    """
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(_jsonable(dict(config) if hasattr(config, "keys") else config.to_dict()),
                            sort_keys=True, default=str).encode())  # fmt: skip
    # Weights that live elsewhere (the text disk tier's layers hold placeholders) left their samples behind.
    stored = getattr(module, FINGERPRINT_SAMPLES_ATTR, None) or {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(stored[name] if name in stored else tensor_sample(name, t))
    return h.hexdigest()[:24]


FINGERPRINT_SAMPLES_ATTR = "_lowvram_fingerprint_samples"


def tensor_sample(name: str, t: torch.Tensor) -> bytes:
    """What `module_fingerprint` hashes for one tensor: name, shape, dtype and ~1024 evenly strided values."""
    out = f"{name}:{tuple(t.shape)}:{t.dtype}".encode()
    if t.device.type != "meta" and t.numel():
        try:
            flat = t.detach().reshape(-1)
            out += flat[:: max(1, flat.numel() // 1024)].to("cpu", torch.float32).numpy().tobytes()
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # quantized tensor subclasses: name, shape and config still key the entry
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def read_metadata(path: Path, required_keys) -> dict | None:
    """Metadata of a complete safetensors file holding `required_keys`; None if missing, truncated or corrupt.

    Completeness is checked from the header: the file must be exactly as long as its tensors' declared extent, which
    catches truncated and zero-byte files without reading the tensor data.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or 8 + header_len > size:
                return None
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if 8 + header_len + end != size or not set(required_keys) <= set(header):
        return None
    return meta
