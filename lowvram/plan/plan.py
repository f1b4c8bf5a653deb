"""`plan_run`: measure (cached) -> budget every candidate -> pick the fastest that fits, and explain it.

The one entry point the CLI calls (`lowvram plan`, `train --dry-run`, `probe`). It never loads weights and never
touches a GPU; settings the config fixes are evaluated as given, the others (None) are chosen.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from lowvram.config import MAX_PLANNED_FRAMES, RunConfig, apply_overrides, frames_limit_reason
from lowvram.errors import LowvramError
from lowvram.plan import host as host_ram
from lowvram.plan.budget import (
    CACHE_ITEM_BYTES,
    DEFAULT_EFFICIENCY,
    GB,
    GIB,
    BudgetOptions,
    LazyMap,
    Measurements,
    PhaseBudget,
    Settings,
    StepMeasure,
    StepTime,
    TextLayers,
    Tread,
    WeightGroup,
    budget,
    figure_basis,
    step_time,
)
from lowvram.plan.measure import (
    LoraSpec,
    MeasureCache,
    ModelConfigs,
    TrainShape,
    connectors_weights,
    measure_audio_vae_encode,
    measure_text_encode,
    measure_transformer_step,
    measure_video_vae_encode,
    model_configs,
    resolve_tread_routes,
    text_encoder_layer_weights,
    text_encoder_weights,
    train_shape,
    transformer_nonleaf_params,
    transformer_weights,
    vae_weights,
)
from lowvram.plan.modes import crepa_cost, rollout_cost
from lowvram.profiles import HardwareProfile

PHASES = ("text_cache", "latent_cache", "load", "train", "export")  # + "validation" (plan/validation.py) when enabled
TRAIN_SIDE = ("load", "train", "export")  # the phases the training settings decide
# Output error of the tiny LTX-2 with lowvram's exclude list, per precision (`python -m lowvram.quant.exclude_report`,
# README "Quantized base model"): fp8's is ~10x int8's, so fp8 ranks below both int8 backends.
OUTPUT_ERROR_PCT = {
    "fp32": 0.0,
    "bf16": 0.0,
    "int8-quanto": 0.26,
    "int8-torchao": 0.28,
    "fp8-torchao": 2.5,
    "nf4-bnb": 7.4,
}
# Quality order, best first: by that error (the two int8 backends are equal within it; torchao is the maintained
# one, quanto is in maintenance mode upstream). Ties in predicted speed go to the better one; text encoder options
# are tried in this order.
QUALITY = {"fp32": 0, "bf16": 1, "int8-torchao": 2, "int8-quanto": 3, "fp8-torchao": 4, "nf4-bnb": 5}
# Precision is a quality decision more than a speed knob: a lower precision must be this much faster to be chosen,
# growing with its error.
QUALITY_COST = {
    "fp32": 1.0,
    "bf16": 1.0,
    "int8-torchao": 1.10,
    "int8-quanto": 1.12,
    "fp8-torchao": 1.15,
    "nf4-bnb": 1.50,
}
TRAIN_PRECISIONS = ("bf16", "fp8-torchao", "int8-torchao", "int8-quanto", "nf4-bnb")
VAE_ORDER = ("none", "patch_conv", "temporal_roll", "tiling")


@dataclass(frozen=True)
class Candidate:
    settings: Settings
    phases: dict[str, PhaseBudget]
    time: StepTime
    over_vram_bytes: int  # > 0: by how much the worst phase exceeds the usable VRAM
    over_ram_bytes: int

    @property
    def fits(self) -> bool:
        return self.over_vram_bytes <= 0 and self.over_ram_bytes <= 0


@dataclass(frozen=True)
class Plan:
    """What `lowvram plan` shows and `--json` prints. Byte figures are bytes; `settings` uses run-config keys."""

    fits: bool
    profile: str
    settings: dict[str, Any]
    step_seconds_estimate: float | None
    phases: dict[str, PhaseBudget]
    vram_usable_bytes: int
    ram_usable_bytes: int
    explanation: tuple[str, ...] = ()
    runners_up: tuple[dict[str, Any], ...] = ()
    reason: str | None = None  # one line when it does not fit
    assumptions: tuple[str, ...] = ()
    step: StepTime | None = field(default=None, compare=False)
    step_time_measured: bool = False  # the step time rests on this GPU's measured throughput (calibrated profile)
    config: RunConfig | None = field(default=None, compare=False)  # the run config with these settings applied
    measured: dict[str, Any] = field(default_factory=dict)  # the per-block measurements the budget composed
    host: dict[str, Any] = field(default_factory=dict)  # host RAM: budgeted figure, need, smallest, tiers (host.py)

    def summary_line(self) -> str:
        """One line for `probe` and logs: verdict, settings, peak VRAM, predicted s/step."""
        train = self.phases.get("train")
        peak = f"{train.vram_peak_bytes / GIB:.1f} GiB VRAM peak" if train else "no train phase"
        what = self.explanation[0].removeprefix("chosen: ").split(":")[0] if self.explanation else ""
        if not self.fits:
            return f"does not fit '{self.profile}': {self.reason}"
        basis = "from measured throughput" if self.step_time_measured else "estimate, uncalibrated"
        return f"fits '{self.profile}' with {what}: {peak}, ~{self.step_seconds_estimate:.2f} s/step ({basis})"

    def to_json(self) -> dict[str, Any]:
        phases = {}
        for name, p in self.phases.items():
            phases[name] = {
                "vram_peak_bytes": p.vram_peak_bytes,
                "ram_peak_bytes": p.ram_peak_bytes,
                "disk_bytes_per_item": p.disk_bytes_per_item,
                "components": {"vram": dict(p.vram), "ram": dict(p.ram), "disk": dict(p.disk)},
            }
        out = {
            "fits": self.fits,
            "profile": self.profile,
            "settings": dict(self.settings),
            "step_seconds_estimate": self.step_seconds_estimate,
            "step_time_basis": "measured" if self.step_time_measured else "estimate",
            "phases": phases,
            "vram_usable_bytes": self.vram_usable_bytes,
            "ram_usable_bytes": self.ram_usable_bytes,
            "explanation": list(self.explanation),
            "runners_up": list(self.runners_up),
            "reason": self.reason,
            "assumptions": list(self.assumptions),
            "measured": dict(self.measured),
            "host": dict(self.host),
        }
        if self.step is not None:
            out["step"] = {
                "compute_seconds": self.step.compute_seconds,
                "transfer_seconds": self.step.transfer_seconds,
                "dequant_seconds": self.step.dequant_seconds,
                "streamed_bytes": self.step.streamed_bytes,
                "offload_overhead": self.step.offload_overhead,
            }
        return out

    def require_fit(self) -> Plan:
        """Raise the one-line refusal (exit 1) when the run does not fit; return self otherwise."""
        if not self.fits:
            raise LowvramError(self.reason or "the run does not fit this profile")
        return self

    def render(self, console) -> None:
        """Rich tables: per phase, device and component; the settings; s/step; what does not fit and why."""
        from rich.table import Table

        verdict = "[green]fits[/green]" if self.fits else "[red]does not fit[/red]"
        console.print(f"[bold]Memory plan for profile '{self.profile}'[/bold]: {verdict}")
        table = Table(title="Peak memory per phase (GiB)", show_lines=False)
        table.add_column("phase")
        table.add_column("device")
        table.add_column("component")
        table.add_column("GiB", justify="right")
        # One usable-VRAM figure everywhere in this output: the profile's VRAM less its reserve and the margin. The
        # reserve is held back before it, so it is not listed as a component of any peak.
        reserve = max((p.vram.get("reserve", 0) for p in self.phases.values()), default=0)
        console.print(
            f"usable VRAM {self.vram_usable_bytes / GIB:.2f} GiB (after the profile's {reserve / GIB:.2f} GiB reserve "
            f"and the safety margin); usable host RAM {self.ram_usable_bytes / GIB:.2f} GiB"
        )
        for name, phase in self.phases.items():
            for device, items, limit in (
                ("VRAM", {k: v for k, v in phase.vram.items() if k != "reserve"}, self.vram_usable_bytes),
                ("RAM", phase.ram, self.ram_usable_bytes),
            ):
                for component, nbytes in items.items():
                    if nbytes:
                        table.add_row(name, device, component, f"{nbytes / 2**30:.2f}")
                total = sum(items.values())
                style = "bold red" if total > limit else "bold"
                table.add_row(
                    name,
                    device,
                    f"[{style}]peak (usable {limit / 2**30:.2f})[/{style}]",
                    f"[{style}]{total / 2**30:.2f}[/{style}]",
                    end_section=device == "RAM",
                )
            for component, nbytes in phase.disk.items():
                table.add_row(name, "disk", component, f"{nbytes / 2**30:.2f}")
            if phase.disk_bytes_per_item:
                table.add_row(
                    name, "disk", "per cached item", f"{phase.disk_bytes_per_item / 2**30:.4f}", end_section=True
                )
        console.print(table)
        chosen = Table(title="Settings")
        chosen.add_column("key")
        chosen.add_column("value")
        for key, value in self.settings.items():
            if key.startswith(("memory.", "model.precision", "model.text_encoder_precision", "optim.optimizer")):
                chosen.add_row(key, str(value))
        console.print(chosen)
        if self.step_seconds_estimate is not None:
            basis = (
                "from the calibrated profile's measured throughput"
                if self.step_time_measured
                else "an estimate: the profile is not calibrated (`lowvram probe --calibrate --write FILE`)"
            )
            console.print(f"predicted step time: [bold]{self.step_seconds_estimate:.2f} s/step[/bold] ({basis})")
        for line in self.explanation:
            console.print(f"- {line}")
        if self.runners_up:
            console.print("runners-up:")
            for r in self.runners_up:
                why = f": not chosen: {r['why_not']}" if r.get("why_not") else ""
                console.print(
                    f"  - {r['describe']}: {r['step_seconds']:.2f} s/step, train VRAM "
                    f"{(r['train_vram_bytes'] - reserve) / 2**30:.1f} GiB, host RAM "
                    f"{r['host_ram_bytes'] / 2**30:.1f} GiB{why}"
                )
        for line in host_ram.summary_lines(self.host):
            console.print(line)
        if self.reason:
            console.print(f"[red]{self.reason}[/red]")
        if self.measured:
            m = self.measured
            console.print(
                f"[dim]measured per transformer block (fake tensors): keeps {m['kept_per_block_bytes'] / GIB:.3f} GiB "
                f"with checkpointing, {m['kept_per_block_no_checkpointing_bytes'] / GIB:.2f} GiB without; in-block "
                f"peak +{m['block_forward_transient_bytes'] / GIB:.2f} GiB forward, "
                f"+{m['block_backward_transient_bytes'] / GIB:.2f} GiB backward (with recompute); "
                f"{m['block_forward_flops'] / 1e12:.2f} TFLOP forward[/dim]"
            )
        if "tread_routes" in self.measured:
            m = self.measured
            console.print(
                f"[dim]a TREAD-routed block (measured the same way): keeps "
                f"{m['tread_routed_kept_per_block_no_checkpointing_bytes'] / GIB:.2f} GiB without checkpointing, "
                f"{m['tread_routed_block_forward_flops'] / 1e12:.2f} TFLOP forward[/dim]"
            )
        for line in self.assumptions:
            console.print(f"[dim]assumption: {line}[/dim]")


# --------------------------------------------------------------------------------------------------------------------
# Measurements for a config (cached)


def _compute_dtype(cfg: RunConfig) -> str:
    # As the loop loads them: the tiny family is built in fp32 (it trains on CPU), real weights in bf16.
    fp32 = cfg.model.family == "tiny" or cfg.model.precision == "fp32" or cfg.train.mixed_precision == "fp32"
    return "fp32" if fp32 else "bf16"


def _budget_options(cfg: RunConfig, efficiency: float, gpus: int = 1) -> BudgetOptions:
    dtype = _compute_dtype(cfg)
    return BudgetOptions(
        compute_dtype=dtype,
        lora_dtype=dtype,
        efficiency=efficiency,
        gpus=gpus,
        grad_accumulation_steps=cfg.train.gradient_accumulation_steps,
    )


def run_shape(cfg: RunConfig, configs: ModelConfigs, gpus: int = 1) -> TrainShape:
    """Token counts of one step on one GPU (FSDP2 splits each batch's rows over the GPUs)."""
    width, height = cfg.data.width_height
    return train_shape(
        configs,
        width=width,
        height=height,
        frames=cfg.data.frames,
        fps=cfg.data.fps,
        batch=math.ceil(cfg.train.batch_size / gpus),
        text_tokens=cfg.data.max_text_tokens,
        audio=cfg.data.audio,
        mode=cfg.train.mode,
        reference_downscale=cfg.ic_lora.reference_downscale if cfg.ic_lora.enabled else None,
    )


def plan_shape(cfg: RunConfig, configs: ModelConfigs) -> tuple[RunConfig, list[str], list[str]]:
    """`cfg` at the largest clip its data pipeline will cut (the bucket with the most tokens sets every peak), with
    a line saying which one it is and assumptions where a bucket could not be read from the data.

    A folder dataset crops to `data.resolution` x `data.frames` or shorter, so those are its largest clip; a
    SimpleTuner multidatabackend names its own shapes per dataset (`video.num_frames`, `resolution`), which win.
    """
    from lowvram.data.shapes import data_shapes

    path = cfg.data.data_backend_config
    if not path:
        return cfg, [], []
    shapes = data_shapes(cfg)
    here = f"{cfg.data.resolution}@{cfg.data.frames}"
    if shapes is None:
        return cfg, [], [f"{path} is not there: planned for data.resolution and data.frames ({here}) instead"]
    if not shapes.clips:
        return cfg, [], [f"{path} has no video or image dataset: planned for data.resolution and data.frames ({here})"]

    def tokens(c) -> tuple[int, int]:
        t = train_shape(configs, width=c.width, height=c.height, frames=c.frames, fps=c.fps, batch=1,
                        text_tokens=cfg.data.max_text_tokens, audio=cfg.data.audio, mode=cfg.train.mode)  # fmt: skip
        return t.video_tokens + t.audio_tokens, c.width * c.height * c.frames

    largest = max(shapes.clips, key=tokens)
    others = sorted({c.key for c in shapes.clips} - {largest.key})
    also = f" (also {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})" if others else ""
    line = (
        f"planned for the largest bucket the data pipeline will cut: {largest.key} at {largest.fps:g} fps, dataset "
        f"'{largest.dataset}' of {path}{also}"
    )
    shaped = apply_overrides(
        cfg, {"data.resolution": f"{largest.width}x{largest.height}", "data.frames": largest.frames,
              "data.fps": largest.fps}
    )  # fmt: skip
    return shaped, [line], list(shapes.notes)


def check_plan_request(cfg: RunConfig, configs: ModelConfigs, gpus: int = 1) -> None:
    """Requests the planner refuses in one line before it measures anything (exit 2)."""
    from lowvram.errors import UsageError

    if gpus < 1:
        raise UsageError(f"gpus = {gpus}: the number of GPUs the run is sharded over must be 1 or more")
    n = configs.transformer.get("num_layers", 48)
    swap = cfg.memory.blocks_to_swap
    if swap is not None and swap > n:
        raise UsageError(
            f"memory.blocks_to_swap (SimpleTuner: musubi_blocks_to_swap) = {swap} but the {cfg.model.family} "
            f"transformer has {n} blocks: use at most {n} (or leave it out and the planner chooses)"
        )
    if cfg.data.frames > MAX_PLANNED_FRAMES:
        backend = cfg.data.data_backend_config
        where = f"video.num_frames in {backend}" if backend else "data.frames"
        raise UsageError(f"{where} = {cfg.data.frames}: {frames_limit_reason()}")


def collect_measurements(cfg: RunConfig, profile: HardwareProfile, cache: MeasureCache, gpus: int = 1) -> Measurements:
    from lowvram.models.ltx2.checkpoint import run_model_version, text_encoder_plan_config

    configs = model_configs(cfg.model.family, run_model_version(cfg.model))
    user_text_encoder = text_encoder_plan_config(cfg.model, configs.version)  # exact sizes when the folder is given
    if user_text_encoder is not None:
        configs = replace(configs, text_encoder=user_text_encoder)
    shape = run_shape(cfg, configs, gpus)
    dtype = _compute_dtype(cfg)
    attention = "flash" if profile.supports.flash_attention else "math"
    lora = LoraSpec(cfg.lora.rank, tuple(cfg.lora.targets), cfg.lora.dropout, include_audio=cfg.train.mode != "video")
    cfg_key = {"family": configs.family, "transformer": configs.transformer}

    weights = cache.get("transformer-weights", cfg_key, lambda: transformer_weights(configs))
    nonleaf = cache.get("transformer-nonleaf", cfg_key, lambda: transformer_nonleaf_params(configs))

    def step(
        ckpt: bool, onload_copies: bool = False, first_block: bool = False, tread_ratio: float | None = None
    ) -> StepMeasure:
        key = {
            **cfg_key,
            "shape": shape.key(),
            "lora": lora.__dict__,
            "dtype": dtype,
            "ckpt": ckpt,
            "attention": attention,
            **({"onload_copies": True} if onload_copies else {}),
            **({"first_block": True} if first_block else {}),
            **({"tread_ratio": tread_ratio} if tread_ratio is not None else {}),
        }
        raw = cache.get(
            "transformer-step",
            key,
            lambda: measure_transformer_step(
                configs.transformer,
                shape,
                lora,
                compute_dtype=dtype,
                checkpointing=ckpt,
                attention=attention,
                onload_copies=onload_copies,
                first_block=first_block,
                tread_ratio=tread_ratio,
            ),
        )
        return StepMeasure(raw["marks"], raw["peaks"], raw["flops"], raw["lora_params_per_block"])

    te_key = {"family": configs.family, "text_encoder": configs.text_encoder, "connectors": configs.connectors}
    te = cache.get("text-encoder-weights", te_key, lambda: text_encoder_weights(configs))
    conn = cache.get("connectors-weights", te_key, lambda: connectors_weights(configs))
    te_layers = cache.get("text-encoder-layers", te_key, lambda: text_encoder_layer_weights(configs))
    text = cache.get(
        "text-encode",
        {**te_key, "tokens": shape.text_tokens, "dtype": dtype},
        lambda: measure_text_encode(configs, shape.text_tokens, compute_dtype=dtype),
    )
    vae_key = {"family": configs.family, "video_vae": configs.video_vae, "audio_vae": configs.audio_vae}
    vae = cache.get("vae-weights", vae_key, lambda: vae_weights(configs))
    width, height = cfg.data.width_height
    frames = cfg.data.frames

    def video_encode(name: str) -> int:
        options = {part: True for part in name.split("+")} if name != "none" else {}
        key = {**vae_key, "w": width, "h": height, "frames": frames, "options": options, "dtype": dtype}
        raw = cache.get(
            "video-encode",
            key,
            lambda: measure_video_vae_encode(configs, width, height, frames, options, batch=1, compute_dtype=dtype),
        )
        return raw["activation_peak_bytes"]

    input_bytes = 3 * frames * width * height * (2 if dtype == "bf16" else 4)
    a = configs.audio_vae
    mel_frames = math.ceil(frames / cfg.data.fps * a["sample_rate"] / a["mel_hop_length"])
    audio = cache.get(
        "audio-encode",
        {**vae_key, "mel_frames": mel_frames, "dtype": dtype},
        lambda: measure_audio_vae_encode(configs, mel_frames, batch=1, compute_dtype=dtype),
    )

    from lowvram.models.ltx2 import text_embedding_widths

    caption = sum(text_embedding_widths(configs.transformer))  # video + audio widths: 2 x 3840 (2.0), 4096 + 2048
    text_item = shape.text_tokens * caption * CACHE_ITEM_BYTES + shape.text_tokens  # video + audio + mask
    latent_channels = configs.video_vae["latent_channels"]
    audio_features = configs.transformer["audio_in_channels"]
    latent_item = (latent_channels * shape.video_tokens + audio_features * shape.audio_tokens) * CACHE_ITEM_BYTES
    num_layers = configs.transformer.get("num_layers", 48)
    tread = None
    if cfg.train.tread_routes:
        # The routed blocks measured as such (block 0 under the trainer's TreadRouter), once per ratio, on first use.
        routes = resolve_tread_routes(cfg.train.tread_routes, num_layers)
        keys = tuple((r, ckpt) for r in sorted({r for _, _, r in routes}) for ckpt in (False, True))
        tread = Tread(routes, LazyMap(keys, lambda key: step(key[1], tread_ratio=key[0])))
    crepa = crepa_cost(cfg, configs, shape, dtype, cache)  # CREPA: head, DINOv2 and the cached features
    return Measurements(
        num_layers=num_layers,
        block=WeightGroup(**weights["block"]),
        rest=WeightGroup(**weights["rest"]),
        text_encoder=WeightGroup(**te),
        connectors=WeightGroup(**conn),
        video_vae_params=vae["video_params"],
        audio_vae_params=vae["audio_params"],
        step=LazyMap((False, True), step),
        text_encode_peak_bytes=max(text["gemma_peak_bytes"], text["connectors_peak_bytes"]),
        connectors_peak_bytes=text["connectors_peak_bytes"],
        audio_encode_peak_bytes=audio["peak_bytes"],
        video_input_bytes=input_bytes,
        video_encode=LazyMap(VAE_ORDER, video_encode),
        text_item_bytes=text_item,
        latent_item_bytes=latent_item,
        batch_input_bytes=shape.batch * (text_item + latent_item + (crepa.feature_item_bytes if crepa else 0)),
        attention=attention,
        onload_step=LazyMap((False, True), lambda ckpt: step(ckpt, onload_copies=True)),
        onload_first_block=LazyMap((False, True), lambda ckpt: step(ckpt, onload_copies=True, first_block=True)),
        nonleaf_params=nonleaf["block_nonleaf_params"] + nonleaf["rest_nonleaf_params"],
        tread=tread,
        model_version=configs.version,
        rollout=rollout_cost(cfg, configs, shape, lora, dtype, attention, cache),
        crepa=crepa,
        text_layers=TextLayers(
            te_layers["layers"], WeightGroup(**te_layers["all"]), WeightGroup(**te_layers["largest"])
        ),
    )


# --------------------------------------------------------------------------------------------------------------------
# Fixed and free settings


def _fixed_settings(cfg: RunConfig) -> dict[str, Any]:
    """Settings the config pins (memory fields that are not None); everything else is the planner's choice."""
    mem = cfg.memory
    fixed: dict[str, Any] = {}
    if mem.ramtorch is not None:
        share = mem.ramtorch
        if isinstance(share, str):
            share = 1.0  # a module glob streams the blocks' Linears it matches; budgeted as all of them
        elif isinstance(share, bool):
            share = 1.0 if share else 0.0
        if share > 0:
            fixed["offload"] = "ramtorch"
            fixed["ramtorch_share"] = float(share)
    if mem.blocks_to_swap is not None and "offload" not in fixed:
        if mem.blocks_to_swap > 0:
            fixed["offload"] = "block_swap"
            fixed["blocks_to_swap"] = mem.blocks_to_swap
    if mem.group_offload is not None and "offload" not in fixed and mem.group_offload:
        fixed["offload"] = "group"
        fixed["group_blocks_per_group"] = mem.group_offload_blocks_per_group
        fixed["group_use_stream"] = mem.group_offload_use_stream
        fixed["group_type"] = mem.group_offload_type
    explicit_off = [mem.ramtorch in (False, 0, 0.0), mem.blocks_to_swap == 0, mem.group_offload is False]
    if "offload" not in fixed and all(v is not None for v in (mem.ramtorch, mem.blocks_to_swap, mem.group_offload)):
        if all(explicit_off):
            fixed["offload"] = "none"
    fixed["_excluded_offload"] = {
        k for k, off in zip(("ramtorch", "block_swap", "group"), explicit_off, strict=True) if off
    }
    for name in (
        "gradient_checkpointing",
        "activation_offload",
        "offload_during_startup",
        "ramtorch_text_encoder",
        "text_encoder_on_disk",
        "vae_tiling",
        "vae_slicing",
        "vae_patch_conv",
        "vae_temporal_roll",
    ):
        value = getattr(mem, name)
        if value is not None:
            fixed[name] = value
    fixed["vae_batch_size"] = mem.vae_batch_size
    for name in ("swap_tier", "blocks_on_disk"):
        if getattr(mem, name, None) is not None:
            fixed[name] = getattr(mem, name)
    return fixed


def no_checkpointing_lower_bound(m: Measurements) -> int:
    """Bytes the blocks keep for backward without checkpointing (seen in the checkpointed run's recompute)."""
    return sum(b.recomputed_per_block_bytes for b in m.block_steps(True))


def _train_candidates(
    m: Measurements,
    cfg: RunConfig,
    profile: HardwareProfile,
    choose_precision: bool,
    fixed: dict[str, Any],
    vram_ok: int,
) -> list[Settings]:
    n = m.num_layers
    if choose_precision:
        precisions = [p for p in TRAIN_PRECISIONS if _supported(p, profile)]
        if cfg.model.family == "tiny":
            precisions = [cfg.model.precision]
    else:
        precisions = [cfg.model.precision]
    ckpts = [fixed["gradient_checkpointing"]] if "gradient_checkpointing" in fixed else [False, True]
    if False in ckpts and len(ckpts) > 1 and no_checkpointing_lower_bound(m) > vram_ok:
        ckpts = [True]  # its kept activations alone exceed the device: not worth measuring
    act_offloads = [fixed["activation_offload"]] if "activation_offload" in fixed else [False, True]
    excluded = fixed.get("_excluded_offload", set())
    offloads: list[dict[str, Any]] = []
    kind = fixed.get("offload")
    if kind in (None, "none"):
        offloads.append({"offload": "none"})
    if kind is None or kind == "block_swap":
        # The ring has min(2, N) slots: swapping 1 or 2 blocks keeps them all in the ring, saving nothing while
        # paying their copies. So the chooser proposes 3 or more (a config may still fix fewer).
        counts = [fixed["blocks_to_swap"]] if kind == "block_swap" else range(3, n + 1)
        if "block_swap" not in excluded:
            tiers = [fixed["swap_tier"]] if "swap_tier" in fixed else list(host_ram.SWAP_TIERS)
            on_disk = {"blocks_on_disk": fixed["blocks_on_disk"]} if "blocks_on_disk" in fixed else {}
            offloads += [
                {"offload": "block_swap", "blocks_to_swap": k, "swap_tier": tier, **on_disk}
                for k in counts
                for tier in tiers
                if k >= on_disk.get("blocks_on_disk", 0)
            ]
    if kind is None or kind == "ramtorch":
        shares = [fixed["ramtorch_share"]] if kind == "ramtorch" else [0.25, 0.5, 0.75, 1.0]
        if "ramtorch" not in excluded:
            offloads += [{"offload": "ramtorch", "ramtorch_share": s} for s in shares]
    if kind is None or kind == "group":
        if "group" not in excluded:
            if kind == "group":
                groups = [(fixed["group_blocks_per_group"], fixed["group_use_stream"], fixed["group_type"])]
            else:
                # diffusers' stream prefetch is refused in training (see offload/group.py); leaf_level is only
                # evaluated when a config asks for it (it needs one more fake measurement, and block_level with
                # one block per group is what it approaches at far more onloads)
                groups = [(g, False, "block_level") for g in (1, 2, 4)]
            offloads += [
                {"offload": "group", "group_blocks_per_group": g, "group_use_stream": st, "group_type": t}
                for g, st, t in groups
            ]
    if profile.vendor == "cpu" and kind is None:
        # No accelerator: the "device" is host RAM, so offloading copies within the same memory and saves nothing.
        offloads = [{"offload": "none"}]
        act_offloads = [fixed.get("activation_offload", False)]
    out = []
    for precision, ckpt, act, off in itertools.product(precisions, ckpts, act_offloads, offloads):
        if act and not ckpt:
            continue  # activation offload moves the checkpointed block inputs: it needs checkpointing
        s = Settings(
            precision=precision,
            gradient_checkpointing=ckpt,
            activation_offload=act,
            optimizer=cfg.optim.optimizer,
            **off,
        )
        if _refusal(s) is None:
            out.append(s)
    return out


def _stated_settings(cfg: RunConfig, fixed: dict[str, Any]) -> Settings:
    """The settings as the config states them (for a refusal when no candidate can run)."""
    names = {f.name for f in Settings.__dataclass_fields__.values()}
    stated = {k: v for k, v in fixed.items() if k in names}
    return Settings(precision=cfg.model.precision, optimizer=cfg.optim.optimizer, **stated)


def _say_measuring(cfg: RunConfig):
    """Progress on stderr while a measurement runs (each takes seconds to minutes, once: then it is cached)."""
    what = {
        "transformer-step": "one transformer block's forward and backward",
        "video-encode": "the video VAE encode",
        "audio-encode": "the audio VAE encode",
        "text-encode": "the text encoder",
    }

    def say(kind: str, key: dict[str, Any]) -> None:
        if kind in what:
            shape = f"{cfg.data.resolution}@{cfg.data.frames}"
            option = key.get("options")
            extra = f" ({'+'.join(option) or 'no option'})" if isinstance(option, dict) else ""
            print(f"lowvram: measuring {what[kind]} at {shape}{extra} on fake tensors (cached afterwards)",
                  file=sys.stderr, flush=True)  # fmt: skip

    return say


def _refusal(s: Settings) -> str | None:
    """What the offload strategies would refuse to run (block swap or group offload without checkpointing, group
    offload's forward-order prefetch with checkpointing): such settings are never proposed."""
    from types import SimpleNamespace

    from lowvram.offload import memory_plan_refusal

    memory = {k.split(".", 1)[1]: v for k, v in s.dotted().items() if k.startswith("memory.")}
    return memory_plan_refusal(SimpleNamespace(**memory), training=True)


def _supported(precision: str, profile: HardwareProfile) -> bool:
    from lowvram.quant.precision import NEEDS, parse_precision

    return all(getattr(profile.supports, flag) for flag in NEEDS[parse_precision(precision)].supports)


def _usable(profile: HardwareProfile, margin: float) -> tuple[int, int]:
    return int(profile.usable_vram_bytes * (1 - margin)), host_ram.usable_host_bytes(profile.host_ram_bytes)


def _evaluate(
    m: Measurements,
    s: Settings,
    profile: HardwareProfile,
    opts: BudgetOptions,
    margin: float,
    phases: tuple[str, ...] = PHASES,
) -> Candidate:
    vram_ok, ram_ok = _usable(profile, margin)
    budgets = budget(m, s, profile, opts)
    over_v = max(b.vram_peak_bytes - b.vram.get("reserve", 0) - vram_ok for k, b in budgets.items() if k in phases)
    over_r = max(b.host_demand_bytes(profile.unified_memory) - ram_ok for k, b in budgets.items() if k in phases)
    return Candidate(s, budgets, step_time(m, s, profile, opts), over_v, over_r)


def _disk_tier_candidates(
    m: Measurements, train: list[Candidate], profile: HardwareProfile, opts: BudgetOptions, margin: float
) -> list[Candidate]:
    """Block swap setups that fit the device but not host RAM, with just enough swapped blocks moved to the disk tier
    (more on disk is only slower, so the fewest that fit is the one worth ranking)."""
    out = []
    for c in train:
        s = c.settings
        if s.offload != "block_swap" or c.over_vram_bytes > 0 or c.over_ram_bytes <= 0 or s.blocks_on_disk:
            continue
        if s.precision in ("bf16", "fp32"):
            continue  # the disk tier is written while quantizing on load (train/run.py refuses it unquantized)
        k = min(s.blocks_to_swap, m.num_layers)
        d = host_ram.blocks_on_disk_needed(c.over_ram_bytes, m.block.bytes(s.precision, opts.compute_dtype), k)
        for n in sorted({min(k, d + extra) for extra in (0, 1, 2)} if d is not None else {k}):
            trial = _evaluate(m, replace(s, blocks_on_disk=n), profile, opts, margin, TRAIN_SIDE)
            if trial.fits or n == k:
                out.append(trial)
                break
    return out


def _rank_key(c: Candidate) -> tuple:
    """Fastest first, with each precision's quality cost as a time factor; then fewer bytes copied."""
    return (
        round(c.time.seconds * QUALITY_COST.get(c.settings.precision, 1.5), 4),
        QUALITY.get(c.settings.precision, 9),  # at equal cost the better precision wins, before any byte count
        c.time.streamed_bytes,
        c.phases["train"].vram_peak_bytes,
    )


# --------------------------------------------------------------------------------------------------------------------
# The entry point


def plan_run(
    cfg: RunConfig,
    profile: HardwareProfile,
    *,
    choose: bool = True,
    cache_dir=None,
    efficiency: float = DEFAULT_EFFICIENCY,
    gpus: int = 1,
    host: host_ram.HostMemory | None = None,
    _suggest: bool = True,
    _shape: bool = True,
) -> Plan:
    """Plan `cfg` on `profile` (per GPU; `gpus` > 1: FSDP2 over that many GPUs of this profile).

    `choose=True` (`lowvram plan --profile P`): the planner also picks the base and text-encoder precision.
    `choose=False` (`lowvram plan --config F`, `train --dry-run`): precisions and optimizer are the config's. In
    both, memory settings the config leaves None are chosen and the ones it sets are evaluated as given.
    Impossible requests raise LowvramError in one line; a run that fits nowhere returns `fits=False` + `reason`.
    `host`: the host RAM to budget against (`--host-ram`, or probed by the CLI); default: the profile's.
    """
    if host is not None:
        profile = profile.model_copy(update={"host_ram_bytes": host.ram_bytes})
    else:
        host = host_ram.HostMemory(profile.host_ram_bytes, f"profile '{profile.name}'")
    from lowvram.quant.precision import check_backend_supported

    configs = model_configs(cfg.model.family)
    shape_lines: list[str] = []
    shape_assumptions: list[str] = []
    if _shape:
        cfg, shape_lines, shape_assumptions = plan_shape(cfg, configs)
    check_plan_request(cfg, configs, gpus)
    if not choose:
        check_backend_supported(cfg.model.precision, profile)
        check_backend_supported(cfg.model.text_encoder_precision, profile)
    if gpus > 1:
        from lowvram.multi_gpu import check_distributed_supported

        if choose:
            # FSDP2 shards a bf16 base with AdamW and no offload: the choice is among those only.
            cfg = cfg.model_copy(
                update={
                    "model": cfg.model.model_copy(update={"precision": "bf16"}),
                    "optim": cfg.optim.model_copy(update={"optimizer": "adamw"}),
                }
            )
        check_distributed_supported(cfg, gpus)
        choose = False
    if cfg.optim.optimizer == "adamw8bit" and not profile.supports.bitsandbytes:
        raise LowvramError(
            f"optim.optimizer 'adamw8bit' needs bitsandbytes, which profile '{profile.name}' lacks: use 'adamw_bf16'"
        )
    cache = MeasureCache(cache_dir)
    cache.progress = _say_measuring(cfg) if sys.stderr.isatty() else None
    m = collect_measurements(cfg, profile, cache, gpus)
    opts = _budget_options(cfg, efficiency, gpus)
    margin = cfg.memory.vram_safety_margin
    fixed = _fixed_settings(cfg)
    if gpus > 1:
        fixed.update(offload="none", activation_offload=False)
    vram_ok, ram_ok = _usable(profile, margin)

    train = [
        _evaluate(m, s, profile, opts, margin, TRAIN_SIDE)
        for s in _train_candidates(m, cfg, profile, choose, fixed, vram_ok)
    ]
    if not train:
        from lowvram.errors import UsageError

        why = _refusal(_stated_settings(cfg, fixed)) or "the stated memory settings exclude every setup"
        raise UsageError(f"no memory setup can run these settings: {why}")
    if "blocks_on_disk" not in fixed:
        train += _disk_tier_candidates(m, train, profile, opts, margin)
    fitting = [c for c in train if c.fits]
    model_line = f"model: LTX-{m.model_version} (its own classes and configs, measured at full size)"
    assumptions = (model_line, *figure_basis(profile, opts.efficiency)) + (
        f"{opts.host_process_bytes / 2**30:.0f} GiB host RAM for the process itself",
        host_ram.reserve_assumption(),
        f"LoRA parameters and gradients in {opts.lora_dtype} (they take the base weights' dtype)",
        f"{m.attention} attention ({'O(N)' if m.attention == 'flash' else 'O(N^2)'} memory)",
    ) + (
        (
            f"FSDP2 over {gpus} GPUs: per-GPU batch {math.ceil(cfg.train.batch_size / gpus)}; block all-gathers "
            "between GPUs at the profile's pinned host->device bandwidth, overlapped with compute",
        )
        if gpus > 1
        else ()
    ) + tuple(shape_assumptions)
    if not fitting:
        best = min(train, key=lambda c: (_shortfall(c), c.time.seconds))
        chosen = _complete(m, best.settings, cfg, profile, opts, margin, fixed, choose)
        unfit = _unfit_plan(
            cfg, profile, chosen, vram_ok, ram_ok, assumptions, cache_dir, efficiency, _suggest, gpus, choose,
            shape_lines,
        )
        summary = _host_summary(m, train, chosen, cfg, profile, opts, margin, fixed, choose, host)
        return replace(unfit, host=summary, reason=host_ram.swap_reason(unfit.reason, summary))
    fitting.sort(key=_rank_key)
    winner = fitting[0]
    chosen = _complete(m, winner.settings, cfg, profile, opts, margin, fixed, choose)
    settings = {**cfg.dotted(), **chosen.settings.dotted()}
    settings["memory.profile"] = cfg.memory.profile or profile.name
    explanation = shape_lines + _explain(m, chosen, train, profile, vram_ok, ram_ok, precision_chosen=choose)
    if m.tread is not None:
        explanation.append(_tread_line(m, chosen, profile, opts, margin))
    if chosen.settings.offload_during_startup and "offload_during_startup" not in fixed:
        kept = _evaluate(m, replace(chosen.settings, offload_during_startup=False), profile, opts, margin)
        extra = kept.phases["train"].vram_peak_bytes - chosen.phases["train"].vram_peak_bytes
        explanation.append(
            f"startup is phased (text encoder -> text cache -> freed; VAEs -> latent cache -> freed; then the "
            f"transformer): keeping them loaded would add {extra / GIB:.1f} GiB to training"
        )
    runners = []  # the best fitting setup of each other precision, then of other strategies
    seen = {chosen.settings.precision}
    for c in fitting[1:] + fitting[1:]:
        key = c.settings.precision if len(seen) < len(QUALITY) else _strategy(c.settings)
        if key in seen or len(runners) >= 3:
            continue
        seen.add(key)
        runners.append(
            {
                "describe": c.settings.describe(),
                "step_seconds": round(c.time.seconds, 3),
                "train_vram_bytes": c.phases["train"].vram_peak_bytes,
                "host_ram_bytes": max(p.ram_peak_bytes for p in c.phases.values()),
                "settings": c.settings.dotted(),
                "why_not": _why_not(c, chosen),
            }
        )
    reason = None
    if not chosen.fits:  # training fits; a caching phase does not
        reason = _phase_shortfall(chosen, vram_ok, ram_ok, profile)
        reason += "; try building the text and latent caches on a machine with more memory (they are portable files)"
    phases, fits = dict(chosen.phases), chosen.fits
    if cfg.validation.enabled:
        from lowvram.plan.validation import plan_validation

        phases["validation"], chosen_validation, refusal = plan_validation(
            cfg, m, chosen.settings, profile, opts, vram_ok, ram_ok, cache, configs, m.attention
        )
        settings.update(chosen_validation)
        if refusal is not None and fits:
            fits, reason = False, refusal
        from lowvram.plan.validation import with_reference_encode  # I2V / S2V references encode while caching

        phases["latent_cache"] = with_reference_encode(cfg, phases["latent_cache"], chosen.settings, configs, cache,
                                                       opts.compute_dtype)  # fmt: skip
        over = phases["latent_cache"].vram_peak_bytes - phases["latent_cache"].vram.get("reserve", 0) - vram_ok
        if over > 0 and fits:
            fits, reason = False, (
                f"the validation reference encode (1 frame at {cfg.validation.resolution}) needs {over / 2**30:.2f} "
                "GiB more device memory than usable in the latent_cache phase: lower validation.resolution, or set "
                "memory.vae_tiling = true")  # fmt: skip
    return Plan(
        fits=fits,
        profile=profile.name,
        settings=settings,
        step_seconds_estimate=round(chosen.time.seconds, 3),
        phases=phases,
        vram_usable_bytes=vram_ok,
        ram_usable_bytes=ram_ok,
        explanation=tuple(explanation),
        runners_up=tuple(runners),
        reason=reason,
        assumptions=assumptions,
        step=chosen.time,
        step_time_measured=profile.train_tflops is not None,
        config=apply_overrides(cfg, settings),
        measured=_measured_summary(m),
        host=_host_summary(m, train, chosen, cfg, profile, opts, margin, fixed, choose, host),
    )


def _host_summary(
    m: Measurements,
    train: list[Candidate],
    chosen: Candidate,
    cfg: RunConfig,
    profile: HardwareProfile,
    opts: BudgetOptions,
    margin: float,
    fixed: dict[str, Any],
    choose: bool,
    host: host_ram.HostMemory,
) -> dict[str, Any]:
    """Host RAM of the chosen plan and the smallest host RAM that trains this run on this profile's VRAM.

    The phases run one after another, so the smallest RAM is the largest of each side's least need among settings
    whose VRAM fits: training settings (load, train, export), text-encoder settings, VAE settings.
    """
    vram_ok, _ = _usable(profile, margin)

    def vram_fits(c: Candidate, phases: tuple[str, ...]) -> bool:
        return all(c.phases[n].vram_peak_bytes - c.phases[n].vram.get("reserve", 0) <= vram_ok for n in phases)

    def need(c: Candidate, phases: tuple[str, ...]) -> int:
        return max(c.phases[n].ram_peak_bytes for n in phases)

    # at the chosen precision: a lower one would buy RAM with quality, which is the user's (or the chooser's) call
    train_side = [c for c in train if vram_fits(c, ("train",)) and c.settings.precision == chosen.settings.precision]
    # every swapped block on disk is the least RAM a block swap setup can train with (quantized loads only)
    train_side += [
        _evaluate(m, replace(c.settings, blocks_on_disk=min(c.settings.blocks_to_swap, m.num_layers)), profile, opts,
                  margin, TRAIN_SIDE)
        for c in train_side
        if c.settings.offload == "block_swap" and c.settings.swap_tier == "pinned" and not c.settings.blocks_on_disk
        and c.settings.precision not in ("bf16", "fp32")
    ]  # fmt: skip
    best_train = min(train_side, key=lambda c: need(c, TRAIN_SIDE), default=None)
    te = [cfg.model.text_encoder_precision]
    if choose and cfg.model.family != "tiny":
        te = [p for p in ("bf16", "int8-torchao", "int8-quanto", "nf4-bnb") if _supported(p, profile)]
    text = [
        _evaluate(
            m,
            replace(chosen.settings, text_encoder_precision=p, ramtorch_text_encoder=st, text_encoder_on_disk=dk),
            profile,
            opts,
            margin,
            ("text_cache",),
        )
        for p in te
        for st, dk in text_encoder_placements(fixed)
    ]
    text_need = min((need(c, ("text_cache",)) for c in text if vram_fits(c, ("text_cache",))), default=None)
    latent_need = need(chosen, ("latent_cache",))
    smallest = binding = None
    if best_train is not None and text_need is not None:
        sides = {"text caching": text_need, "latent caching": latent_need}
        sides[max(TRAIN_SIDE, key=lambda n: best_train.phases[n].ram_peak_bytes)] = need(best_train, TRAIN_SIDE)
        binding = max(sides, key=sides.get)
        smallest = sides[binding]
    return host_ram.host_summary(
        host,
        chosen_phases=chosen.phases,
        smallest_need_bytes=smallest,
        smallest_describe=f"{binding} needs the most; training with {best_train.settings.describe()}"
        if best_train is not None
        else None,
    )


def _measured_summary(m: Measurements) -> dict[str, Any]:
    step = m.step[True]
    out = {
        "kept_per_block_bytes": step.kept_per_block_bytes,
        "kept_per_block_no_checkpointing_bytes": step.recomputed_per_block_bytes,
        "block_forward_transient_bytes": step.peaks["block_fwd"] - step.marks["block_fwd_start"],
        "block_backward_transient_bytes": step.peaks["block_bwd"] - step.marks["block_bwd_start"],
        "block_forward_flops": step.flops["block_fwd"],
        "block_backward_flops_with_recompute": step.flops["block_bwd"],
        "block_params": m.block.params,
        "lora_params": m.lora_params(),
        "attention": m.attention,
    }
    if m.tread is not None:
        out["tread_routes"] = [list(r) for r in m.tread.routes]
        out["tread_routed_blocks"] = sum(e - s + 1 for s, e, _ in m.tread.routes)
        routed = m.tread.step[(m.tread.routes[0][2], True)]
        out["tread_routed_kept_per_block_no_checkpointing_bytes"] = routed.recomputed_per_block_bytes
        out["tread_routed_block_forward_flops"] = routed.flops["block_fwd"]
    if m.rollout is not None:
        out["rollout_forward_peak_bytes"] = m.rollout.peak_bytes
        out["rollout_forwards_per_step"] = m.rollout.forwards_per_step
    if m.crepa is not None:
        out["crepa_head_params"] = m.crepa.head_params
        out["crepa_term_peak_bytes"] = m.crepa.head_peak_bytes
        out["crepa_feature_bytes_per_item"] = m.crepa.feature_item_bytes
        out["crepa_dinov2_params"] = m.crepa.encoder_params
    return out


def _complete(
    m: Measurements,
    s: Settings,
    cfg: RunConfig,
    profile: HardwareProfile,
    opts: BudgetOptions,
    margin: float,
    fixed: dict[str, Any],
    choose: bool,
) -> Candidate:
    """Pick the caching-phase settings for a chosen training setup: the first option (best quality, then least
    machinery) whose phase fits; startup is phased unless the config says otherwise."""
    s = replace(
        s, vae_batch_size=fixed["vae_batch_size"], offload_during_startup=fixed.get("offload_during_startup", True)
    )
    te_precisions = [cfg.model.text_encoder_precision]
    if choose and cfg.model.family != "tiny":
        te_precisions = [p for p in ("bf16", "int8-torchao", "int8-quanto", "nf4-bnb") if _supported(p, profile)]
    placements = text_encoder_placements(fixed)
    text_options = [(p, st, dk) for p in te_precisions for st, dk in placements]
    # best quality first, then the least machinery: on the device, streamed from pinned RAM, streamed from disk
    text_options.sort(key=lambda o: (QUALITY.get(o[0], 9), placements.index(o[1:])))
    best = None
    for p, st, dk in text_options:
        trial = replace(s, text_encoder_precision=p, ramtorch_text_encoder=st, text_encoder_on_disk=dk)
        c = _evaluate(m, trial, profile, opts, margin, ("text_cache",))
        if c.fits:
            s = c.settings
            break
        if best is None or c.over_vram_bytes < best[0]:
            best = (c.over_vram_bytes, c.settings)
    else:
        s = best[1] if best else s
    vae_fixed = {
        k: fixed[k] for k in ("vae_tiling", "vae_slicing", "vae_patch_conv", "vae_temporal_roll") if k in fixed
    }
    vae_options = [{}] + [{f"vae_{name}": True} for name in VAE_ORDER[1:]]
    if vae_fixed:
        vae_options = [vae_fixed]
    for option in vae_options:
        base = {
            "vae_tiling": False,
            "vae_patch_conv": False,
            "vae_temporal_roll": False,
            "vae_slicing": fixed.get("vae_slicing", s.vae_batch_size > 1),
        }
        trial = replace(s, **{**base, **option})
        if _evaluate(m, trial, profile, opts, margin, ("latent_cache",)).fits:
            s = trial
            break
    else:
        s = trial  # none fits: report the last (most frugal) option's shortfall
    return _evaluate(m, s, profile, opts, margin)


def text_encoder_placements(fixed: dict[str, Any]) -> list[tuple[bool, bool]]:
    """(ramtorch_text_encoder, text_encoder_on_disk) options for text caching, least machinery first, as the config
    allows: Gemma on the device, its Linears streamed from pinned RAM, its decoder layers streamed from disk."""
    options = [(False, False), (True, False), (False, True)]
    for i, key in enumerate(("ramtorch_text_encoder", "text_encoder_on_disk")):
        if key in fixed:
            options = [o for o in options if o[i] == fixed[key]]
    return options


def _quality_words(precision: str) -> str:
    err = OUTPUT_ERROR_PCT.get(precision)
    return f"{precision} (output error {err:g}%)" if err is not None else precision


def _why_not(c: Candidate, chosen: Candidate) -> str:
    """Why a runner-up (which fits) was not chosen: one clause, in the terms `_rank_key` decided by."""
    a, b = round(c.time.seconds, 2), round(chosen.time.seconds, 2)
    p, q = c.settings.precision, chosen.settings.precision
    if p != q and QUALITY.get(p, 9) > QUALITY.get(q, 9):
        if a < b:
            return (
                f"{(b - a) / b:.0%} faster, but {_quality_words(p)} costs quality against {_quality_words(q)}: it "
                f"must be over {QUALITY_COST.get(p, 1.5) / QUALITY_COST.get(q, 1.0) - 1:.0%} faster to be chosen"
            )
        if a == b and OUTPUT_ERROR_PCT.get(p, 99) <= OUTPUT_ERROR_PCT.get(q, 0):
            # the two int8 backends: equal within the measurement, so the maintained backend is preferred
            return (
                f"as fast and as good ({_quality_words(p)} vs {_quality_words(q)}): {q} is preferred as the "
                "maintained backend (quanto is in maintenance mode upstream)"
            )
        if a == b:
            return f"as fast; {_quality_words(q)} wins the tie on quality over {_quality_words(p)}"
    if a > b:
        return f"slower ({a:.2f} vs {b:.2f} s/step)"
    if c.time.streamed_bytes > chosen.time.streamed_bytes:
        return f"as fast, but copies {(c.time.streamed_bytes - chosen.time.streamed_bytes) / GB:.1f} GB more per step"
    return "as fast, with a higher VRAM peak"


def _shortfall(c: Candidate) -> int:
    return max(c.over_vram_bytes, 0) + max(c.over_ram_bytes, 0)


def _strategy(s: Settings) -> tuple:
    """Candidates that differ only in amounts or in secondary switches are shown once (the best of them)."""
    return (s.precision, s.offload)


def _explain(
    m: Measurements,
    chosen: Candidate,
    train: list[Candidate],
    profile: HardwareProfile,
    vram_ok: int,
    ram_ok: int,
    precision_chosen: bool,
) -> list[str]:
    t = chosen.time
    s = chosen.settings
    dequant = f", {t.dequant_seconds:.2f} s dequantization" if t.dequant_seconds else ""
    lines = [f"chosen: {s.describe()}: {t.seconds:.2f} s/step predicted ({t.compute_seconds:.2f} s compute{dequant})"]
    if precision_chosen and s.precision != "bf16" and s.precision in QUALITY_COST:
        lines.append(
            f"{_quality_words(s.precision)} costs quality, so it wins only by being over "
            f"{QUALITY_COST[s.precision] - 1:.0%} faster than the best fitting bf16 setup, or when no bf16 setup fits"
        )
    if t.streamed_bytes:
        hidden = (
            "fully hidden behind compute"
            if t.offload_overhead < 0.005
            else f"+{t.offload_overhead:.1%} over compute alone"
        )
        lines.append(
            f"streams {t.streamed_bytes / GB:.1f} GB per step over the {profile.h2d_pinned_gbps:g} GB/s host link "
            f"({t.transfer_seconds:.2f} s of copies vs {t.compute_seconds:.2f} s of compute): {hidden}"
        )
        lines.extend(t.notes)
        if profile.supports.streams and s.offload != "group" or s.group_use_stream:
            lines.append(
                "why it overlaps: the next block's weights are copied on a side stream while the current "
                "block computes, so a copy costs nothing while it is shorter than that block's compute"
            )
    else:
        lines.extend(t.notes)  # e.g. scheduled sampling's rollout forwards
    fitting_strategies = {_strategy(c.settings) for c in train if c.fits}
    closest: dict[tuple, Candidate] = {}
    for c in train:
        key = _strategy(c.settings)
        # only what really is faster, at the precision shown (an option as fast is no reason to explain)
        if key in fitting_strategies or round(c.time.seconds, 2) >= round(t.seconds, 2):
            continue
        if key not in closest or _shortfall(c) < _shortfall(closest[key]):
            closest[key] = c
    for c in sorted(closest.values(), key=_rank_key)[:3]:
        need = c.phases["train"]
        why = []
        if c.over_vram_bytes > 0:
            why.append(
                f"needs {(need.vram_peak_bytes - need.vram['reserve']) / GIB:.1f} GiB VRAM, "
                f"{vram_ok / GIB:.2f} GiB usable"
            )
        if c.over_ram_bytes > 0:
            worst = max(TRAIN_SIDE, key=lambda n: c.phases[n].ram_peak_bytes)
            why.append(
                f"needs {c.phases[worst].ram_peak_bytes / GIB:.1f} GiB host RAM ({worst}), "
                f"{ram_ok / GIB:.1f} GiB usable"
            )
        lines.append(
            f"would be faster but does not fit: {c.settings.describe()} ({c.time.seconds:.2f} s/step): "
            + "; ".join(why)
        )
    if not any(c.settings.gradient_checkpointing is False for c in train):
        kept = m.step[True].recomputed_per_block_bytes
        total = no_checkpointing_lower_bound(m)
        per_block = (
            f"{m.num_layers} x {kept / GIB:.2f} GiB = " if m.tread is None else "(TREAD-routed blocks included) "
        )
        lines.append(
            f"without checkpointing the blocks would keep {per_block}{total / GIB:.1f} GiB of activations "
            f"({vram_ok / GIB:.2f} GiB usable)"
        )
    return lines


def _tread_line(
    m: Measurements, chosen: Candidate, profile: HardwareProfile, opts: BudgetOptions, margin: float
) -> str:
    """What the TREAD routes save at the chosen settings: the same settings budgeted without them."""
    plain = _evaluate(replace(m, tread=None), chosen.settings, profile, opts, margin, ("train",))
    saved = plain.phases["train"].vram_peak_bytes - chosen.phases["train"].vram_peak_bytes
    compute = 1 - chosen.time.compute_seconds / plain.time.compute_seconds if plain.time.compute_seconds else 0.0
    return (
        f"TREAD routes {m.tread.describe()}: train VRAM {-saved / GIB:+.2f} GiB (activations), compute "
        f"{-compute:+.0%} ({plain.time.seconds:.2f} -> {chosen.time.seconds:.2f} s/step); never at inference"
    )


def _phase_shortfall(c: Candidate, vram_ok: int, ram_ok: int, profile: HardwareProfile) -> str:
    parts = []
    for name, p in c.phases.items():
        over_v = p.vram_peak_bytes - p.vram.get("reserve", 0) - vram_ok
        over_r = p.host_demand_bytes(profile.unified_memory) - ram_ok
        if over_v > 0:
            parts.append(f"{name} needs {over_v / GIB:.1f} GiB more VRAM")
        if over_r > 0:
            shared = " (device memory is host RAM here: both counted once, together)" if profile.unified_memory else ""
            parts.append(f"{name} needs {over_r / GIB:.1f} GiB more host RAM{shared}")
    return f"does not fit profile '{profile.name}' even with {c.settings.describe()}: " + "; ".join(parts)


def _unfit_plan(
    cfg: RunConfig,
    profile: HardwareProfile,
    best: Candidate,
    vram_ok: int,
    ram_ok: int,
    assumptions: tuple[str, ...],
    cache_dir,
    efficiency: float,
    suggest: bool,
    gpus: int,
    choose: bool,
    shape_lines: list[str] = (),
) -> Plan:
    reason = _phase_shortfall(best, vram_ok, ram_ok, profile)
    settings = {**cfg.dotted(), **best.settings.dotted(), "memory.profile": cfg.memory.profile or profile.name}
    if suggest:
        reason += "; " + _suggestion(cfg, profile, cache_dir, efficiency, gpus, choose)
    return Plan(
        fits=False,
        profile=profile.name,
        settings=settings,
        step_seconds_estimate=round(best.time.seconds, 3),
        phases=best.phases,
        vram_usable_bytes=vram_ok,
        ram_usable_bytes=ram_ok,
        explanation=(*shape_lines, f"closest: {best.settings.describe()}"),
        reason=reason,
        assumptions=assumptions,
        step=best.time,
        step_time_measured=profile.train_tflops is not None,
        config=apply_overrides(cfg, settings),
    )


def _suggestion(cfg: RunConfig, profile: HardwareProfile, cache_dir, efficiency: float, gpus: int, choose: bool) -> str:
    """What would fit instead: the smallest batch, then about half the frames (each checked with a real plan)."""
    fewer_frames = max(9, (cfg.data.frames - 1) // 2 // 8 * 8 + 1)
    trials = []
    if cfg.train.batch_size > gpus:
        trials.append((f"--batch {gpus}", {"train.batch_size": gpus}))
    if cfg.data.frames > fewer_frames:
        suffix = f" --batch {gpus}" if cfg.train.batch_size > gpus else ""
        trials.append((f"--frames {fewer_frames}{suffix}", {"data.frames": fewer_frames, "train.batch_size": gpus}))
    backend = cfg.data.data_backend_config
    for flag, change in trials:
        smaller = apply_overrides(cfg, change)
        plan = plan_run(
            smaller, profile, choose=choose, cache_dir=cache_dir, efficiency=efficiency, gpus=gpus, _suggest=False,
            _shape=False,  # `cfg` is already at the data's largest bucket
        )
        if plan.fits:
            if backend and "data.frames" in change:  # the frames come from the datasets' video.num_frames
                flag = flag.replace(f"--frames {change['data.frames']}", f"video.num_frames = {change['data.frames']} "
                                    f"in {backend}")  # fmt: skip
            return f"try {flag}"
    return "try a lower resolution or fewer frames, or a profile with more memory"


def budget_settings(
    cfg: RunConfig,
    profile: HardwareProfile,
    settings: Settings,
    *,
    cache_dir=None,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> Plan:
    """The budget of exactly `settings` (nothing chosen): for tests against measured runs (e.g. the tiny model on
    the simulated device) and for `--config` evaluation by callers that already hold a Settings."""
    cache = MeasureCache(cache_dir)
    m = collect_measurements(cfg, profile, cache)
    opts = _budget_options(cfg, efficiency)
    c = _evaluate(m, settings, profile, opts, cfg.memory.vram_safety_margin)
    vram_ok, ram_ok = _usable(profile, cfg.memory.vram_safety_margin)
    dotted = {**cfg.dotted(), **settings.dotted()}
    return Plan(
        fits=c.fits,
        profile=profile.name,
        settings=dotted,
        step_seconds_estimate=round(c.time.seconds, 3),
        phases=c.phases,
        vram_usable_bytes=vram_ok,
        ram_usable_bytes=ram_ok,
        reason=None if c.fits else _phase_shortfall(c, vram_ok, ram_ok, profile),
        step=c.time,
        step_time_measured=profile.train_tflops is not None,
        config=apply_overrides(cfg, dotted),
    )


@dataclass(frozen=True)
class PeakPrediction:
    """The planner's train-phase device peak for exact settings, split the way a measured step is compared."""

    step_bytes: int  # one forward + backward: resident weights, LoRA params + grads, activations, offload buffers
    optimizer_bytes: int  # optimizer state (alive from the first optimizer step on)
    reserve_bytes: int  # the profile's context / fragmentation reserve (not an allocation)
    components: dict[str, int]  # step_bytes by component, as the plan table shows them

    @property
    def total_bytes(self) -> int:
        return self.step_bytes + self.optimizer_bytes + self.reserve_bytes


def _measured(cfg: RunConfig, profile: HardwareProfile, cache: MeasureCache, num_layers: int | None):
    """The planner's measurements for `cfg`, at `num_layers` blocks when given (the blocks are identical)."""
    m = collect_measurements(cfg, profile, cache)
    return m if num_layers is None else replace(m, num_layers=num_layers)


def predict_peak(
    cfg: RunConfig,
    profile: HardwareProfile,
    settings: Settings,
    *,
    num_layers: int | None = None,
    cache_dir=None,
) -> PeakPrediction:
    """The train phase's device peak for exactly `settings`, from the same measurements and budget as `plan_run`.

    `num_layers` overrides the model's depth (the blocks are identical, so the one-block measurement composes to
    any depth): the offload tests run a 4-6 block tiny model on the simulated device and compare.
    """
    m = _measured(cfg, profile, MeasureCache(cache_dir), num_layers)
    train = budget(m, settings, profile, _budget_options(cfg, DEFAULT_EFFICIENCY))["train"]
    components = dict(train.vram)
    reserve = components.pop("reserve", 0)
    optimizer = components.pop("optimizer state", 0)
    return PeakPrediction(sum(components.values()), optimizer, reserve, components)


def predict_step_time(
    cfg: RunConfig,
    profile: HardwareProfile,
    settings: Settings,
    *,
    num_layers: int | None = None,
    cache_dir=None,
) -> StepTime:
    """The step time `plan_run` predicts for exactly `settings` (`num_layers` as in `predict_peak`): for tools that
    put a measured step beside it (tools/gpu_acceptance.py)."""
    m = _measured(cfg, profile, MeasureCache(cache_dir), num_layers)
    return step_time(m, settings, profile, _budget_options(cfg, DEFAULT_EFFICIENCY))


def predict_validation_peak(cfg, profile, settings: Settings, *, num_layers: int | None = None, cache_dir=None,
                            offload_optimizer: bool = False, vae_tiling: bool = False) -> PhaseBudget:  # fmt: skip
    """The validation phase's budget for exactly these settings (the simulated-device tests compare it)."""
    from lowvram.plan.validation import collect_validation, validation_budget

    cache = MeasureCache(cache_dir)
    m = _measured(cfg, profile, cache, num_layers)
    vm = collect_validation(cfg, model_configs(cfg.model.family), cache, attention=m.attention,
                            compute_dtype=_compute_dtype(cfg))  # fmt: skip
    opts = _budget_options(cfg, DEFAULT_EFFICIENCY)
    return validation_budget(m, vm, settings, profile, opts, offload_optimizer=offload_optimizer,
                             vae_tiling=vae_tiling)  # fmt: skip
