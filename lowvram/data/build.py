"""`build_caches`: discover the dataset, fill the text and latent caches, and report every skipped item in one summary.

It never stops half-way for one bad file (skipped with a reason; fatal only with strict) and never leaves a partial
cache file. It does not load or free models: the caller hands in components already placed (phases do that).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.data.batches import CachedItem
from lowvram.data.dataset import Item, Skipped, discover
from lowvram.data.latent_cache import LatentEncoders, encode_items, entry_key, entry_state, latent_path, save_entry
from lowvram.data.media import BadItem
from lowvram.data.spec import DataConfig
from lowvram.data.text_cache import build_text_cache, text_fingerprint
from lowvram.errors import LowvramError
from lowvram.fsutil import atomic_write_json, clean_stale_temp_files
from lowvram.vae import VaeOptions

INDEX_NAME = "index.json"


@dataclass
class CacheSummary:
    items: list[CachedItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    latents_written: int = 0
    latents_reused: int = 0
    latents_rebuilt: dict[str, int] = field(default_factory=dict)  # 'stale' / 'corrupt' -> count
    texts_written: int = 0
    texts_reused: int = 0

    def format(self) -> str:
        """The one summary printed at the end of caching."""
        lines = [
            f"cached {len(self.items)} items in {len(self.buckets())} buckets: latents {self.latents_written} "
            f"written, {self.latents_reused} reused; captions {self.texts_written} encoded, {self.texts_reused} reused"
        ]
        for state, n in sorted(self.latents_rebuilt.items()):
            lines.append(f"rebuilt {n} {state} latent entries")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def buckets(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for it in self.items:
            counts[it.bucket] += 1
        return dict(counts)


def build_caches(
    data: DataConfig,
    components,
    cache_dir: str | Path,
    *,
    vae_options: VaeOptions = VaeOptions(),
    max_text_tokens: int = 1024,
    audio: bool = True,
    strict: bool = False,
    dtype: torch.dtype | None = None,
    text_fingerprint_override: str | None = None,
    text_batch_size: int = 1,
    progress: Callable[[int, int, Item, str], None] | None = None,
) -> CacheSummary:
    """Fill `cache_dir/text` and `cache_dir/latents` for every usable item of `data`; return the summary.

    `components` needs `video_vae`, `audio_vae`, `text_encoder`, `tokenizer`, `connectors` (an LTX2Components).
    The three steps below can also be called one by one, to load the text encoder only for the text step and the
    VAEs only for the latent step. `progress(done, total, item, state)` follows each latent (written/reused).
    """
    job = start_caching(data, strict=strict)
    cache_text(job, components, cache_dir, max_text_tokens=max_text_tokens, dtype=dtype,
               fingerprint=text_fingerprint_override, batch_size=text_batch_size)  # fmt: skip
    return cache_latents(job, components, cache_dir, vae_options=vae_options, audio=audio, strict=strict,
                         dtype=dtype, progress=progress)  # fmt: skip


@dataclass
class CacheJob:
    """Discovered items on their way through the text and latent steps."""

    items: list[Item]
    summary: CacheSummary
    text_paths: dict[str, Path] = field(default_factory=dict)  # caption -> text cache file


def start_caching(data: DataConfig, *, strict: bool = False) -> CacheJob:
    """Step 1: discover the items (no models needed). Bad items are listed, or fatal with strict."""
    items, skipped = discover(data)
    if strict and skipped:
        raise LowvramError(_strict_message(skipped))
    if not items:
        detail = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:3]) or "no media files found"
        raise LowvramError(f"no usable dataset items ({detail}); add clips with .txt captions or fix the paths")
    return CacheJob(items=items, summary=CacheSummary(skipped=list(skipped)))


def cache_text(
    job: CacheJob,
    components,
    cache_dir: str | Path,
    *,
    max_text_tokens: int = 1024,
    dtype: torch.dtype | None = None,
    fingerprint: str | None = None,
    batch_size: int = 1,
) -> None:
    """Step 2: the text cache (needs `text_encoder`, `tokenizer`, `connectors`)."""
    fingerprint = fingerprint or text_fingerprint(components, max_text_tokens)
    text = build_text_cache(
        [it.caption for it in job.items], components, Path(cache_dir), max_length=max_text_tokens,
        fingerprint=fingerprint, dtype=dtype, batch_size=batch_size,
    )  # fmt: skip
    job.text_paths = text.paths
    job.summary.texts_written, job.summary.texts_reused = text.written, text.reused


def cache_latents(
    job: CacheJob,
    components,
    cache_dir: str | Path,
    *,
    vae_options: VaeOptions = VaeOptions(),
    audio: bool = True,
    strict: bool = False,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int, Item, str], None] | None = None,
) -> CacheSummary:
    """Step 3: the latent cache (needs `video_vae`, `audio_vae`), then the index; returns the summary."""
    if not job.text_paths:
        raise LowvramError("the text cache step has not run: call cache_text before cache_latents")
    cache_dir = Path(cache_dir)
    summary = job.summary
    encoders = LatentEncoders.from_components(components, audio=audio)
    by_bucket: dict[str, list[Item]] = defaultdict(list)
    for it in job.items:
        by_bucket[it.bucket.key].append(it)
    done, total = 0, len(job.items)
    for folder in {latent_path(cache_dir, it).parent for it in job.items}:
        clean_stale_temp_files(folder)  # what a killed run left behind
    for bucket_items in by_bucket.values():
        pending: list[tuple[Item, Path, str]] = []
        for it in bucket_items:
            path = latent_path(cache_dir, it)
            try:
                key = entry_key(it, encoders)
            except OSError as err:
                summary.skipped.append(Skipped(it.path, f"cannot read ({err.strerror})"))
                continue
            state = entry_state(path, it, key)
            if state == "fresh":
                summary.latents_reused += 1
                summary.items.append(_cached(it, path, job.text_paths[it.caption]))
                done += 1
                if progress:
                    progress(done, total, it, "reused")
                continue
            if state in ("stale", "corrupt"):
                summary.latents_rebuilt[state] = summary.latents_rebuilt.get(state, 0) + 1
            pending.append((it, path, key))
        for start in range(0, len(pending), vae_options.batch_size):
            group = pending[start : start + vae_options.batch_size]
            for (it, path, key), tensors in _encode_group(group, encoders, vae_options, dtype, summary, strict):
                save_entry(path, tensors, it, key)
                summary.latents_written += 1
                summary.items.append(_cached(it, path, job.text_paths[it.caption]))
                done += 1
                if progress:
                    progress(done, total, it, "written")
    if not summary.items:
        first = summary.skipped[0]
        raise LowvramError(
            f"no dataset item could be cached ({len(summary.skipped)} skipped; first {first.path}: {first.reason}); "
            "fix the files or the dataset settings"
        )
    write_index(cache_dir, summary.items)
    return summary


def _encode_group(group, encoders, vae_options, dtype, summary, strict):
    """Encode a VAE batch; if one member is bad, encode the rest one by one so only the bad one is skipped."""
    try:
        return list(zip(group, encode_items([g[0] for g in group], encoders, vae_options, dtype), strict=True))
    except BadItem as err:
        if len(group) == 1:
            if strict:
                raise LowvramError(_strict_message([Skipped(group[0][0].path, str(err))])) from None
            summary.skipped.append(Skipped(group[0][0].path, str(err)))
            return []
    out = []
    for g in group:
        out += _encode_group([g], encoders, vae_options, dtype, summary, strict)
    return out


def _cached(it: Item, path: Path, text_path: Path) -> CachedItem:
    return CachedItem(path, text_path, it.bucket.key, it.caption, it.dataset_id, it.repeats)


def _strict_message(skipped: list[Skipped]) -> str:
    first = skipped[0]
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"bad dataset item {first.path}: {first.reason}{more}; fix or remove it, or run without --strict to skip"


def write_index(cache_dir: Path, items: list[CachedItem]) -> None:
    rows = [
        {"latent": str(i.latent_path), "text": str(i.text_path), "bucket": i.bucket, "caption": i.caption,
         "dataset_id": i.dataset_id, "repeats": i.repeats}
        for i in items
    ]  # fmt: skip
    atomic_write_json(Path(cache_dir) / INDEX_NAME, {"items": rows})


def read_index(cache_dir: str | Path) -> list[CachedItem]:
    """The items of the last completed `build_caches` (for a training run that resumes without re-probing media)."""
    path = Path(cache_dir) / INDEX_NAME
    try:
        rows = json.loads(path.read_text())["items"]
    except (OSError, ValueError, KeyError) as err:
        raise LowvramError(f"{path}: no usable cache index ({err}); run caching first") from None
    from lowvram.paths import check_inside

    # The index is a file on disk anyone could edit: its rows may only name files inside this cache.
    return [
        CachedItem(
            check_inside(r["latent"], cache_dir, what="cache index entry"),
            check_inside(r["text"], cache_dir, what="cache index entry"),
            r["bucket"], r["caption"], r["dataset_id"], r["repeats"],
        )
        for r in rows
    ]  # fmt: skip
