"""Text cache: the frozen connectors' outputs (video + audio embeddings and mask) per unique caption, in safetensors.

Caching after the connectors (not Gemma's 188160-wide stack) keeps ~16 MB per caption and keeps Gemma and the
connectors off the GPU during training. It does not choose when the text encoder is loaded or freed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.fsutil import clean_stale_temp_files, save_safetensors_atomic

TEXT_KEYS = ("video", "audio", "mask")

# LTX-2's connectors emit `[L, 3840]` twice (video and audio context) at L = 1024 Gemma tokens.
REAL_TEXT_TOKENS = 1024
REAL_CAPTION_CHANNELS = 3840


def text_cache_disk_bytes_per_item(
    tokens: int = REAL_TEXT_TOKENS, channels: int = REAL_CAPTION_CHANNELS, dtype_bytes: int = 2
) -> int:
    """Disk bytes of one cached caption: video + audio embeddings, an int8 mask, plus the safetensors header.

    Real model in bf16: 2 x 1024 x 3840 x 2 B = 15,728,640 B (+ 1 KiB mask and header) ~ 15.7 MB, under 16 MB.
    """
    header_bytes = 512  # JSON header with 3 tensor entries and our metadata, rounded up
    return 2 * tokens * channels * dtype_bytes + tokens + header_bytes


@dataclass(frozen=True)
class TextCacheResult:
    written: int
    reused: int
    paths: dict[str, Path]  # caption -> file


def caption_key(caption: str, fingerprint: str) -> str:
    return hashlib.sha256(json.dumps([caption, fingerprint]).encode("utf-8")).hexdigest()[:32]


def text_cache_path(cache_dir: Path, caption: str, fingerprint: str) -> Path:
    return Path(cache_dir) / "text" / f"{caption_key(caption, fingerprint)}.safetensors"


def text_fingerprint(components, max_length: int) -> str:
    """What the cached embeddings depend on: text encoder, tokenizer, connectors and the token length."""
    from lowvram.data.fingerprint import module_fingerprint

    tok = components.tokenizer
    parts = {
        "text_encoder": module_fingerprint(components.text_encoder),
        "connectors": module_fingerprint(components.connectors),
        "tokenizer": [type(tok).__name__, len(tok), getattr(tok, "padding_side", None)],
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build_text_cache(
    captions: list[str],
    components,
    cache_dir: Path,
    *,
    max_length: int,
    fingerprint: str | None = None,
    batch_size: int = 4,
    dtype: torch.dtype | None = None,
    encode_text=None,
) -> TextCacheResult:
    """Encode each unique caption once; reuse files whose key (caption + fingerprint) exists and loads."""
    if encode_text is None:
        from lowvram.models.ltx2.forward import encode_text
    fingerprint = fingerprint or text_fingerprint(components, max_length)
    clean_stale_temp_files(Path(cache_dir) / "text")
    unique = list(dict.fromkeys(captions))
    paths = {c: text_cache_path(cache_dir, c, fingerprint) for c in unique}
    todo = [c for c in unique if not _valid(paths[c], c, fingerprint)]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        emb = encode_text(components, batch, max_length)
        for i, caption in enumerate(batch):
            out_dtype = dtype or emb.video.dtype
            tensors = {
                "video": emb.video[i].to("cpu", out_dtype).contiguous(),
                "audio": emb.audio[i].to("cpu", out_dtype).contiguous(),
                "mask": emb.mask[i].to("cpu", torch.int8).contiguous(),
            }
            save_safetensors_atomic(tensors, paths[caption], {"caption": caption, "fingerprint": fingerprint})
    return TextCacheResult(written=len(todo), reused=len(unique) - len(todo), paths=paths)


def load_text_embedding(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _valid(path: Path, caption: str, fingerprint: str) -> bool:
    from lowvram.data.fingerprint import read_metadata

    meta = read_metadata(path, TEXT_KEYS)
    return meta is not None and meta.get("caption") == caption and meta.get("fingerprint") == fingerprint
