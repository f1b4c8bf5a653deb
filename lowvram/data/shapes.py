"""The clip shapes a run's data pipeline will cut, for the planner: every dataset, every bucket.

It reads the dataset specs and, where a bucket depends on the clips themselves, probes their headers the way caching
does (`discover_dataset`); it never decodes pixels, loads a model or writes a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowvram.data.spec import DatasetSpec


@dataclass(frozen=True, order=True)
class PlannedClip:
    """One bucket a batch can come from: (width, height, frames) at the dataset's frame rate."""

    width: int
    height: int
    frames: int
    fps: float
    dataset: str

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}@{self.frames}"


@dataclass(frozen=True)
class DataShapes:
    clips: tuple[PlannedClip, ...]  # every distinct bucket, per dataset
    source: str  # the file (or config keys) they come from
    notes: tuple[str, ...] = ()  # where a bucket had to be bounded instead of read from the clips


def data_shapes(cfg) -> DataShapes | None:
    """The buckets of `cfg`'s SimpleTuner multidatabackend (None without one: then `data.resolution` and
    `data.frames` are the run's largest clip, since a folder dataset crops every clip to that bucket or shorter).

    A dataset with a fixed `WxH` resolution has at most that bucket at its `video.num_frames`; one with an area
    `resolution` (SimpleTuner's integer) gets its buckets from its clips' aspect ratios, so its clips are probed as
    caching will probe them; when none can be read, a square bucket of that area at `num_frames` stands in (said in
    the notes). A missing multidatabackend file is not an error here (the plan can be made ahead of the data): None
    is returned and the caller says so.
    """
    from lowvram.data.dataset import data_config_from_run

    path = cfg.data.data_backend_config
    if not path or not Path(path).is_file():
        return None
    data = data_config_from_run(cfg)  # a malformed file is refused here, in one line, before anything runs
    by_id = {d.id: d for d in data.datasets}
    clips: set[PlannedClip] = set()
    notes: list[str] = []
    for spec in data.datasets:
        if spec.audio_only:
            continue  # audio-only items train through the audio branch: their length is not a video bucket
        clips.update(_dataset_clips(spec, [by_id[i] for i in spec.s2v_datasets if i in by_id], notes))
    return DataShapes(tuple(sorted(clips)), str(path), tuple(notes))


def _dataset_clips(spec: DatasetSpec, linked: list[DatasetSpec], notes: list[str]) -> set[PlannedClip]:
    fps = spec.video.frame_rate
    frames = 1 if spec.dataset_type == "image" else spec.video.num_frames
    if isinstance(spec.resolution, tuple):
        return {PlannedClip(*spec.resolution, frames, fps, spec.id)}
    from lowvram.data.dataset import discover_dataset

    items, _ = discover_dataset(spec, linked)
    found = {PlannedClip(it.bucket.width, it.bucket.height, it.bucket.frames, fps, spec.id) for it in items}
    if found:
        return found
    side = max(32, round(spec.resolution / 32) * 32)
    notes.append(
        f"dataset '{spec.id}': no readable clips in {spec.instance_data_dir}, so its buckets are unknown: planned for "
        f"{side}x{side}@{frames} (its resolution {spec.resolution} as a square); clips of another aspect ratio get "
        "buckets of about the same area"
    )
    return {PlannedClip(side, side, frames, fps, spec.id)}
