"""One validated config for every option of a run: TOML native, SimpleTuner `config.json` accepted, CLI overrides.

This is the only module that parses run configuration. It validates values; it does not decide memory settings
(the planner does) and it never imports torch.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lowvram.errors import ConfigError
from lowvram.models.versions import FLAVOURS, VERSIONS, check_version

PRECISIONS = ("bf16", "fp32", "int8-quanto", "int8-torchao", "nf4-bnb", "fp8-torchao")
# SimpleTuner spellings of the same precisions ("no_change" keeps the checkpoint's dtype: bf16 for LTX-2).
PRECISION_ALIASES = {"no_change": "bf16"}
# SimpleTuner precisions lowvram trains with a different method: mapped only in a SimpleTuner import, and said so.
SIMPLETUNER_PRECISION_MAPPINGS = {
    "fp8-quanto": ("fp8-torchao", "lowvram's fp8 weights are torchao's (same e4m3 format, another backend)"),
    "int4-quanto": ("nf4-bnb", "lowvram's 4-bit method is bitsandbytes nf4 (no quanto int4)"),
}


def check_frames(frames: int) -> int:
    """LTX-2's video VAE compresses time by 8 with a causal first frame: clips are 8k+1 frames long."""
    if frames < 1 or (frames - 1) % 8 != 0:
        lo = max(1, (frames - 1) // 8 * 8 + 1)
        hi = lo + 8
        raise ValueError(f"LTX-2 needs 8k+1 frames: use {lo} or {hi}")
    return frames


# LTX-2 generates clips of up to 20 s (Lightricks' API: 20 s at 25 fps is its longest): a longer clip is almost
# always a typo, and measuring the VAE's frame-chunked options on it takes minutes of fake-tensor work (2001
# frames: 151 s of a 177 s plan, measured here). 8k+1 at most 20 s x 25 fps.
MAX_PLANNED_FRAMES = 497


def frames_limit_reason() -> str:
    return (
        f"lowvram plans clips of at most {MAX_PLANNED_FRAMES} frames (20 s at 25 fps, the longest LTX-2 clips); use "
        "fewer frames (8k+1, e.g. 121, 241 or 497)"
    )


def parse_resolution(value: str | int) -> tuple[int, int]:
    """`"832x480"` -> (width 832, height 480); an int N means N x N. Both sides must be multiples of 32."""
    if isinstance(value, int):
        w = h = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(value))
        if not m:
            if str(value).strip().isdigit():
                w = h = int(str(value).strip())
            else:
                raise ValueError(f"resolution '{value}' must look like WIDTHxHEIGHT, e.g. 832x480")
        else:
            w, h = int(m.group(1)), int(m.group(2))
    for side in (w, h):
        if side <= 0 or side % 32:
            lo, hi = max(32, side // 32 * 32), (side // 32 + 1) * 32
            raise ValueError(
                f"resolution {w}x{h}: each side must be a multiple of 32 (LTX-2's VAE compresses 32x): "
                f"use {lo} or {hi} instead of {side}"
            )
    return w, h


def _normalize_resolution(value: Any) -> str:
    w, h = parse_resolution(value if isinstance(value, int) else str(value))
    return f"{w}x{h}"


# Field types carrying LTX-2's shape rules, shared by the training data and the validation clip.
Frames = Annotated[int, AfterValidator(check_frames)]
Resolution = Annotated[str, BeforeValidator(_normalize_resolution)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # A config means the real model: the toy one only when asked for (the demo sets it itself).
    family: Literal["ltx2", "tiny"] = Field("ltx2", description="ltx2 = the real 19B model; tiny = CPU demo/test model")
    version: str | None = Field(
        None,
        description=f"LTX-2 release: {', '.join(VERSIONS)} (default: from the checkpoint or a hub id's release repo, "
        "else 2.0)",
    )
    flavour: Literal["dev", "dev-fp8", "dev-fp4", "distilled", "distilled-fp8"] = Field(
        "dev", description="official checkpoint flavour (picks the file of a hub id such as Lightricks/LTX-2)"
    )
    checkpoint: str | None = Field(
        None, description="official .safetensors file, a diffusers folder, or a hub id (Lightricks/LTX-2, repo:file)"
    )
    text_encoder_path: str | None = Field(None, description="Gemma3 folder (weights + tokenizer) or a hub id")
    cache_dir: str | None = Field(None, description="Hugging Face cache for hub ids (default: the standard HF cache)")
    precision: str = Field("bf16", description=f"base transformer precision: {', '.join(PRECISIONS)}")
    text_encoder_precision: str = Field("bf16", description="text encoder precision (same names)")
    quantized_cache_dir: str | None = Field(None, description="where quantized weights are cached (default: output)")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str | None:
        return None if v is None else check_version(v)

    @field_validator("precision", "text_encoder_precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> str:
        v = PRECISION_ALIASES.get(str(v), str(v))
        if v in SIMPLETUNER_PRECISION_MAPPINGS:
            other, why = SIMPLETUNER_PRECISION_MAPPINGS[v]
            raise ValueError(f"precision '{v}' is not supported: {why}; use '{other}'")
        if v not in PRECISIONS:
            close = difflib.get_close_matches(v, PRECISIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown precision '{v}'{hint}; valid: {', '.join(PRECISIONS)}")
        return v


class DataSection(Section):
    dataset_dir: str | None = Field(None, description="folder of clips with same-name .txt captions")
    data_backend_config: str | None = Field(None, description="SimpleTuner multidatabackend.json (instead of dir)")
    caption_strategy: Literal["textfile", "filename"] = Field("textfile", description="where captions come from")
    resolution: Resolution = Field("832x480", description="training bucket WIDTHxHEIGHT, multiples of 32")
    frames: Frames = Field(17, description="frames per clip, 8k+1 (17, 33, 49, 57, 65, 81, ...)")
    fps: float = Field(25.0, gt=0, description="frame rate clips are resampled to")
    min_frames: int | None = Field(None, ge=1, description="skip clips shorter than this (default: frames)")
    audio: bool = Field(True, description="train the audio branch too (clips without audio get the loss masked)")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = Field("aspect_ratio", description="bucketing")
    repeats: int = Field(1, ge=1, description="times each sample is seen per epoch")
    cache_dir: str | None = Field(None, description="text/latent caches (default: OUTPUT/cache)")
    max_text_tokens: int = Field(1024, ge=1, description="Gemma3 token length (left padded)")
    strict: bool = Field(False, description="a bad dataset item is fatal instead of skipped")

    @property
    def width_height(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)


class MemorySection(Section):
    """Memory settings. `None` means: let the planner choose for the profile."""

    profile: str | None = Field(None, description="hardware profile name or .toml path (default: probe)")
    vram_safety_margin: float = Field(0.10, ge=0, lt=1, description="share of usable VRAM the plan keeps free")
    ramtorch: bool | float | str | None = Field(
        None, description="stream frozen Linear weights from pinned RAM: true, a share 0-1, or a glob of modules"
    )
    ramtorch_text_encoder: bool | None = Field(None, description="stream the text encoder's Linear weights too")
    text_encoder_on_disk: bool | None = Field(
        None, description="while caching text, stream Gemma's decoder layers from the disk tier (memory.disk_tier_dir)"
    )
    blocks_to_swap: int | None = Field(None, ge=0, description="block swap: transformer blocks kept on the host")
    block_swap_device: Literal["cpu"] = Field("cpu", description="where swapped blocks live")
    swap_tier: Literal["pinned", "pageable"] | None = Field(
        None, description="where swapped blocks' masters live in RAM: pinned, or pageable + a pinned staging ring"
    )
    blocks_on_disk: int | None = Field(None, ge=0, description="of the swapped blocks, how many are read from disk")
    disk_tier_dir: str | None = Field(None, description="folder of the disk tier's weight file (default OUTPUT/cache)")
    group_offload: bool | None = Field(None, description="diffusers group offload of the transformer")
    group_offload_type: Literal["block_level", "leaf_level"] = Field("block_level", description="group granularity")
    group_offload_blocks_per_group: int = Field(1, ge=1, description="blocks per group (block_level)")
    group_offload_use_stream: bool = Field(False, description="overlap group onload with compute on a side stream")
    gradient_checkpointing: bool | None = Field(None, description="recompute block activations in backward")
    activation_offload: bool | None = Field(None, description="keep checkpointed block inputs in pinned host RAM")
    offload_during_startup: bool | None = Field(
        None, description="phase startup: text encoder -> cache -> free; VAE -> cache -> free; then transformer"
    )
    vae_tiling: bool | None = Field(None, description="VAE spatial (and temporal) tiling while caching")
    vae_slicing: bool | None = Field(None, description="encode one sample of a batch at a time")
    vae_patch_conv: bool | None = Field(None, description="temporal chunking of the VAE's causal Conv3d (exact)")
    vae_temporal_roll: bool | None = Field(None, description="roll a causal cache through the VAE frame-group-wise")
    vae_batch_size: int = Field(1, ge=1, description="clips per VAE encode call")

    @model_validator(mode="after")
    def _one_text_encoder_placement(self):
        if self.text_encoder_on_disk and self.ramtorch_text_encoder:
            raise ValueError(
                "memory.text_encoder_on_disk and memory.ramtorch_text_encoder both stream the text encoder: "
                "set one of them to false"
            )
        return self


class LoraSection(Section):
    rank: int = Field(16, ge=1, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="module names or globs to adapt (all attention modules incl. audio and a/v cross by default)",
    )
    format: Literal["comfy", "diffusers"] = Field("comfy", description="exported key naming")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="dtype of the exported LoRA file (the adapter trains in its own dtype)"
    )


class OptimSection(Section):
    optimizer: Literal["adamw", "adamw_bf16", "adamw8bit"] = Field("adamw", description="optimizer")
    learning_rate: float = Field(1e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="schedule after warmup")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warmup steps")


class TreadRoute(Section):
    selection_ratio: float = Field(gt=0, lt=1, description="share of video tokens routed around the layers")
    start_layer_idx: int = Field(description="first routed block (negative counts from the end)")
    end_layer_idx: int = Field(description="last routed block (negative counts from the end)")


# First-frame conditioning probability of each training task when none is stated (the official trainer's configs).
TASK_CONDITIONING_P = {"t2v": 0.0, "i2v": 0.5}


class TrainSection(Section):
    batch_size: int = Field(1, ge=1, description="clips per step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_train_steps: int = Field(100, ge=0, description="optimizer steps (0 = use epochs)")
    num_train_epochs: int = Field(0, ge=0, description="epochs when max_train_steps is 0")
    seed: int = Field(42, description="random seed")
    mode: Literal["av", "video", "audio"] = Field("av", description="train audio+video, video only or audio only")
    sigma_sampling: Literal["shifted_logit_normal", "uniform", "fixed_shift"] = Field(
        "shifted_logit_normal", description="flow-matching sigma distribution"
    )
    fixed_shift: float = Field(1.0, gt=0, description="shift for sigma_sampling=fixed_shift")
    independent_audio_sigma: bool = Field(True, description="draw the audio sigma independently of the video's")
    task: Literal["t2v", "i2v"] = Field(
        "t2v", description="t2v: text-to-video (no first-frame conditioning); i2v: image-to-video (first frame clean)"
    )
    first_frame_conditioning_p: float | None = Field(
        None, ge=0, le=1, description="share of samples conditioned on a clean first frame (default: t2v 0, i2v 0.5)"
    )
    audio_loss_weight: float = Field(1.0, ge=0, description="weight of the audio loss")
    tread_routes: list[TreadRoute] = Field(default_factory=list, description="TREAD token routing")
    mixed_precision: Literal["bf16", "fp32"] = Field("bf16", description="compute dtype of the transformer")

    @model_validator(mode="after")
    def _task(self) -> TrainSection:
        if self.task == "i2v" and self.first_frame_conditioning_p == 0:
            raise ValueError(
                "train.task = 'i2v' with first_frame_conditioning_p = 0 never conditions on the first frame: "
                "use task = 't2v' or a probability above 0"
            )
        return self

    @property
    def conditioning_p(self) -> float:
        """The first-frame conditioning probability the run uses: the stated one, else the task's official default
        (Lightricks' t2v_lora.yaml has no first-frame condition; i2v_lora.yaml uses probability 0.5)."""
        if self.first_frame_conditioning_p is not None:
            return self.first_frame_conditioning_p
        return TASK_CONDITIONING_P[self.task]


class CheckpointSection(Section):
    every_n_steps: int = Field(100, ge=0, description="save a resumable checkpoint every N steps (0 = only at end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder")
    start_over: bool = Field(
        False, description="start at step 0 although the folder holds a run (or none of its checkpoints verifies); "
        "its files are moved to previous-runs/, not deleted"
    )


def _adapter_scale(value: Any) -> float:
    # A LoRA strength: any finite number (negative subtracts the adapter); not a bool, not text.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("scale must be a number")
    try:
        scale = float(value)
    except ValueError:
        raise ValueError("scale must be a number") from None
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError("scale must be a finite number")
    return scale


class ValidationAdapter(Section):
    """One LoRA stacked on the LoRA being trained for validation only (lowvram/models/adapter_files.py)."""

    path: str = Field(..., min_length=1, description="a .safetensors file, a folder, or a hub id org/name[:file]")
    weight_name: str | None = Field(None, description="the file inside the folder or hub repo")
    scale: Annotated[float, BeforeValidator(_adapter_scale)] = Field(1.0, description="LoRA strength")
    label: str | None = Field(None, description="name in outputs (default: the file's stem)")


class ValidationAdapterSet(Section):
    """Adapters stacked together for one validation render (none: the LoRA being trained alone)."""

    label: str | None = Field(None, description="output folder name (default: from its adapters, or 'lora')")
    adapters: list[ValidationAdapter] = Field(default_factory=list)
    guidance: float | None = Field(None, ge=0, description="guidance of this set (default: validation.guidance)")
    steps: int | None = Field(None, ge=1, description="denoising steps (default: validation.num_inference_steps)")


class ValidationSection(Section):
    enabled: bool = Field(False, description="render a validation clip with the LoRA")
    prompt: str = Field("a red circle moving from left to right", description="validation prompt")
    every_n_steps: int = Field(0, ge=0, description="validate every N steps (0 = only at the end)")
    resolution: Resolution = Field("256x256", description="validation WIDTHxHEIGHT")
    num_frames: Frames = Field(17, description="validation frames, 8k+1")
    num_inference_steps: int = Field(20, ge=1, description="denoising steps")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale")
    seed: int = Field(42, description="validation seed")
    prompts: list[str] | str | None = Field(
        None, description="validation prompts: a list, or a text file with one per line (default: [prompt])"
    )
    negative_prompt: str = Field("", description="negative prompt for classifier-free guidance")
    offload_optimizer: bool | None = Field(
        None, description="move optimizer state off the device while validating (default: planner chooses)"
    )
    vae_tiling: bool | None = Field(None, description="tiled VAE decode for validation (default: planner chooses)")
    # Conditioning inputs (lowvram/train/validation_inputs.py): I2V from a first frame, S2V from held audio.
    reference_image: str | None = Field(None, description="I2V: image (or clip) whose first frame conditions")
    reference_from_dataset: str | None = Field(None, description="I2V: first frame of this dataset's first clip")
    reference_audio: str | None = Field(None, description="S2V: audio file the video is generated for")
    reference_audio_from_dataset: str | None = Field(
        None, description="S2V: cached audio latents of this dataset's first clip with audio"
    )

    adapters: list[ValidationAdapter] = Field(
        default_factory=list, description="adapters rendered one at a time, each stacked on the LoRA being trained"
    )
    adapter_sets: list[ValidationAdapterSet] = Field(
        default_factory=list, description="renders, each with its adapters stacked and its own guidance/steps"
    )

    @model_validator(mode="after")
    def _one_reference_each(self) -> ValidationSection:
        for a, b in (("reference_image", "reference_from_dataset"),
                     ("reference_audio", "reference_audio_from_dataset")):  # fmt: skip
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"validation.{a} and validation.{b} are both set: keep one of them")
        return self

    @model_validator(mode="after")
    def _one_adapter_form(self) -> ValidationSection:
        if self.adapters and self.adapter_sets:
            raise ValueError("give validation.adapters (one render per adapter) or validation.adapter_sets, not both")
        return self


TRACKERS = ("tensorboard", "wandb", "trackio")


def _trackers(value: Any) -> list[str]:
    # SimpleTuner writes one string ("wandb", "tensorboard,wandb", "none"); TOML writes a list.
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    items = [v for v in items if v and v != "none"]
    for v in items:
        if v not in TRACKERS:
            hint = " (name them)" if v == "all" else ""
            raise ValueError(f"unknown tracker '{v}'{hint}; valid: {', '.join(TRACKERS)} or none")
    return list(dict.fromkeys(items))


class ScheduledSamplingSection(Section):
    """Rollout before the training step (lowvram/method/modes/scheduled_sampling.py)."""

    enabled: bool = Field(False, description="roll noisy inputs out with the model's own predictions before a step")
    probability: float = Field(0.5, ge=0, le=1, description="share of samples rolled out")
    steps: int = Field(1, ge=1, le=16, description="no-grad Euler denoising steps per rolled-out sample")
    sigma_step: float = Field(
        0.025, gt=0, le=1, description="sigma distance of one rollout step (0.025 = a 40-step sampler's step)"
    )


class CrepaSection(Section):
    """CREPA temporal regularizer (lowvram/method/modes/crepa.py); defaults are SimpleTuner's crepa_* defaults."""

    enabled: bool = Field(False, description="align a block's video hidden states with cached DINOv2 frame features")
    block_index: int = Field(8, ge=0, description="transformer block (0-based) whose video output is aligned")
    weight: float = Field(0.5, ge=0, description="the auxiliary loss's weight (SimpleTuner crepa_lambda)")
    adjacent_distance: int = Field(1, ge=0, description="frame offset d of the neighbours aligned (0: own frame only)")
    temporal_decay: float = Field(1.0, gt=0, description="neighbour weight exp(-d / temporal_decay) (SimpleTuner tau)")
    encoder: str = Field(
        "facebook/dinov2-giant", min_length=1, description="DINOv2 weights: a local folder or a hub id in the hub cache"
    )
    image_size: int = Field(518, ge=14, description="frames are resized to image_size x image_size for DINOv2")


class IcLoraSection(Section):
    """IC-LoRA (in-context control, video-to-video): clean control-clip latents ride along as extra video tokens at
    timestep 0, outside the loss (lowvram/method/modes/ic_lora.py; the official trainer's video_to_video strategy)."""

    enabled: bool = Field(False, description="train an IC-LoRA: each clip is paired with its control clip")
    control_dir: str = Field(
        "control", min_length=1, description="control clips folder, same file stems (relative: in the dataset folder)"
    )
    reference_downscale: int = Field(
        1, ge=1, le=8, description="control clips cached at 1/N of the width and height (reference_downscale_factor)"
    )


class OutputSection(Section):
    output_dir: str = Field("output", description="run folder: LoRA, checkpoints, metrics.jsonl, memory.jsonl")
    report_to: Annotated[list[str], BeforeValidator(_trackers)] = Field(
        default_factory=list, description="experiment trackers mirroring metrics.jsonl: tensorboard, wandb, trackio"
    )
    tracker_project_name: str = Field("lowvram", min_length=1, description="tracker project (wandb/trackio)")
    tracker_run_name: str | None = Field(None, description="tracker run name (default: the output folder's name)")


class RunConfig(Section):
    """Every option of a run. TOML sections mirror these fields: [model], [data], [memory], ..."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    lora: LoraSection = Field(default_factory=LoraSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    scheduled_sampling: ScheduledSamplingSection = Field(default_factory=ScheduledSamplingSection)
    crepa: CrepaSection = Field(default_factory=CrepaSection)
    ic_lora: IcLoraSection = Field(default_factory=IcLoraSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model.family == "ltx2" and self.train.mode == "audio" and not self.data.audio:
            raise ValueError("train.mode='audio' needs data.audio=true")
        if self.crepa.enabled and self.train.mode == "audio":
            raise ValueError("crepa.enabled = true needs video: an audio-only run (train.mode='audio') has no frames")
        if self.train.max_train_steps == 0 and self.train.num_train_epochs == 0:
            raise ValueError("train.max_train_steps and train.num_train_epochs are both 0: set one of them above 0")
        self._validation_references()
        if self.ic_lora.enabled:
            _check_ic_lora(self)
        return self

    def _validation_references(self) -> None:
        v = self.validation
        image = "reference_image" if v.reference_image is not None else "reference_from_dataset"
        audio = "reference_audio" if v.reference_audio is not None else "reference_audio_from_dataset"
        for key, used in ((image, getattr(v, image) is not None), (audio, getattr(v, audio) is not None)):
            if used and not v.enabled:
                raise ValueError(f"validation.{key} is set but validation.enabled is false: enable validation, or "
                                 "remove it")  # fmt: skip
        if getattr(v, image) is not None and self.train.mode == "audio":
            raise ValueError(f"validation.{image} (image-to-video) on an audio-only run (train.mode = 'audio') has "
                             "no video to condition: remove it, or train.mode = 'av'")  # fmt: skip
        if getattr(v, audio) is not None and (self.train.mode == "video" or not self.data.audio):
            why = "train.mode = 'video'" if self.train.mode == "video" else "data.audio = false"
            raise ValueError(f"validation.{audio} (audio-to-video) on a run without audio ({why}) has no audio "
                             "to hold: remove it, or train audio and video (train.mode = 'av')")  # fmt: skip

    def dotted(self) -> dict[str, Any]:
        """Flat `{"section.key": value}` view (what `lowvram plan --json` reports as settings)."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _check_ic_lora(cfg: RunConfig) -> None:
    """Combinations IC-LoRA cannot train, refused in one line each (pydantic prefixes the section)."""
    ic = cfg.ic_lora
    if cfg.train.mode == "audio":
        raise ValueError("ic_lora.enabled = true needs video, but train.mode = 'audio' has no video tokens to "
                         "condition: use train.mode = 'video' (the official v2v setup) or 'av'")  # fmt: skip
    if cfg.train.tread_routes:
        # TreadRouter picks its routed share among all video tokens: the reference tokens would be dropped too.
        raise ValueError("train.tread_routes would route (drop) the IC-LoRA reference tokens with the rest: remove "
                         "train.tread_routes or set ic_lora.enabled = false")  # fmt: skip
    if cfg.validation.enabled:
        raise ValueError("validation.enabled = true renders text-to-video clips without a control clip, which does "
                         "not show an IC-LoRA: set validation.enabled = false")  # fmt: skip
    w, h = cfg.data.width_height
    step = 32 * ic.reference_downscale
    if w % step or h % step:
        raise ValueError(
            f"ic_lora.reference_downscale = {ic.reference_downscale} needs data.resolution sides that are multiples "
            f"of {step} (the control latents must tile the clip's exactly), got {w}x{h}: change one of them"
        )


# ---------------------------------------------------------------------------------------------------------------
# SimpleTuner config.json -> our keys. Values are dotted paths, or a callable (value, out) -> None for reshaping.


def _set(out: dict, dotted: str, value: Any) -> None:
    section, key = dotted.split(".", 1)
    out.setdefault(section, {})[key] = value


def _st_resolution(value: Any, out: dict) -> None:
    # SimpleTuner's integer resolution is the shorter edge; we train landscape buckets of that height by default.
    if isinstance(value, (int, float)) or str(value).strip().isdigit():
        h = int(float(value))
        w = (h * 16 // 9) // 32 * 32
        _set(out, "data.resolution", f"{w}x{h}")
    else:
        _set(out, "data.resolution", str(value))


def _st_model_type(value: Any, out: dict) -> None:
    if str(value) != "lora":
        raise ValueError(f"model_type '{value}' is not supported: lowvram trains LoRA only (use \"lora\")")


def _st_family(value: Any, out: dict) -> None:
    families = {"ltxvideo2": "ltx2", "ltx2": "ltx2", "ltx-2": "ltx2", "tiny": "tiny"}
    if str(value) not in families:
        raise ValueError(f"model_family '{value}' is not supported: lowvram trains LTX-2 (use \"ltxvideo2\")")
    _set(out, "model.family", families[str(value)])


def _st_flavour(value: Any, out: dict) -> None:
    # SimpleTuner's ltxvideo2 flavours ("dev", "dev-fp8", "2.0", ...) and the 2.3 / 2.5 ones name the release too.
    key = str(value).strip().lower()
    if key not in FLAVOURS:
        raise ValueError(f"model_flavour '{value}' is not an LTX-2 flavour: use one of {', '.join(FLAVOURS)}")
    version, flavour = FLAVOURS[key]
    _set(out, "model.version", version)
    _set(out, "model.flavour", flavour)


def _st_tread(value: Any, out: dict) -> None:
    routes = (value or {}).get("routes", []) if isinstance(value, dict) else value
    _set(out, "train.tread_routes", routes)


def _st_epochs(value: Any, out: dict) -> None:
    _set(out, "train.num_train_epochs", value)


def _st_rollout_offset(value: Any, out: dict) -> None:
    # SimpleTuner rolls out when max_step_offset > 0: lowvram's rollout is switched on by the same key.
    steps = int(value)
    if steps > 0:
        _set(out, "scheduled_sampling.enabled", True)
        _set(out, "scheduled_sampling.steps", steps)
        _set(out, "scheduled_sampling.sigma_step", 0.001)  # its offsets count 1000-step DDPM timesteps


# SimpleTuner names DINOv2 by its torch hub entry point (dinov2_vitg14); lowvram loads transformers' Dinov2Model from
# safetensors, so the torch hub names map to the same checkpoints' hub repos (facebook/dinov2-*).
CREPA_ENCODERS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_s": "facebook/dinov2-small",
    "dino_v2_s": "facebook/dinov2-small",
    "dinov2-vitb14": "facebook/dinov2-base",
    "dinov2_g": "facebook/dinov2-giant",
    "dino_v2_g": "facebook/dinov2-giant",
    "dinov2-vitg14": "facebook/dinov2-giant",
}


def _st_crepa_encoder(value: Any, out: dict) -> None:
    if value:
        name = str(value).strip()
        _set(out, "crepa.encoder", CREPA_ENCODERS.get(name.lower(), name))


def _st_validation_disable(value: Any, out: dict) -> None:
    _set(out, "validation.enabled", not bool(value))


def _st_prompt_library(value: Any, out: dict) -> None:
    # SimpleTuner: {"shortname": "prompt", ...} (or a list); lowvram renders each prompt in order.
    prompts = list(value.values()) if isinstance(value, dict) else value
    _set(out, "validation.prompts", prompts)


_ST_ADAPTER_MODES = ("adapter_only", "comparison", "none")
# SimpleTuner's validation_adapter_config entry keys (simpletuner/helpers/.../validation_adapters.py).
_ST_ADAPTER_ENTRY_KEYS = {"label", "name", "path", "paths", "adapters", "strength", "scale", "adapter_name"}


def _st_adapter(value: Any, strength: Any, label: Any = None) -> dict:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "strength", "scale", "adapter_name"})
        if unknown or "path" not in value:
            raise ValueError(f"an adapter needs 'path' (and optionally strength, adapter_name): got {sorted(value)}")
        strength = value.get("strength", value.get("scale", strength))
        label, value = value.get("adapter_name") or label, value["path"]
    adapter = {"path": str(value), "scale": 1.0 if strength is None else strength}
    return {**adapter, "label": label} if label else adapter


def _st_validation_adapters(raw: dict[str, Any], out: dict) -> None:
    """SimpleTuner's validation adapters -> `validation.adapter_sets` (same runs, same order).

    As SimpleTuner: `validation_adapter_path` (org/repo[:file] or a local path) with `_name` / `_strength` is one
    run; `_mode` "adapter_only" (its default) renders only that run, "comparison" the plain LoRA first, "none" no
    adapter. `validation_adapter_config` (a list, {"runs": [...]}, inline JSON or a JSON file) is one run per entry
    after the plain LoRA's; it excludes `validation_adapter_path`.
    """
    get = {k.lstrip("-"): v for k, v in raw.items()}.get
    path, config = get("validation_adapter_path"), get("validation_adapter_config")
    mode = str(get("validation_adapter_mode") or "adapter_only").strip().lower()
    if mode not in _ST_ADAPTER_MODES:
        raise ValueError(f"'validation_adapter_mode': {mode!r} is not one of {', '.join(_ST_ADAPTER_MODES)}")
    if path and config:
        raise ValueError("'validation_adapter_path' and 'validation_adapter_config' exclude each other: keep one")
    plain = {"label": "lora", "adapters": []}
    if path and mode != "none":
        single = _st_adapter(path, get("validation_adapter_strength"), get("validation_adapter_name"))
        run = {"adapters": [single], **({"label": single["label"]} if "label" in single else {})}
        _set(out, "validation.adapter_sets", [plain, run] if mode == "comparison" else [run])
    if not config:
        return
    if isinstance(config, str):
        text = config.strip()
        if not text.startswith(("[", "{")):
            try:
                text = Path(text).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"'validation_adapter_config': cannot read {config} ({type(e).__name__})") from None
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"'validation_adapter_config': malformed JSON at line {e.lineno}: {e.msg}") from None
    entries = config.get("runs", [config]) if isinstance(config, dict) else config
    if not isinstance(entries, list):
        raise ValueError("'validation_adapter_config' must be a list of runs or an object with a 'runs' list")
    sets = [plain]
    for i, entry in enumerate(entries):
        where = f"'validation_adapter_config' run {i}"
        if isinstance(entry, str):
            sets.append({"adapters": [_st_adapter(entry, None)]})
            continue
        if not isinstance(entry, dict) or set(entry) - _ST_ADAPTER_ENTRY_KEYS:
            extra = sorted(set(entry) - _ST_ADAPTER_ENTRY_KEYS) if isinstance(entry, dict) else entry
            raise ValueError(f"{where}: unknown {extra!r}; use label, path or adapters/paths, strength, adapter_name")
        strength = entry.get("strength", entry.get("scale"))
        label = entry.get("label") or entry.get("name")
        try:
            if "path" in entry and "paths" not in entry and "adapters" not in entry:
                adapters = [_st_adapter(entry["path"], strength, entry.get("adapter_name"))]
            else:
                items = entry.get("adapters", entry.get("paths")) or []
                if not isinstance(items, list) or not items:
                    raise ValueError("'adapters'/'paths' must be a non-empty list")
                adapters = [_st_adapter(a, strength, None if isinstance(a, dict) else entry.get("adapter_name"))
                            for a in items]  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        sets.append({"adapters": adapters, **({"label": label} if label else {})})
    _set(out, "validation.adapter_sets", sets)


SIMPLETUNER_KEYS: dict[str, Any] = {
    "model_family": _st_family,
    "model_flavour": _st_flavour,
    "model_type": _st_model_type,
    "pretrained_model_name_or_path": "model.checkpoint",
    "pretrained_vae_model_name_or_path": "model.checkpoint",
    "text_encoder_path": "model.text_encoder_path",
    "base_model_precision": "model.precision",
    "text_encoder_1_precision": "model.text_encoder_precision",
    "quantize_via": None,
    "ramtorch": "memory.ramtorch",
    "ramtorch_text_encoder": "memory.ramtorch_text_encoder",
    "musubi_blocks_to_swap": "memory.blocks_to_swap",
    "musubi_block_swap_device": "memory.block_swap_device",
    "enable_group_offload": "memory.group_offload",
    "group_offload_type": "memory.group_offload_type",
    "group_offload_blocks_per_group": "memory.group_offload_blocks_per_group",
    "group_offload_use_stream": "memory.group_offload_use_stream",
    "offload_during_startup": "memory.offload_during_startup",
    "gradient_checkpointing": "memory.gradient_checkpointing",
    "vae_enable_patch_conv": "memory.vae_patch_conv",
    "vae_enable_temporal_roll": "memory.vae_temporal_roll",
    "vae_enable_tiling": "memory.vae_tiling",
    "vae_enable_slicing": "memory.vae_slicing",
    "vae_batch_size": "memory.vae_batch_size",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "optim.learning_rate",
    "optimizer": "optim.optimizer",
    "lr_scheduler": "optim.lr_scheduler",
    "lr_warmup_steps": "optim.lr_warmup_steps",
    "max_train_steps": "train.max_train_steps",
    "num_train_epochs": _st_epochs,
    "max_grad_norm": "optim.max_grad_norm",
    "checkpoint_step_interval": "checkpoint.every_n_steps",
    "checkpointing_steps": "checkpoint.every_n_steps",
    "checkpoints_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume",
    "output_dir": "output.output_dir",
    "seed": "train.seed",
    "resolution": _st_resolution,
    "data_backend_config": "data.data_backend_config",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "mixed_precision": "train.mixed_precision",
    "tread_config": _st_tread,
    "validation_disable": _st_validation_disable,
    "validation_prompt": "validation.prompt",
    "validation_resolution": "validation.resolution",
    "validation_num_video_frames": "validation.num_frames",
    "validation_num_inference_steps": "validation.num_inference_steps",
    "validation_guidance": "validation.guidance",
    "validation_seed": "validation.seed",
    "validation_steps": "validation.every_n_steps",
    "report_to": "output.report_to",
    "tracker_project_name": "output.tracker_project_name",
    "tracker_run_name": "output.tracker_run_name",
    "pretrained_gemma_model_name_or_path": "model.text_encoder_path",
    "validation_prompt_library": _st_prompt_library,
    "validation_negative_prompt": "validation.negative_prompt",
    "validation_using_datasets": None,  # with eval_dataset_id: _st_validation_inputs
    "eval_dataset_id": None,
    "validation_input": None,
    # Read together by _st_validation_adapters (one validation.adapter_sets list from the five).
    "validation_adapter_path": None,
    "validation_adapter_name": None,
    "validation_adapter_strength": None,
    "validation_adapter_mode": None,
    "validation_adapter_config": None,
    "framerate": "data.fps",
    "ltx_train_mode": "train.task",
    "ltx_i2v_prob": "train.first_frame_conditioning_p",
    "frame_rate": "data.fps",
    "scheduled_sampling_max_step_offset": _st_rollout_offset,
    "scheduled_sampling_probability": "scheduled_sampling.probability",
    "crepa_enabled": "crepa.enabled",
    "crepa_block_index": "crepa.block_index",
    "crepa_lambda": "crepa.weight",
    "crepa_adjacent_distance": "crepa.adjacent_distance",
    "crepa_adjacent_tau": "crepa.temporal_decay",
    "crepa_model": _st_crepa_encoder,
    "crepa_encoder": _st_crepa_encoder,
    "crepa_encoder_image_size": "crepa.image_size",
}

# Known SimpleTuner keys we deliberately do not act on, with the reason shown once to the user.
SIMPLETUNER_IGNORED: dict[str, str] = {
    "hub_model_id": "lowvram never uploads; push the LoRA yourself",
    "push_to_hub": "lowvram never uploads; push the LoRA yourself",
    "lycoris_config": "LyCORIS is not supported; plain LoRA is trained",
    "disable_benchmark": "cudnn benchmark is chosen by lowvram",
    "dynamo_mode": "torch.compile is not used",
    "evaluation_type": "no evaluation models",
    "minimum_image_size": "bucketing is defined by data.resolution",
    "override_dataset_config": "caches are keyed by their settings and rebuilt when they change",
    "skip_file_discovery": "discovery is cheap and always runs",
    "scheduled_sampling_reflexflow": "ReflexFlow is not implemented; the rollout trains the plain flow target",
    "scheduled_sampling_sampler": "lowvram's rollout takes Euler flow-matching steps (scheduled_sampling.sigma_step)",
    "scheduled_sampling_order": "lowvram's rollout takes first-order Euler steps",
    "validation_disable_unconditional": "validation renders the clips with the LoRA being trained only",
    "quantize_via": "quantization runs where the memory plan puts it",
    "crepa_spatial_align": "CREPA always resamples the DINOv2 patch grid onto the latent grid (2-D, bilinear)",
    "crepa_normalize_by_frames": "the CREPA term is always averaged over frames",
    "crepa_cumulative_neighbors": "CREPA aligns the neighbours at exactly adjacent_distance (SimpleTuner's default)",
    "crepa_use_backbone_features": "CREPA aligns with DINOv2 features only",
    "crepa_teacher_block_index": "CREPA aligns with DINOv2 features only",
    "crepa_drop_vae_encoder": "the DINOv2 features are cached with the latents: no VAE is kept while training",
    "crepa_scheduler": "the CREPA weight is constant (SimpleTuner's default scheduler)",
    "crepa_warmup_steps": "the CREPA weight is constant (SimpleTuner's default scheduler)",
    "crepa_decay_steps": "the CREPA weight is constant (SimpleTuner's default scheduler)",
    "crepa_lambda_end": "the CREPA weight is constant (SimpleTuner's default scheduler)",
    "crepa_cutoff_step": "the CREPA weight is constant (SimpleTuner's default scheduler)",
    "crepa_similarity_threshold": "the CREPA weight is constant (no similarity cutoff)",
    "crepa_similarity_ema_decay": "the CREPA weight is constant (no similarity cutoff)",
    "crepa_threshold_mode": "the CREPA weight is constant (no similarity cutoff)",
    "crepa_power": "the CREPA weight is constant (SimpleTuner's default scheduler)",
}


def _unknown_key_error(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def from_simpletuner(raw: dict[str, Any], source: str = "config.json") -> tuple[dict[str, Any], list[str]]:
    """Map a SimpleTuner config dict to our nested dict. Returns (nested dict, notes about ignored keys)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    valid = sorted(set(SIMPLETUNER_KEYS) | set(SIMPLETUNER_IGNORED))
    for key, value in raw.items():
        key = key.lstrip("-")
        if key in SIMPLETUNER_IGNORED:
            notes.append(f"ignored '{key}': {SIMPLETUNER_IGNORED[key]}")
            continue
        if key not in SIMPLETUNER_KEYS:
            raise _unknown_key_error(key, valid, source)
        target = SIMPLETUNER_KEYS[key]
        try:
            if callable(target):
                target(value, out)
            elif target is not None:
                _set(out, target, value)
        except ValueError as e:
            raise ConfigError(f"{source}: '{key}': {e}") from None
    try:
        _st_validation_adapters(raw, out)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    _st_methods_said(raw, out, notes)
    _st_validation_inputs({k.lstrip("-"): v for k, v in raw.items()}, out, notes, source)
    return out, notes


def _st_validation_inputs(raw: dict[str, Any], out: dict[str, Any], notes: list[str], source: str) -> None:
    """SimpleTuner's image-conditioned validation inputs -> validation.reference_* (I2V).

    `validation_input` (a list of {path, prompt}: standalone input images) -> reference_image + prompts, when every
    entry names the same image (lowvram conditions every prompt on one image). `validation_using_datasets` with
    `eval_dataset_id` (SimpleTuner's LTX-2 I2V validation from a dataset) -> reference_from_dataset; without an id
    SimpleTuner samples random images from every dataset, which lowvram does not: refused, or a note when off.
    """
    v = out.get("validation", {})
    entries = raw.get("validation_input")
    if isinstance(entries, str) and entries.strip().startswith("["):
        try:
            entries = json.loads(entries)
        except ValueError:
            raise ConfigError(f"{source}: 'validation_input' is not a JSON list of {{path, prompt}} objects") from None
    off = v.get("enabled") is not True
    if entries not in (None, [], "", "None") and off:
        notes.append("ignored 'validation_input': validation is off (set validation_disable = false to validate)")
    elif entries not in (None, [], "", "None"):
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("path") for e in entries):
            raise ConfigError(f"{source}: 'validation_input' must be a list of {{\"path\": ..., \"prompt\": ...}}")
        paths = {str(e["path"]) for e in entries}
        if len(paths) > 1:
            raise ConfigError(f"{source}: 'validation_input' names {len(paths)} images: lowvram conditions every "
                              "validation prompt on one validation.reference_image, give one path")  # fmt: skip
        v["reference_image"] = paths.pop()
        prompts = [str(e["prompt"]) for e in entries if str(e.get("prompt") or "").strip()]
        if prompts:
            v["prompts"] = prompts
    if raw.get("validation_using_datasets"):
        name = raw.get("eval_dataset_id")
        if off:
            notes.append("ignored 'validation_using_datasets': validation is off (set validation_disable = false to "
                         "validate)")  # fmt: skip
        elif not name:
            raise ConfigError(f"{source}: 'validation_using_datasets' without 'eval_dataset_id': lowvram takes the "
                              "reference frame from one named dataset, set eval_dataset_id to its id")  # fmt: skip
        elif "reference_image" in v:
            raise ConfigError(f"{source}: 'validation_input' and 'validation_using_datasets' both give the I2V "
                              "image: keep one of them")  # fmt: skip
        else:
            v["reference_from_dataset"] = str(name)
            notes.append(f"'validation_using_datasets': the first frame of the first clip of '{name}' conditions "
                         "every validation clip (image-to-video); for audio-to-video set "
                         "validation.reference_audio_from_dataset")  # fmt: skip
    elif raw.get("eval_dataset_id"):
        notes.append("ignored 'eval_dataset_id': it picks validation inputs only with validation_using_datasets")
    if v:
        out["validation"] = v


def _st_methods_said(raw: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    """Where lowvram trains a SimpleTuner setting with another method, the import says so (never silently)."""
    model = out.get("model", {})
    for st_key, key in (("base_model_precision", "precision"), ("text_encoder_1_precision", "text_encoder_precision")):
        value = str(model.get(key))
        if value in SIMPLETUNER_PRECISION_MAPPINGS:
            other, why = SIMPLETUNER_PRECISION_MAPPINGS[value]
            model[key] = other
            notes.append(f"'{st_key}': '{value}' is trained as '{other}': {why}")
    if out.get("scheduled_sampling", {}).get("enabled"):
        # SimpleTuner (helpers/scheduled_sampling/rollout.py) rolls out only epsilon/v-prediction models: for a
        # flow-matching model such as LTX-2 its rollout returns the batch unchanged.
        n = out["scheduled_sampling"]["steps"]
        notes.append(
            f"'scheduled_sampling_max_step_offset': {n} is trained as a rollout of exactly {n} Euler step(s) of sigma "
            "0.001 each (SimpleTuner draws 0..N per sample, and skips its rollout for flow-matching models)"
        )
    memory = out.get("memory", {})
    if memory.get("group_offload_use_stream") is True and memory.get("gradient_checkpointing") is not False:
        # SimpleTuner does the same under gradient checkpointing (its group offload turns the stream off).
        memory["group_offload_use_stream"] = False
        notes.append(
            "'group_offload_use_stream': true is trained as false, as SimpleTuner itself does under gradient "
            "checkpointing: the stream prefetches in forward order, which the checkpoint recompute breaks"
        )


def _check_keys(raw: dict[str, Any], model: type[BaseModel], source: str, prefix: str = "") -> None:
    """Unknown keys get a 'did you mean' from the flattened key space (typos across sections are caught too)."""
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key_error(dotted, all_dotted_keys(), source)
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(value, sub, source, prefix=f"{dotted}.")


def all_dotted_keys() -> list[str]:
    keys = []
    for section, field in RunConfig.model_fields.items():
        for key in field.annotation.model_fields:
            keys.append(f"{section}.{key}")
    return keys + list(RunConfig.model_fields)


def _validate(nested: dict[str, Any], source: str) -> RunConfig:
    _check_keys(nested, RunConfig, source)
    try:
        return RunConfig.model_validate(nested)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"'{key}': {msg}{shown}" if key else f"{msg}{shown}"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> tuple[RunConfig, list[str]]:
    """Read a TOML (native) or SimpleTuner JSON config, apply `{"section.key": value}` overrides, validate.

    Returns the config and notes for the user (ignored SimpleTuner keys). Bad input raises ConfigError (exit 2).
    """
    nested: dict[str, Any] = {}
    notes: list[str] = []
    source = "command line"
    if path is not None:
        path = Path(path).expanduser()
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        if path.suffix.lower() == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: a SimpleTuner config must be a JSON object")
            nested, notes = from_simpletuner(raw, source)
        else:
            try:
                nested = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: malformed TOML: {e}") from None
        _check_keys(nested, RunConfig, source)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if dotted not in all_dotted_keys():
            raise _unknown_key_error(dotted, all_dotted_keys(), "command line")
        _set(nested, dotted, value)
    cfg = _validate(nested, source)
    _check_memory_combination(cfg, source, simpletuner=path is not None and Path(path).suffix.lower() == ".json")
    return _resolve_vae_options(cfg, notes), notes


# The SimpleTuner names of the memory keys, so a refusal names the key the user wrote.
_ST_MEMORY_NAMES = {
    "ramtorch": "ramtorch",
    "blocks_to_swap": "musubi_blocks_to_swap",
    "group_offload": "enable_group_offload",
    "gradient_checkpointing": "gradient_checkpointing",
    "group_offload_use_stream": "group_offload_use_stream",
}


def _ramtorch_on(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value > 0
    return value is True or bool(str(value).strip(", "))


def _check_memory_combination(cfg: RunConfig, source: str, *, simpletuner: bool) -> None:
    """Memory settings that cannot train together are refused here, naming the keys as the user wrote them (the
    planner would otherwise have to drop one of them: a stated setting is honoured or refused, never dropped)."""
    m = cfg.memory

    def name(key: str) -> str:
        return _ST_MEMORY_NAMES[key] if simpletuner else f"memory.{key}"

    def said(key: str) -> str:
        return f"{name(key)} = {json.dumps(getattr(m, key))}"

    on = [
        key
        for key, active in (
            ("ramtorch", _ramtorch_on(m.ramtorch)),
            ("blocks_to_swap", (m.blocks_to_swap or 0) > 0),
            ("group_offload", bool(m.group_offload)),
        )
        if active
    ]
    if len(on) > 1:
        off = {"ramtorch": "false", "blocks_to_swap": "0", "group_offload": "false"}
        raise ConfigError(
            f"{source}: {' and '.join(said(k) for k in on)} each move the transformer's weights off the GPU and "
            f"lowvram runs one of them: keep one (e.g. {name(on[1])} = {off[on[1]]})"
        )
    no_ckpt = m.gradient_checkpointing is False and not m.activation_offload
    if on and on[0] in ("blocks_to_swap", "group_offload") and no_ckpt:
        why = {
            "blocks_to_swap": "without it autograd keeps every swapped block's weights alive for backward",
            "group_offload": "group offload frees no memory in training without it (diffusers has no backward hooks)",
        }[on[0]]
        raise ConfigError(
            f"{source}: {said(on[0])} needs gradient checkpointing, but {said('gradient_checkpointing')}: {why}; "
            f"set {name('gradient_checkpointing')} = true"
        )
    if m.activation_offload and m.gradient_checkpointing is False:
        raise ConfigError(
            f"{source}: memory.activation_offload = true moves the checkpointed block inputs to the host, so it needs "
            f"gradient checkpointing, but {said('gradient_checkpointing')}: set {name('gradient_checkpointing')} = "
            "true or memory.activation_offload = false"
        )
    if m.group_offload_use_stream:
        raise ConfigError(
            f"{source}: {said('group_offload_use_stream')} cannot train: its prefetch follows the forward order, which "
            f"the gradient checkpoint recompute breaks; set {name('group_offload_use_stream')} = false"
        )


def _resolve_vae_options(cfg: RunConfig, notes: list[str]) -> RunConfig:
    """Temporal roll runs one rolling state through the whole encoder, so it cannot run per spatial tile. SimpleTuner's
    lowest-VRAM config sets both: keep tiling (the smaller VAE peak at every measured clip size) and say so."""
    m = cfg.memory
    if m.vae_tiling and m.vae_temporal_roll:
        notes.append(
            "memory.vae_temporal_roll is off: it cannot be combined with memory.vae_tiling, which keeps the smaller "
            "VAE encode peak (set vae_tiling = false to use the exact temporal roll instead)"
        )
        return cfg.model_copy(update={"memory": m.model_copy(update={"vae_temporal_roll": False})})
    return cfg


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A validated copy of `cfg` with `{"section.key": value}` overrides (None values are skipped)."""
    nested = cfg.model_dump(mode="json")
    for dotted, value in overrides.items():
        if value is None:
            continue
        if dotted not in all_dotted_keys():
            raise _unknown_key_error(dotted, all_dotted_keys(), "command line")
        _set(nested, dotted, value)
    return _validate(nested, "command line")


def config_to_toml(cfg: RunConfig) -> str:
    """Serialize a config as TOML (settings that are None are left out: the planner decides them)."""
    lines: list[str] = []
    for section, values in cfg.model_dump(mode="json").items():
        lines.append(f"[{section}]")
        nested_tables = []
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, list) and value and isinstance(value[0], dict):
                nested_tables.append((key, value))
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        for key, rows in nested_tables:
            for row in rows:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in row.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (validation.adapter_sets' adapters)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return json.dumps(str(value))
