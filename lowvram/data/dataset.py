"""Dataset discovery: list a folder's clips, stills and audio files with captions and buckets, or why each was skipped.

It probes files (streams, size, length) but does not decode pixels or run models; caching does that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lowvram.data.buckets import Bucket, bucket_for_audio, bucket_for_video
from lowvram.data.media import BadItem, audio_duration_s, probe
from lowvram.data.spec import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DataConfig,
    DatasetSpec,
    folder_dataset,
    load_multidatabackend,
)


@dataclass(frozen=True)
class Item:
    """One training sample before caching."""

    dataset_id: str
    path: Path
    kind: str  # "video" | "image" | "audio"
    caption: str
    bucket: Bucket
    fps: float
    duration_s: float  # seconds of media the sample covers (audio length for the audio latent)
    audio_path: Path | None  # where its audio comes from (the clip itself, an s2v-linked file, or None)
    repeats: int = 1
    control_path: Path | None = None  # IC-LoRA: its control clip, cached beside it at 1/control_downscale size
    control_downscale: int = 1


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def discover(data: DataConfig) -> tuple[list[Item], list[Skipped]]:
    """Every usable item of every dataset, and every skipped file or folder with its reason (never raises on media)."""
    items: list[Item] = []
    skipped: list[Skipped] = []
    by_id = {d.id: d for d in data.datasets}
    for spec in data.datasets:
        if spec.audio_only and any(spec.id in d.s2v_datasets for d in data.datasets):
            continue  # an s2v audio dataset is consumed through the video dataset that links it
        got, bad = discover_dataset(spec, linked=[by_id[i] for i in spec.s2v_datasets])
        items += got
        skipped += bad
    return items, skipped


# Video and image formats people keep clips in that lowvram does not read (PyAV could, but buckets, fps and
# seeking are only checked for the formats in VIDEO_EXTENSIONS and IMAGE_EXTENSIONS).
UNSUPPORTED_MEDIA_EXTENSIONS = (".avi", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".m2ts", ".mts",
                                ".3gp", ".tif", ".tiff", ".heic")  # fmt: skip


def discover_dataset(spec: DatasetSpec, linked: list[DatasetSpec] = ()) -> tuple[list[Item], list[Skipped]]:
    folder = spec.instance_data_dir
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        return [], [Skipped(folder, f"cannot read folder ({err.strerror}); check the path and permissions")]
    wanted = AUDIO_EXTENSIONS if spec.audio_only else VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    items, skipped = [], []
    for name in names:
        path = folder / name
        ext = path.suffix.lower()
        if name.startswith("."):
            continue
        if ext not in wanted:
            if not spec.audio_only and ext in UNSUPPORTED_MEDIA_EXTENSIONS:
                # A clip the user meant to train on must not vanish silently: list it with what to do.
                skipped.append(Skipped(path, f"unsupported file type {ext}: convert it to {', '.join(wanted)}"))
            continue
        try:
            caption = read_caption(path, spec.caption_strategy)
            if spec.audio_only:
                items.append(_audio_item(spec, path, caption))
            else:
                items.append(_video_item(spec, path, caption, linked))
        except BadItem as err:
            skipped.append(Skipped(path, str(err)))
    return items, skipped


def read_caption(path: Path, strategy: str) -> str:
    if strategy == "filename":
        caption = path.stem.replace("_", " ").replace("-", " ").strip()
        if not caption:
            raise BadItem("empty caption (file name)")
        return caption
    txt = path.with_suffix(".txt")
    try:
        caption = txt.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BadItem(f"missing caption file {txt.name}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadItem(f"unreadable caption file {txt.name} ({err})") from None
    if not caption:
        raise BadItem(f"empty caption file {txt.name}")
    return " ".join(caption.split())


def _video_item(spec: DatasetSpec, path: Path, caption: str, linked: list[DatasetSpec]) -> Item:
    fps = spec.video.frame_rate
    # counting past num_frames (or max_frames, to refuse longer clips) changes nothing: stop there
    info = probe(path, fps, limit_frames=max(spec.video.num_frames, spec.video.max_frames or 0))
    if not info.has_video:
        raise BadItem("no video stream")
    kind = "image" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"
    bucket = bucket_for_video(spec, info, still=kind == "image")
    audio_path = None
    if spec.audio.auto_split and info.has_audio and kind == "video":
        audio_path = path
    for other in linked:  # s2v: the same-stem file of a linked audio dataset supplies the audio
        for ext in AUDIO_EXTENSIONS:
            candidate = other.instance_data_dir / (path.stem + ext)
            if candidate.is_file():
                audio_path = candidate
                break
    control = None if spec.control_dir is None else find_control_clip(spec, path, info, bucket, fps, kind)
    return Item(spec.id, path, kind, caption, bucket, fps, bucket.frames / fps, audio_path, spec.repeats, control,
                spec.control_downscale)  # fmt: skip


def find_control_clip(spec: DatasetSpec, path: Path, info, bucket: Bucket, fps: float, kind: str) -> Path:
    """The same-stem control clip of `path` in `spec.control_dir`, checked to fit the clip's bucket; BadItem names
    the file that is missing or why it cannot match."""
    folder = spec.control_dir
    found = [folder / (path.stem + ext) for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
             if (folder / (path.stem + ext)).is_file()]  # fmt: skip
    if not found:
        raise BadItem(f"missing control clip {folder / path.stem}.* (IC-LoRA pairs each clip with a same-stem "
                      f"control clip: add it or remove the clip)")  # fmt: skip
    control = found[0]
    k = spec.control_downscale
    if bucket.width % (32 * k) or bucket.height % (32 * k):
        raise BadItem(f"bucket {bucket.width}x{bucket.height} cannot hold a control clip at 1/{k} size (sides "
                      f"must be multiples of {32 * k}): change ic_lora.reference_downscale or resolution")  # fmt: skip
    ctrl = probe(control, fps, limit_frames=bucket.frames)
    if not ctrl.has_video:
        raise BadItem(f"control clip {control.name} has no video stream")
    if kind == "video" and ctrl.frames < bucket.frames:
        raise BadItem(f"control clip {control.name} has {ctrl.frames} frames at {fps:g} fps, the clip trains "
                      f"{bucket.frames}: give it at least as many frames")  # fmt: skip
    # Both are cover-cropped to the bucket: a different aspect ratio would crop them differently and misalign them.
    if abs(ctrl.width * info.height - info.width * ctrl.height) > 0.01 * info.width * ctrl.height:
        raise BadItem(f"control clip {control.name} is {ctrl.width}x{ctrl.height}, the clip {info.width}x"
                      f"{info.height}: give it the clip's aspect ratio so both crop alike")  # fmt: skip
    return control


def _audio_item(spec: DatasetSpec, path: Path, caption: str) -> Item:
    bucket, duration = bucket_for_audio(spec, audio_duration_s(path))
    return Item(spec.id, path, "audio", caption, bucket, 0.0, duration, path, spec.repeats)


def data_config_from_run(config) -> DataConfig:
    """Our DataConfig from a RunConfig's [data] section (a folder, or SimpleTuner's multidatabackend.json)."""
    from lowvram.data.spec import with_ic_lora

    data = config.data
    if data.data_backend_config:
        path = Path(data.data_backend_config)
        return with_ic_lora(load_multidatabackend(path, base_dir=path.parent), config.ic_lora, str(path))
    if not data.dataset_dir:
        from lowvram.errors import ConfigError

        raise ConfigError("no dataset: set data.dataset_dir (a folder of clips + .txt) or data.data_backend_config")
    spec = folder_dataset(
        data.dataset_dir,
        resolution=data.width_height,
        frames=data.frames,
        fps=data.fps,
        min_frames=data.min_frames,
        caption_strategy=data.caption_strategy,
        bucket_strategy=data.bucket_strategy,
        repeats=data.repeats,
        audio=data.audio,
    )
    return with_ic_lora(DataConfig(datasets=(spec,)), config.ic_lora, "data.dataset_dir")
