"""What a dataset is: our own frozen dataclasses, filled from a folder + options or a SimpleTuner multidatabackend.json.

It validates keys and values (unknown keys refused with a suggestion, LTX-2's 8k+1 frames); it does not touch media.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram.errors import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
CAPTION_STRATEGIES = ("textfile", "filename")
BUCKET_STRATEGIES = ("aspect_ratio", "resolution_frames")
DATASET_TYPES = ("video", "image", "audio", "text_embeds")


def check_frames(frames: int) -> int:
    """LTX-2's video VAE compresses time 8x after a causal first frame, so a clip is 8k+1 frames (61 is not)."""
    if frames < 1 or (frames - 1) % 8:
        lo = max(1, (frames - 1) // 8 * 8 + 1)
        raise ConfigError(f"{frames} frames: LTX-2 needs 8k+1 frames: use {lo} or {lo + 8}")
    return frames


@dataclass(frozen=True)
class VideoOptions:
    num_frames: int = 17
    min_frames: int | None = None  # default: num_frames (shorter clips are skipped and counted)
    max_frames: int | None = None  # longer source clips are skipped (after resampling to frame_rate)
    frame_rate: float = 25.0
    bucket_strategy: str = "aspect_ratio"
    frame_interval: int | None = None  # resolution_frames: frame counts round down to this interval (then to 8k+1)

    def __post_init__(self):
        check_frames(self.num_frames)
        if self.bucket_strategy not in BUCKET_STRATEGIES:
            raise ConfigError(_choice_message("bucket_strategy", self.bucket_strategy, BUCKET_STRATEGIES))
        if self.frame_rate <= 0:
            raise ConfigError(f"video.frame_rate must be > 0, got {self.frame_rate}")

    @property
    def effective_min_frames(self) -> int:
        return self.min_frames if self.min_frames is not None else self.num_frames


@dataclass(frozen=True)
class AudioOptions:
    auto_split: bool = True  # take the clip's own audio track (SimpleTuner's name)
    sample_rate: int = 16000
    channels: int = 2
    duration_interval: float | None = None  # audio-only: seconds per training item
    audio_only: bool = False
    min_duration_seconds: float | None = None
    max_duration_seconds: float | None = None

    def __post_init__(self):
        if self.channels not in (1, 2):
            raise ConfigError(f"audio.channels must be 1 or 2, got {self.channels}")
        if self.sample_rate <= 0:
            raise ConfigError(f"audio.sample_rate must be > 0, got {self.sample_rate}")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset. `resolution` is the bucket area's edge: buckets keep the clip's aspect ratio at ~resolution²."""

    id: str
    instance_data_dir: Path
    dataset_type: str = "video"
    caption_strategy: str = "textfile"
    resolution: int | tuple[int, int] = 512  # int: area edge (pixel area); (w, h): one fixed bucket
    video: VideoOptions = field(default_factory=VideoOptions)
    audio: AudioOptions = field(default_factory=AudioOptions)
    repeats: int = 1
    cache_dir: Path | None = None
    s2v_datasets: tuple[str, ...] = ()
    # IC-LoRA: the folder of control clips (same file stems) and the scale they are cached at (1/N width, height)
    control_dir: Path | None = None
    control_downscale: int = 1
    conditioning_data: tuple[str, ...] = ()  # SimpleTuner: ids of the conditioning datasets paired with this one

    def __post_init__(self):
        from lowvram.paths import safe_name

        safe_name(self.id, what="dataset id")  # it names the dataset's folder inside the latent cache
        if self.dataset_type not in DATASET_TYPES:
            raise ConfigError(_choice_message("dataset_type", self.dataset_type, DATASET_TYPES))
        if self.caption_strategy not in CAPTION_STRATEGIES:
            raise ConfigError(_choice_message("caption_strategy", self.caption_strategy, CAPTION_STRATEGIES))
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if isinstance(self.resolution, tuple):
            for side in self.resolution:
                if side <= 0 or side % 32:
                    raise ConfigError(
                        f"resolution {self.resolution[0]}x{self.resolution[1]}: sides must be multiples of 32 "
                        f"(LTX-2's VAE compresses 32x): use {max(32, side // 32 * 32)} or {(side // 32 + 1) * 32}"
                    )
        elif self.resolution < 32:
            raise ConfigError(f"resolution {self.resolution} is too small: use at least 32")

    @property
    def audio_only(self) -> bool:
        return self.dataset_type == "audio" or self.audio.audio_only


@dataclass(frozen=True)
class DataConfig:
    """Every dataset of a run (text_embeds entries only say where the text cache goes)."""

    datasets: tuple[DatasetSpec, ...]
    text_cache_dir: Path | None = None


# --------------------------------------------------------------------------------------------------------------------
# SimpleTuner multidatabackend.json

_TOP_KEYS = {
    "id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "resolution", "video", "audio",
    "repeats", "cache_dir", "s2v_datasets", "default", "disabled", "conditioning_data", "conditioning_type",
    "source_dataset_id",
}  # fmt: skip
# SimpleTuner's conditioning types that pair files one to one by name (the control clip of an IC-LoRA); its 'mask'
# and 'reference_loose' ones mean other trainings.
CONDITIONING_TYPES = ("reference_strict", "controlnet")
_VIDEO_KEYS = {"num_frames", "min_frames", "max_frames", "frame_rate", "bucket_strategy", "frame_interval"}
_AUDIO_KEYS = {
    "auto_split", "sample_rate", "channels", "duration_interval", "audio_only", "min_duration_seconds",
    "max_duration_seconds",
}  # fmt: skip


def load_multidatabackend(path: str | Path, *, base_dir: str | Path | None = None) -> DataConfig:
    """Parse SimpleTuner's `multidatabackend.json` into a DataConfig; relative dirs resolve against `base_dir`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; point data_backend_config at your multidatabackend.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err}); fix the file or use data.dataset_dir") from None
    return parse_multidatabackend(raw, base_dir=Path(base_dir) if base_dir else Path.cwd(), source=str(path))


def parse_multidatabackend(raw: Any, *, base_dir: Path, source: str = "multidatabackend") -> DataConfig:
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise ConfigError(f"{source}: expected a JSON list of dataset objects")
    datasets, text_cache_dir, conditioning = [], None, {}
    for entry in raw:
        where = f"{source}: dataset '{entry.get('id', '?')}'"
        _refuse_unknown(entry, _TOP_KEYS, where)
        if entry.get("disabled", False):
            continue
        kind = entry.get("type", "local")
        if kind != "local":
            raise ConfigError(f"{where}: type '{kind}' is not supported; only 'local' folders are")
        dataset_type = entry.get("dataset_type", "video")
        if dataset_type == "conditioning":
            conditioning[str(entry.get("id", "?"))] = _conditioning_dir(entry, base_dir, where)
            continue
        if dataset_type == "text_embeds":
            if entry.get("cache_dir"):
                text_cache_dir = _resolve(entry["cache_dir"], base_dir)
            continue
        if "id" not in entry or "instance_data_dir" not in entry:
            raise ConfigError(f"{where}: needs 'id' and 'instance_data_dir'")
        video_raw = entry.get("video") or {}
        audio_raw = entry.get("audio") or {}
        _refuse_unknown(video_raw, _VIDEO_KEYS, where + " video")
        _refuse_unknown(audio_raw, _AUDIO_KEYS, where + " audio")
        try:
            video = VideoOptions(**video_raw)
            audio = AudioOptions(**audio_raw)
            datasets.append(
                DatasetSpec(
                    id=str(entry["id"]),
                    instance_data_dir=_resolve(entry["instance_data_dir"], base_dir),
                    dataset_type=dataset_type,
                    caption_strategy=entry.get("caption_strategy", "textfile"),
                    resolution=parse_resolution_value(entry.get("resolution", 512)),
                    video=video,
                    audio=audio,
                    repeats=int(entry.get("repeats", 1) or 1),
                    cache_dir=_resolve(entry["cache_dir"], base_dir) if entry.get("cache_dir") else None,
                    s2v_datasets=tuple(entry.get("s2v_datasets") or ()),
                    conditioning_data=_id_list(entry.get("conditioning_data")),
                )
            )
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from None
    if not datasets:
        raise ConfigError(f"{source}: no enabled video/image/audio dataset; add one with instance_data_dir")
    ids = {d.id for d in datasets}
    for d in datasets:
        for linked in d.s2v_datasets:
            if linked not in ids:
                raise ConfigError(f"{source}: dataset '{d.id}' links s2v dataset '{linked}', which is not defined")
    return DataConfig(datasets=tuple(_link_conditioning(datasets, conditioning, source)), text_cache_dir=text_cache_dir)


def _id_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _conditioning_dir(entry: dict, base_dir: Path, where: str) -> Path:
    """The folder of a SimpleTuner `dataset_type: conditioning` entry (the control clips of an IC-LoRA)."""
    kind = entry.get("conditioning_type", "reference_strict")
    if kind not in CONDITIONING_TYPES:
        raise ConfigError(f"{where}: conditioning_type '{kind}' is not supported; IC-LoRA control clips pair by file "
                          f"name: use one of {', '.join(CONDITIONING_TYPES)}")  # fmt: skip
    if "instance_data_dir" not in entry:
        raise ConfigError(f"{where}: a conditioning dataset needs 'instance_data_dir' (its control clips)")
    return _resolve(entry["instance_data_dir"], base_dir)


def _link_conditioning(datasets: list[DatasetSpec], conditioning: dict[str, Path], source: str) -> list[DatasetSpec]:
    """Each dataset with `conditioning_data` gets that conditioning dataset's folder as its control_dir."""
    from dataclasses import replace

    out = []
    for d in datasets:
        if not d.conditioning_data:
            out.append(d)
            continue
        unknown = [i for i in d.conditioning_data if i not in conditioning]
        if unknown:
            raise ConfigError(f"{source}: dataset '{d.id}' links conditioning dataset '{unknown[0]}', which is not "
                              "defined with dataset_type 'conditioning'")  # fmt: skip
        if len(d.conditioning_data) > 1:
            raise ConfigError(f"{source}: dataset '{d.id}' links {len(d.conditioning_data)} conditioning datasets; "
                              "an IC-LoRA takes one control clip per clip: link one")  # fmt: skip
        out.append(replace(d, control_dir=conditioning[d.conditioning_data[0]]))
    return out


def with_ic_lora(data: DataConfig, ic, source: str) -> DataConfig:
    """`data` as an IC-LoRA run (`ic`: the [ic_lora] section) reads it: every video dataset paired with its control
    clips (a linked conditioning dataset, else `ic.control_dir`, relative to the dataset's folder). Without IC-LoRA a
    conditioning link is refused: its control clips would not be trained on."""
    from dataclasses import replace

    if not ic.enabled:
        linked = next((d for d in data.datasets if d.control_dir is not None), None)
        if linked is not None:
            raise ConfigError(f"{source}: dataset '{linked.id}' links conditioning data: set ic_lora.enabled = true "
                              "to train an IC-LoRA on it, or remove the link")  # fmt: skip
        return data
    out = []
    for d in data.datasets:
        if d.audio_only:
            raise ConfigError(f"{source}: dataset '{d.id}' is audio-only, which IC-LoRA cannot condition (it pairs "
                              "video clips with control clips): remove it or set ic_lora.enabled = false")  # fmt: skip
        folder = d.control_dir if d.control_dir is not None else _resolve(ic.control_dir, d.instance_data_dir)
        out.append(replace(d, control_dir=folder, control_downscale=ic.reference_downscale))
    return replace(data, datasets=tuple(out))


def parse_resolution_value(value: Any) -> int | tuple[int, int]:
    """512 -> 512 (area edge); "832x480" -> (832, 480)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
    if m:
        return int(m.group(1)), int(m.group(2))
    if str(value).strip().isdigit():
        return int(str(value).strip())
    raise ConfigError(f"resolution '{value}' must be a number (e.g. 512) or WIDTHxHEIGHT (e.g. 832x480)")


def folder_dataset(
    folder: str | Path,
    *,
    resolution: int | tuple[int, int] = 512,
    frames: int = 17,
    fps: float = 25.0,
    min_frames: int | None = None,
    caption_strategy: str = "textfile",
    bucket_strategy: str = "aspect_ratio",
    repeats: int = 1,
    audio: bool = True,
) -> DatasetSpec:
    """The common case without a JSON file: one folder of clips with same-name .txt captions."""
    return DatasetSpec(
        id=Path(folder).name or "dataset",
        instance_data_dir=Path(folder),
        caption_strategy=caption_strategy,
        resolution=resolution,
        video=VideoOptions(num_frames=frames, min_frames=min_frames, frame_rate=fps, bucket_strategy=bucket_strategy),
        audio=AudioOptions(auto_split=audio),
        repeats=repeats,
    )


def _resolve(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base_dir / path


def _refuse_unknown(obj: dict, known: set[str], where: str) -> None:
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{where}: unknown key '{key}': {hint}")


def _choice_message(name: str, value: Any, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{name} '{value}' is not valid{hint}; choose one of: {', '.join(choices)}"
