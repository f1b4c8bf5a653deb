"""The run assembly: what `lowvram train` and `lowvram cache` load, in which phase, with which plan.

Top to bottom: take the run folder (resume or start) -> decide memory with the planner -> the demo's clips ->
resolve hub ids -> cache text and latents in startup phases -> load the transformer -> hand everything to the
recipe (`train/loop.py`: `fit`, through `train/recover.py` which re-plans on out-of-memory with the function given
here) -> export the LoRA. The CLI calls this module; the recipe never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError
from lowvram.train.batches import BatchSource, DiskBatches
from lowvram.train.loop import (
    MemoryDecision,
    StepResult,
    _precision,
    _say,
    check_resume_settings,
    export_lora,
    inject_lora,
    read_metrics,
    resolve_total_steps,
)
from lowvram.train.run_folder import LORA_FILE

# --------------------------------------------------------------------------------------------------------------------
# The run, top to bottom: decide memory -> load -> cache -> set up -> train -> export


@dataclass
class RunResult:
    exit_code: int
    run_dir: Path | None = None
    lora_path: Path | None = None
    steps: list[StepResult] = field(default_factory=list)


def run_train(cfg, **options) -> int:
    """`lowvram train`: decide memory, load, cache, inject LoRA, train, export, print the memory summary.

    `options` are `_run`'s: `profile` a HardwareProfile (None: the probed machine; the tiny demo needs none), `force`,
    `dry_run`, `auto_recover`, `nproc`, and `host` the host RAM to budget against (plan.host.HostMemory; None: the
    profile's). Returns the exit code.
    """
    return run(cfg, **options).exit_code


def run_cache(cfg, *, profile=None) -> int:
    """`lowvram cache`: build the text and latent caches only, in their startup phases, and stop.

    The caches are portable files: a machine whose GPU cannot hold Gemma3 or the VAE can train from caches built
    elsewhere. Memory settings for caching (VAE options, text-encoder streaming) come from the plan for `profile`;
    whether training would fit there does not matter here. Returns the exit code.
    """
    from lowvram.console import make_console
    from lowvram.paths import writable_dir
    from lowvram.train.run_folder import run_folder_lock

    console = make_console()
    run_dir = writable_dir(cfg.output.output_dir, what="output_dir")
    with run_folder_lock(run_dir, command="cache"):  # a training there would share its caches and memory.jsonl
        return _run_cache(cfg, profile, run_dir, console)


def _run_cache(cfg, profile, run_dir: Path, console) -> int:
    from lowvram.device import get_backend
    from lowvram.telemetry import MemoryMonitor

    backend = get_backend("cpu" if cfg.model.family == "tiny" else "auto")
    decision = decide_memory(cfg, profile, force=True, console=None, caching_only=True)
    from lowvram.hub import resolve_model_paths

    decision = replace(decision, cfg=resolve_model_paths(decision.cfg, console))
    from lowvram.demo import is_demo, prepare_demo_dataset

    if is_demo(decision.cfg):
        prepare_demo_dataset(decision.cfg)
    monitor = MemoryMonitor(run_dir, backend)
    for phase in ("text_cache", "latent_cache"):
        vram_bytes, ram_bytes = decision.predicted_peaks(phase)
        monitor.set_prediction(phase, vram_bytes=vram_bytes, ram_bytes=ram_bytes)
    try:
        batches = cache_dataset(decision.cfg, run_dir, backend, monitor=monitor, console=console,
                                profile=decision.profile)  # fmt: skip
    finally:
        monitor.finish(console)
    console.print(f"{len(batches.items)} cached items ready in {_cache_dir(decision.cfg, run_dir)}")
    return 0


def run(cfg, *, console=None, **options) -> RunResult:
    """The whole run, holding the run folder's lock; where it starts (resume or step 0) is decided first.

    `options` are `_run`'s (profile, force, dry_run, auto_recover, nproc, host), passed on as given.
    """
    from lowvram.console import make_console
    from lowvram.paths import writable_dir
    from lowvram.train import distributed
    from lowvram.train.run_folder import choose_start, run_folder_lock

    if options.get("dry_run") or distributed.current() is not None:
        # A dry run writes nothing there; torchrun workers run under the lock their launcher holds.
        return _run(cfg, console=console, **options)
    run_dir = writable_dir(cfg.output.output_dir, what="output_dir")
    console = console or make_console()
    with run_folder_lock(run_dir, command="train"):
        start = choose_start(run_dir, cfg.checkpoint.resume, start_over=cfg.checkpoint.start_over,
                             say=lambda text: _say(console, text))  # fmt: skip
        # The decision is made once, before any work: the rest of the run (and torchrun's workers) get it as is.
        if start.resume is not None:
            check_resume_settings(start.resume, cfg)  # another rank or optimizer: refused before any work
        chosen = {"resume": None if start.resume is None else str(start.resume), "start_over": False}
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update=chosen)})
        return _run(cfg, console=console, **options)


def _run(
    cfg,
    *,
    profile=None,
    force: bool = False,
    dry_run: bool = False,
    auto_recover: bool = True,
    nproc: int = 1,
    console=None,
    host=None,
) -> RunResult:
    from lowvram.console import make_console
    from lowvram.device import get_backend
    from lowvram.fsutil import atomic_write_bytes
    from lowvram.plan.replan import plan_with_less_vram
    from lowvram.telemetry import MEMORY_FILE, MemoryMonitor
    from lowvram.train import distributed
    from lowvram.train.checkpoint import ResumeFailed
    from lowvram.train.recover import fit_with_recovery
    from lowvram.train.validation import ValidationJob, validation_prompts
    from lowvram.train.validation_adapters import render_validation_sets

    run_dir = Path(cfg.output.output_dir).expanduser()
    env = distributed.current()
    if nproc > 1 and env is None and not dry_run:
        # `--nproc N`: the same run under torchrun; every worker comes back here with its rank set.
        code = distributed.launch(cfg, profile=profile, nproc=nproc, force=force, auto_recover=auto_recover)
        return RunResult(exit_code=code, run_dir=run_dir)
    distributed.check_distributed_supported(cfg, 1 if env is None else env.world_size)
    from lowvram.fsutil import clean_stale_temp_files
    from lowvram.paths import writable_dir

    writable_dir(run_dir, what="output_dir")  # a read-only output folder fails now, not after hours of caching
    from lowvram import tracking

    tracking.check_installed(cfg)  # a tracker asked for but not installed: refused before any work
    from lowvram.hub import model_refs

    model_refs(cfg)  # a malformed hub id or a flavour its repo lacks: refused before planning (no network)
    if env is None and not dry_run:
        clean_stale_temp_files(run_dir)  # what a killed run left (checkpoints/ and the caches clean their own)
    # The tiny family is the CPU demo and test model; the real model goes to the accelerator when there is one.
    device_name = "cpu" if cfg.model.family == "tiny" else "auto"
    backend = get_backend(device_name) if env is None else distributed.start(device_name)
    # Only rank 0 talks; the others log to their own folder.
    console = console or make_console(quiet=not distributed.is_main())
    if cfg.model.family == "tiny":
        # The tiny model's matmuls are a few hundred FLOPs: intra-op threads only add overhead, and on a loaded
        # 2-core machine they thrash (measured 0.2 s/step on one thread, several seconds on two).
        torch.set_num_threads(1)

    # Under FSDP2 the plan is per GPU (sharded weights, gathered blocks) and keeps the weights' offload off.
    gpus = nproc if env is None else env.world_size
    decision = decide_memory(cfg, profile, force=force, console=console, gpus=gpus, host=host)
    cfg = decision.cfg
    from lowvram.demo import is_demo, prepare_demo_dataset

    if is_demo(cfg) and not dry_run:
        with distributed.main_first():
            prepare_demo_dataset(cfg)
    from lowvram.hub import download_estimate, resolve_model_paths

    if dry_run:
        for line in download_estimate(cfg).lines():  # hub ids: what the run would fetch; nothing is downloaded
            _say(console, line)
        return RunResult(exit_code=0 if decision.fits else 1, run_dir=run_dir)
    check_lora_targets(cfg)  # before hours of caching: a target that selects nothing or cannot be exported
    # Validation prompts are read now (a missing prompts file fails before caching) and encoded with the captions.
    job = ValidationJob(validation_prompts(cfg), cfg.validation.negative_prompt) if cfg.validation.enabled else None
    if job is not None:  # before caching: I2V / S2V files and dataset names checked (a reference image read), and
        # adapter files found and checked against this model (headers only)
        from lowvram.models.adapter_files import adapter_sets
        from lowvram.train.validation_inputs import read_inputs

        job.inputs = read_inputs(cfg)
        job.adapter_sets = adapter_sets(cfg)

    with distributed.main_first():  # hub ids -> files in the HF cache (fetched once, resumable; offline: cache only)
        cfg = resolve_model_paths(cfg, console)
    decision = replace(decision, cfg=cfg)

    # Files each start rewrites (the phases' memory.jsonl, the trackers' run.json): a resume that fails puts them back.
    rewritten = (distributed.rank_dir(run_dir) / MEMORY_FILE, run_dir / tracking.RUN_FILE)
    previous = {f: f.read_bytes() for f in rewritten if cfg.checkpoint.resume and f.is_file()}
    monitor = MemoryMonitor(distributed.rank_dir(run_dir), backend)
    # telemetry phase <- plan phase (the transformer's load is the plan's `load`)
    for phase, planned in (("text_cache",) * 2, ("latent_cache",) * 2, ("load_transformer", "load"),
                           ("train",) * 2, ("export",) * 2):  # fmt: skip
        vram_bytes, ram_bytes = decision.predicted_peaks(planned)
        monitor.set_prediction(phase, vram_bytes=vram_bytes, ram_bytes=ram_bytes)
    mirror = tracking.RunMirror(run_dir, [])  # trackers follow the run folder; the loop only says "a step ended"
    try:
        with distributed.main_first():  # rank 0 writes the caches; the others then find them ready
            batches = cache_dataset(cfg, run_dir, backend, monitor=monitor, console=console, profile=decision.profile,
                                    validation=job)  # fmt: skip
        if distributed.is_main():
            mirror = tracking.start(cfg, run_dir, plan=decision.plan, total_steps=resolve_total_steps(cfg, batches),
                                    metrics_dir=distributed.rank_dir(run_dir), console=console)  # fmt: skip
        # Validation decodes with the VAEs and the vocoder (never Gemma3: its prompts are cached): loaded on the host
        # when first needed.
        validation_parts = _Lazy(lambda: load_encoders(cfg, VAE_PARTS)) if job is not None else None
        compute_dtype, autocast_dtype = _precision(cfg, backend)
        rendered: set[int] = set()

        def render(step: int) -> list[Path]:
            vram_bytes, ram_bytes = decision.predicted_peaks("validation")
            monitor.set_prediction("validation", vram_bytes=vram_bytes, ram_bytes=ram_bytes)
            with monitor.phase("validation"):
                paths = render_validation_sets(cfg, job, validation_parts.get(), holder["transformer"],
                                               run_dir / "validation" / f"step-{step}", backend=backend,
                                               dtype=compute_dtype, autocast_dtype=autocast_dtype)  # fmt: skip
            rendered.add(step)
            return paths

        with monitor.phase("load_transformer"), distributed.in_turn():
            transformer = load_transformer(cfg, decision.profile)
            if env is not None:
                # FSDP2: each rank adds the LoRA and sends its shard to its GPU before the next rank loads, so the
                # host holds one whole transformer at a time, not one per process (fit() then finds it ready).
                torch.manual_seed(cfg.train.seed)
                inject_lora(transformer, cfg)
                distributed.shard_transformer(transformer, backend)
        holder = {"transformer": transformer}  # validation renders with whichever transformer is training
        validate = None
        if validation_parts is not None:

            def validate(step: int) -> None:
                paths = render(step)
                _say(console, f"validation: {len(paths)} clip(s) written to {paths[0].parent}")

        with monitor.phase("train"):
            transformer, result = fit_with_recovery(
                decision,
                transformer,
                batches,
                reload=lambda: load_transformer(cfg, decision.profile),
                run_dir=run_dir,
                backend=backend,
                console=console,
                auto_recover=auto_recover and env is None,
                validate=validate,
                on_new_transformer=lambda t: holder.update(transformer=t),
                after_step=mirror.sync,
                replan=plan_with_less_vram,  # the planner's step down, for the training phase alone
            )
        with monitor.phase("export"):
            with distributed.whole_lora(transformer) as writer:
                lora_path = export_lora(transformer, run_dir / LORA_FILE, cfg) if writer else None
            distributed.barrier()
        console.print(f"LoRA written to {lora_path}")
        if len(result) >= 20:
            first, last = (sum(r.loss for r in part) / len(part) for part in (result[:10], result[-10:]))
            console.print(f"mean loss: first 10 steps {first:.3f} -> last 10 steps {last:.3f}")
        if validation_parts is not None:
            holder["transformer"] = transformer
            logged = read_metrics(distributed.rank_dir(run_dir))
            final = logged[-1]["step"] if logged else 0
            if final not in rendered:
                paths = render(final)
                console.print(f"validation: {len(paths)} clip(s) written to {paths[0].parent}")
    except ResumeFailed:
        # A resume that did not resume leaves the run's memory.jsonl and run.json as they were.
        monitor.run_dir = None
        for path, content in previous.items():
            atomic_write_bytes(path, content)
        raise
    except torch.OutOfMemoryError as e:
        # Out of memory outside a training step (caching, loading, placing the model): one line, not a traceback.
        phase = monitor.phases[-1].name if monitor.phases else "startup"
        detail = (str(e).splitlines() or ["out of memory"])[0][:200]
        raise LowvramError(
            f"out of device memory in phase '{phase}' ({detail}); lower data.resolution, data.frames or "
            "train.batch_size (or set memory.vae_tiling = true for caching) and rerun: caches and checkpoints are kept"
        ) from None
    finally:
        monitor.finish(console)
        mirror.close()  # after the last phase and the final clip are written
        if env is not None:
            distributed.stop()
    return RunResult(exit_code=0, run_dir=run_dir, lora_path=lora_path, steps=result)


# --------------------------------------------------------------------------------------------------------------------
# Seams to the other rooms: models (loaders), data (caches), plan (the memory decision)


ENCODER_PARTS = ("video_vae", "audio_vae", "vocoder", "connectors", "text_encoder", "tokenizer")
TEXT_PARTS = ("text_encoder", "tokenizer", "connectors")
VAE_PARTS = ("video_vae", "audio_vae", "vocoder")


def load_encoders(cfg, parts: tuple[str, ...] = ENCODER_PARTS, profile=None, progress_for=None):
    """What caching (and validation) needs: VAEs, vocoder, connectors, text encoder, tokenizer; no transformer.

    `parts` picks a subset, so startup phasing loads the text side and the VAEs one after the other. A quantized
    text encoder is quantized while it is read (host RAM near the quantized size) and cached quantized.
    """
    from lowvram.models import ltx2

    if cfg.model.checkpoint is None:
        if cfg.model.family != "tiny":
            raise LowvramError("model.checkpoint is not set: give the official LTX-2 .safetensors file or a hub id "
                               "such as Lightricks/LTX-2 (--checkpoint)")
        loaded = ltx2.build_tiny_components(seed=0, version=cfg.model.version)
        for name in ("transformer", *(n for n in ENCODER_PARTS if n not in parts)):
            setattr(loaded, name, None)
        if "text_encoder" in parts:
            _quantize_in_memory(loaded.text_encoder, "text_encoder", cfg.model.text_encoder_precision)
        return loaded
    text_encoder_path = cfg.model.text_encoder_path if "text_encoder" in parts else None
    return ltx2.load_components(
        cfg.model.checkpoint, text_encoder_path, version=cfg.model.version, dtype=_weights_dtype(cfg), components=parts,
        text_encoder_precision=cfg.model.text_encoder_precision, quant_cache_dir=_quant_cache_dir(cfg),
        profile=profile, progress_for=progress_for,
    )  # fmt: skip


class _Lazy:
    """A value built on first use (validation's encoders: most runs never validate before the end)."""

    def __init__(self, build: Callable[[], Any]):
        self._build, self._value = build, None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._build()
        return self._value


def load_transformer(cfg, profile=None) -> torch.nn.Module:
    """The transformer alone, in the configured precision (loaded after the encoders are gone).

    A quantized precision is applied while the checkpoint is read, layer by layer, so host RAM peaks near the
    quantized size instead of bf16 + quantized (the seed's 34 GB); later runs load the quantized cache.
    """
    from lowvram.models import ltx2

    if cfg.model.checkpoint is None:
        transformer = ltx2.build_tiny_components(seed=0, version=cfg.model.version).transformer
        _quantize_in_memory(transformer, "transformer", cfg.model.precision)
        return transformer
    writer = {}

    def disk_tier(component, skeleton):
        # Blocks of the disk tier go to its file as they load, so the whole transformer is never in host RAM
        from lowvram.offload.disk_tier import DiskTierLoader, disk_block_indices

        memory = cfg.memory
        blocks = disk_block_indices(len(skeleton.transformer_blocks), memory.blocks_to_swap, memory.blocks_on_disk)
        folder = memory.disk_tier_dir or Path(cfg.output.output_dir) / "cache"
        writer["loader"] = DiskTierLoader(skeleton, Path(folder).expanduser(), blocks, "transformer_blocks")
        return writer["loader"].progress

    on_disk = (cfg.memory.blocks_on_disk or 0) > 0 and (cfg.memory.blocks_to_swap or 0) > 0
    transformer = ltx2.load_components(
        cfg.model.checkpoint, None, version=cfg.model.version, dtype=_weights_dtype(cfg), components=("transformer",),
        precision=cfg.model.precision, quant_cache_dir=_quant_cache_dir(cfg), profile=profile,
        progress_for=disk_tier if on_disk else None,
    ).transformer  # fmt: skip
    if "loader" in writer:
        transformer._lowvram_disk_tier_blocks = writer["loader"].finish()
    elif on_disk:
        from lowvram.errors import UsageError

        raise UsageError(
            f"memory.blocks_on_disk needs a quantized model.precision (the loader writes the disk tier while it "
            f"quantizes); '{cfg.model.precision}' loads whole: set memory.blocks_on_disk = 0"
        )
    return transformer


def _weights_dtype(cfg) -> torch.dtype:
    return torch.float32 if cfg.model.family == "tiny" or cfg.model.precision == "fp32" else torch.bfloat16


def _quant_cache_dir(cfg) -> Path:
    return Path(cfg.model.quantized_cache_dir or Path(cfg.output.output_dir) / "quant-cache").expanduser()


def _quantize_in_memory(module: torch.nn.Module, component: str, precision: str) -> None:
    """The tiny family is built in memory: quantize it in place, with the same exclude lists as a streamed load."""
    from lowvram.models.ltx2.checkpoint import quantize_loaded
    from lowvram.quant import parse_precision

    if parse_precision(precision).quantized:
        quantize_loaded(module, component, precision)


def _cache_dir(cfg, run_dir: Path) -> Path:
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else run_dir / "cache"


def cache_dataset(cfg, run_dir: Path, backend, *, monitor=None, console=None, profile=None,
                  validation=None) -> BatchSource:  # fmt: skip
    """Fill the text and latent caches (data/) in startup phases and return the resumable batch stream over them.

    Phase `text_cache`: Gemma3 + connectors on the device (their Linear weights streamed from host RAM with
    `memory.ramtorch_text_encoder`), every caption encoded, freed. Phase `latent_cache`: the VAEs, every clip encoded,
    freed. With `memory.offload_during_startup` (the default) each phase frees its models before the next loads,
    so the startup peak is the larger phase, not the sum; the transformer loads only afterwards.
    """
    from types import SimpleNamespace

    from torch import nn

    from lowvram.data.build import cache_latents, cache_text, start_caching
    from lowvram.data.dataset import data_config_from_run
    from lowvram.offload import apply_weight_streaming
    from lowvram.offload.phases import Phase, offload_during_startup
    from lowvram.vae import VaeOptions

    m = cfg.memory
    vae_options = VaeOptions(
        tiling=bool(m.vae_tiling),
        slicing=bool(m.vae_slicing),
        batch_size=m.vae_batch_size,
        patch_conv=bool(m.vae_patch_conv),
        temporal_roll=bool(m.vae_temporal_roll),
    )
    cache_dir = _cache_dir(cfg, run_dir)
    if cfg.model.checkpoint is not None:
        from lowvram.models.ltx2.checkpoint import open_checkpoint

        # Header only: a wrong, pickle or other-version checkpoint fails before any work.
        open_checkpoint(cfg.model.checkpoint, version=cfg.model.version)
    data = data_config_from_run(cfg)
    job = start_caching(data, strict=cfg.data.strict)  # finds bad files before any model loads
    if validation is not None:  # a `*_from_dataset` validation input picks its clip now, before any model loads
        from lowvram.train.validation_inputs import encode_inputs, pick_from_dataset

        pick_from_dataset(validation.inputs, job.items, data, cfg)
    tokenizers = []
    text_tier = None
    if m.text_encoder_on_disk:  # Gemma's decoder layers read from the disk tier's file while encoding
        from lowvram.offload.text_disk_tier import TextDiskTier

        text_tier = TextDiskTier(m.disk_tier_dir or Path(cfg.output.output_dir) / "cache")

    def load_text() -> nn.Module:
        try:
            parts = load_encoders(cfg, TEXT_PARTS, profile, progress_for=text_tier and text_tier.progress_for)
            if text_tier is not None:
                text_tier.apply(parts.text_encoder, backend)
        except BaseException:
            if text_tier is not None:
                text_tier.abort()
            raise
        tokenizers.append(parts.tokenizer)
        if m.ramtorch_text_encoder and backend.is_accelerator:
            apply_weight_streaming(parts.text_encoder, backend)
        return nn.ModuleDict({"text_encoder": parts.text_encoder, "connectors": parts.connectors})

    def encode_text(text: nn.Module) -> None:
        parts = SimpleNamespace(text_encoder=text["text_encoder"], connectors=text["connectors"],
                                tokenizer=tokenizers[-1])  # fmt: skip
        try:
            cache_text(job, parts, cache_dir, max_text_tokens=cfg.data.max_text_tokens)
            if validation is not None:  # encoded now, with the captions: Gemma3 is never loaded again for validation
                from lowvram.data.text_cache import build_text_cache

                texts = [*validation.prompts, validation.negative_prompt]
                done = build_text_cache(texts, parts, cache_dir, max_length=cfg.data.max_text_tokens)
                validation.text_paths.update(done.paths)
        finally:
            if text_tier is not None:
                text_tier.release()  # the file goes; the encoder (placeholders in its layers) is freed next

    if cfg.crepa.enabled:  # the DINOv2 folder / hub-cache entry is checked before any model loads
        from lowvram.data.crepa_features import CrepaFeatureEncoder, feature_dim, load_encoder
        from lowvram.plan.modes import check_crepa_for_run

        check_crepa_for_run(cfg)  # block index vs the model's depth, TREAD routes
        feature_dim(cfg.crepa.encoder)

    def load_vaes() -> nn.Module:
        parts = load_encoders(cfg, VAE_PARTS)
        mods = {"video_vae": parts.video_vae, "audio_vae": parts.audio_vae}
        if cfg.crepa.enabled:  # CREPA: DINOv2 visits the same decoded clips in this phase (planned with it)
            mods["crepa_encoder"] = load_encoder(cfg.crepa.encoder, dtype=next(parts.video_vae.parameters()).dtype)
        return nn.ModuleDict(mods)

    def encode_latents(vaes: nn.Module):
        crepa = None
        if "crepa_encoder" in vaes:
            crepa = CrepaFeatureEncoder.build(vaes["crepa_encoder"], cfg.crepa.image_size)
        parts = SimpleNamespace(video_vae=vaes["video_vae"], audio_vae=vaes["audio_vae"], crepa_encoder=crepa)
        summary = cache_latents(job, parts, cache_dir, vae_options=vae_options, audio=cfg.data.audio,
                                strict=cfg.data.strict)  # fmt: skip
        if validation is not None:  # the I2V frame / S2V audio, by the VAEs already here (no encoder visit later)
            encode_inputs(validation.inputs, parts.video_vae, parts.audio_vae, cache_dir, cfg, vae_options)
        return summary

    results = offload_during_startup(
        [Phase("text_cache", load_text, encode_text), Phase("latent_cache", load_vaes, encode_latents)],
        backend,
        monitor=monitor,
        phased=m.offload_during_startup is not False,
    )
    summary = results[-1].result
    _say(console, summary.format())
    return DiskBatches(summary.items, cfg.train.batch_size, seed=cfg.train.seed, fps=cfg.data.fps)


def check_lora_targets(cfg) -> None:
    """Refuse in one line, before anything is cached or loaded, LoRA targets that select no module or have no name
    in the configured export format (checked on the family's transformer built on meta: no memory)."""
    from lowvram.method import lora
    from lowvram.models import ltx2

    skeleton = ltx2.build_on_meta("transformer", family=cfg.model.family)
    spec = lora.as_spec(cfg.lora, include_audio=cfg.train.mode != "video")
    lora.export_names(lora.target_modules(skeleton, spec), spec.lora_format)


def decide_memory(
    cfg, profile, *, force: bool, console=None, gpus: int = 1, caching_only: bool = False, host=None
) -> MemoryDecision:
    """Settings the config leaves None are chosen by the planner for `profile` (None: the probed machine) and the
    run's real shapes; stated settings are evaluated as given. A run that would not fit is refused with what it
    lacks, unless `force` (or `caching_only`: only the caching phases' settings are wanted).
    """
    if cfg.model.family == "tiny" and profile is None:
        # The CPU demo: nothing to plan (checkpointing stays on, as everywhere).
        _say(console, "tiny model on CPU without --profile: no memory plan needed")
        return MemoryDecision(cfg=cfg, fits=True)
    from lowvram.config import apply_overrides
    from lowvram.plan import plan_run

    if profile is None:
        from lowvram.hardware import probe

        _, profile = probe(measure_bandwidth=False)
    # choose=False: precisions and optimizer stay the config's; memory settings left None are chosen.
    plan = plan_run(cfg, profile, choose=False, gpus=gpus, host=host)  # gpus > 1: FSDP2, budgeted per GPU
    if console is not None:
        plan.render(console)
    if not plan.fits:
        if not force:
            raise LowvramError(
                f"{plan.reason or 'the run does not fit'} (profile '{profile.name}'; --force tries anyway)"
            )
        if not caching_only:
            _say(console, "[yellow]--force: training although the plan says it will not fit[/yellow]")
    chosen = {k: v for k, v in plan.settings.items() if k.startswith(("memory.", "validation."))}
    cache_phases = [plan.phases[n] for n in ("text_cache", "latent_cache") if n in plan.phases]
    train_phase = plan.phases.get("train")
    return MemoryDecision(
        cfg=apply_overrides(cfg, chosen),
        fits=plan.fits,
        predicted_vram_bytes=train_phase.vram_peak_bytes if train_phase else None,
        predicted_ram_bytes=train_phase.ram_peak_bytes if train_phase else None,
        predicted_cache_vram_bytes=max((p.vram_peak_bytes for p in cache_phases), default=None),
        predicted_cache_ram_bytes=max((p.ram_peak_bytes for p in cache_phases), default=None),
        plan=plan,
        profile=profile,
    )
