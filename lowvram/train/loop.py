"""The training recipe: cached batches -> forward -> loss -> backward -> clip -> optimizer -> schedule, told in order.

Memory strategies (offload, quantization, checkpointing) are applied to the modules before the loop starts, by the
plan; the loop never asks which one is active. It does not decode media, build models or choose memory settings:
it calls data/, models/, plan/ and offload/ for those, each through one small function below.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError
from lowvram.fsutil import atomic_write_text
from lowvram.train.batches import BatchSource, DiskBatches, LatentBatch
from lowvram.train.modes import build_modes
from lowvram.train.objective import ObjectiveConfig, flow_loss, prepare_inputs
from lowvram.train.run_folder import LORA_FILE, METRICS_FILE
from lowvram.train.tread import TreadRouter

# --------------------------------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    loss: float
    loss_video: float
    loss_audio: float
    grad_norm: float
    lr: float


@dataclass
class TrainContext:
    """The live objects of a run. Built once by `run_train` (or a test); the loop only reads them."""

    transformer: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: BatchSource
    objective: ObjectiveConfig
    generator: torch.Generator  # all objective randomness (σ, noise, first-frame coins): CPU, checkpointed
    device: torch.device = torch.device("cpu")
    compute_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    audio_channels: int | None = None
    video_channels: int | None = None
    data_parallel: Any = None  # distributed.DataParallel under torchrun: this rank's rows and the global loss
    modes: tuple = ()  # train/modes/: each prepares the step's inputs (build_modes)


@contextlib.contextmanager
def _inference(module: torch.nn.Module):
    """The module in eval mode (no LoRA dropout) for a no-grad prediction, back in its mode afterwards."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def forward_loss(ctx: TrainContext, batch: LatentBatch):
    """Noise one batch, run the transformer, return the loss parts (total has grad)."""
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward

    dev, dt = ctx.device, ctx.compute_dtype
    objective = ctx.objective
    if objective.mode == "av" and (batch.video is None or batch.audio is None):
        # A bucket of audio-only items (or of silent clips) trains the modality it has, with the other isolated.
        objective = replace(objective, mode="audio" if batch.video is None else "video")
    inputs = prepare_inputs(
        None if batch.video is None else batch.video.to(dev, dt),
        None if batch.audio is None else batch.audio.to(dev, dt),
        latent_frames=batch.latent_frames,
        latent_height=batch.latent_height,
        latent_width=batch.latent_width,
        cfg=objective,
        generator=ctx.generator,
        audio_channels=ctx.audio_channels,
        video_channels=ctx.video_channels,
        audio_present=batch.audio_present,
    )
    text = TextEmbeddings(
        video=batch.text_video.to(dev, dt), audio=batch.text_audio.to(dev, dt), mask=batch.text_mask.to(dev)
    )
    autocast = (
        torch.autocast(dev.type, dtype=ctx.autocast_dtype)
        if ctx.autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def predict(inp, *, inference: bool = False):
        with autocast, _inference(ctx.transformer) if inference else contextlib.nullcontext():
            return transformer_forward(
                ctx.transformer,
                video_tokens=inp.video_noisy,
                audio_tokens=inp.audio_noisy,
                text=text,
                video_sigma=inp.video_sigma,
                audio_sigma=inp.audio_sigma,
                video_token_sigma=inp.video_token_sigma,
                latent_frames=inp.latent_frames,
                latent_height=inp.latent_height,
                latent_width=inp.latent_width,
                fps=batch.fps,
                isolate_modalities=inp.isolate_modalities,
            )

    for mode in ctx.modes:  # training modes (train/modes/): rolled-out inputs and the like
        inputs = mode.prepare(inputs, predict, ctx.generator)
    if ctx.data_parallel is not None:
        # The whole batch was noised (same draws as one process); this rank runs only its rows through the model.
        local = ctx.data_parallel.take_rows(inputs, text)
        inputs, text = local.inputs, local.text
    video_pred, audio_pred = predict(inputs)
    if ctx.data_parallel is not None:
        return ctx.data_parallel.loss(video_pred, audio_pred, local, objective)
    return flow_loss(video_pred, audio_pred, inputs, objective)


def train_step(ctx: TrainContext) -> StepResult:
    """One optimizer step: accumulate gradients over micro-batches, clip, step, schedule."""
    sums = 0
    for _ in range(ctx.accumulation_steps):
        parts = forward_loss(ctx, next(ctx.batches))
        (parts.total / ctx.accumulation_steps).backward()
        sums = sums + torch.stack([parts.total.detach(), parts.video.detach(), parts.audio.detach()]).float()
    # One host read per step, not three per micro-batch: each read is a device sync on a GPU.
    total, video, audio = (sums / ctx.accumulation_steps).tolist()
    if ctx.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(ctx.params, ctx.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: global norm
    else:
        grad_norm = float(
            torch.linalg.vector_norm(
                torch.stack([p.grad.detach().float().norm() for p in ctx.params if p.grad is not None])
            )
        )
    lr = ctx.optimizer.param_groups[0]["lr"]
    try:
        ctx.optimizer.step()
    except torch.OutOfMemoryError as e:
        e.during_update = True  # some parameters may already be updated: the in-memory state is not a step's
        raise
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total, loss_video=video, loss_audio=audio, grad_norm=grad_norm, lr=lr)


class StepOutOfMemory(Exception):
    """The device ran out of memory during step `step + 1`; the state is that of `step` (unless not intact)."""

    def __init__(self, step: int, *, state_intact: bool):
        super().__init__(f"out of memory after step {step}")
        self.step = step
        self.state_intact = state_intact


def train(
    ctx: TrainContext,
    *,
    start_step: int,
    total_steps: int,
    on_step: Callable[[int, StepResult, float], None] | None = None,
) -> list[StepResult]:
    """Run optimizer steps `start_step+1 .. total_steps`; `on_step(step, result, seconds)` after each."""
    ctx.transformer.train()
    results = []
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        before = None
        try:
            # What a step consumes from the random streams and the data, so a failed step can be undone exactly.
            before = (ctx.generator.get_state(), torch.get_rng_state(), ctx.batches.position())
            result = train_step(ctx)
        except torch.OutOfMemoryError as e:
            ctx.optimizer.zero_grad(set_to_none=True)
            if before is not None:
                ctx.generator.set_state(before[0])
                torch.set_rng_state(before[1])
                ctx.batches.seek(before[2])
            raise StepOutOfMemory(step - 1, state_intact=not getattr(e, "during_update", False)) from e
        if not math.isfinite(result.loss):
            raise LowvramError(
                f"loss became {result.loss} at step {step}: lower optim.learning_rate or check the cached latents"
            )
        results.append(result)
        if on_step is not None:
            on_step(step, result, time.perf_counter() - t0)
    return results


# --------------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """`metrics.jsonl`: one JSON object per optimizer step, appended and flushed as the step ends."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        # A resumed run drops records past the checkpoint it continues from, so the file tells one history.
        kept = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= resume_step and resume_step > 0:
                        kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------------
# Progress bar


class Progress:
    """A rich progress bar: step, loss, s/step, peak VRAM and RAM."""

    def __init__(self, total_steps: int, start_step: int, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[sps]} s/step"),
            TextColumn("VRAM {task.fields[vram]}"),
            TextColumn("RAM {task.fields[ram]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task(
            "train", total=total_steps, completed=start_step, loss="-", sps="-", vram="-", ram="-", status=""
        )

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def note(self, text: str) -> None:
        """A status beside the bar (e.g. 'validating at step 200'); empty clears it."""
        self._bar.update(self._task, status=text)
        self._bar.refresh()

    def update(self, step: int, loss: float, seconds: float, vram_peak_bytes: int | None, rss_peak_bytes: int) -> None:
        self._bar.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            sps=f"{seconds:.2f}",
            vram="-" if not vram_peak_bytes else f"{vram_peak_bytes / 2**30:.2f}G",
            ram=f"{rss_peak_bytes / 2**30:.2f}G",
        )


# --------------------------------------------------------------------------------------------------------------------
# The run, top to bottom: decide memory -> load -> cache -> set up -> train -> export


@dataclass(frozen=True)
class MemoryDecision:
    """The memory settings a run trains with, and what the planner predicts for them."""

    cfg: Any  # RunConfig with every memory setting decided
    fits: bool
    predicted_vram_bytes: int | None = None  # the train phase
    predicted_ram_bytes: int | None = None
    predicted_cache_vram_bytes: int | None = None  # the caching phase (text and latent caches)
    predicted_cache_ram_bytes: int | None = None
    plan: Any = None  # the planner's Plan
    profile: Any = None

    def predicted_peaks(self, phase: str) -> tuple[int | None, int | None]:
        """(VRAM, host RAM) the plan predicts for a telemetry phase; (None, None) without a plan."""
        if phase == "train":
            return self.predicted_vram_bytes, self.predicted_ram_bytes
        budget = self.plan.phases.get(phase) if self.plan is not None else None
        return (budget.vram_peak_bytes, budget.ram_peak_bytes) if budget is not None else (None, None)


@dataclass
class RunResult:
    exit_code: int
    run_dir: Path | None = None
    lora_path: Path | None = None
    steps: list[StepResult] = field(default_factory=list)


def run_train(
    cfg,
    *,
    profile=None,
    force: bool = False,
    dry_run: bool = False,
    auto_recover: bool = True,
    nproc: int = 1,
    host=None,
) -> int:
    """`lowvram train`: decide memory, load, cache, inject LoRA, train, export, print the memory summary.

    `profile` is a HardwareProfile (None: the probed machine; the tiny demo needs none); `host` the host RAM to
    budget against (plan.host.HostMemory; None: the profile's). Returns the exit code.
    """
    return run(
        cfg, profile=profile, force=force, dry_run=dry_run, auto_recover=auto_recover, nproc=nproc, host=host
    ).exit_code


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


def run(
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
    """The whole run, holding the run folder's lock; where it starts (resume or step 0) is decided first."""
    from lowvram.console import make_console
    from lowvram.paths import writable_dir
    from lowvram.train import distributed
    from lowvram.train.run_folder import choose_start, run_folder_lock

    kwargs = dict(profile=profile, force=force, dry_run=dry_run, auto_recover=auto_recover, nproc=nproc, host=host)
    if dry_run or distributed.current() is not None:
        # A dry run writes nothing there; torchrun workers run under the lock their launcher holds.
        return _run(cfg, console=console, **kwargs)
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
        return _run(cfg, console=console, **kwargs)


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
    from lowvram.telemetry import MEMORY_FILE, MemoryMonitor
    from lowvram.train import distributed
    from lowvram.train.checkpoint import ResumeFailed
    from lowvram.train.recover import fit_with_recovery
    from lowvram.train.validation import ValidationJob, render_validation, validation_prompts

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
                paths = render_validation(cfg, job, validation_parts.get(), holder["transformer"],
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


def fit(
    cfg,
    transformer: torch.nn.Module,
    batches: BatchSource,
    *,
    run_dir: Path,
    backend=None,
    decision: MemoryDecision | None = None,
    console=None,
    stop_after: int | None = None,
    validate: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[StepResult]:
    """Inject the LoRA, apply the memory plan, build optimizer and schedule, resume if asked, and train.

    `stop_after` ends the run early after that step (tests of resume use it as a clean interruption);
    `validate(step)` renders a sample every `validation.every_n_steps` steps; `after_step(step)` runs after each.
    """
    from lowvram.device import get_backend
    from lowvram.models.versions import check_resume_version, version_of_transformer_config
    from lowvram.telemetry import process_rss_bytes
    from lowvram.train import checkpoint, distributed
    from lowvram.train.optim import build_lr_scheduler, build_optimizer
    from lowvram.train.validation import optimizer_off_device

    backend = backend or get_backend("cpu")
    decision = decision or MemoryDecision(cfg=cfg, fits=True)
    run_dir = Path(run_dir)

    torch.manual_seed(cfg.train.seed)  # LoRA initialisation draws from the global generator
    inject_lora(transformer, cfg)
    if cfg.optim.optimizer != "adamw_bf16":
        # fp32 master copies of the LoRA weights: Adam updates are far below a bf16 ulp of the weight. adamw_bf16
        # keeps them in the base dtype and rounds stochastically instead.
        for p in transformer.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    env = distributed.current()
    if env is not None:
        # FSDP2: each rank holds 1/N of every block and trains its rows of each global batch. Sharded before the
        # memory plan places the module, so each GPU only ever receives its shard.
        distributed.shard_transformer(transformer, backend)
        batches = distributed.rank_batches(batches, env)
    applied = apply_memory_plan(transformer, decision, backend)
    # Checkpoints hold whole tensors whatever the process count (rank 0 writes; a single process just writes).
    ckpt = checkpoint if env is None else distributed
    if cfg.train.tread_routes:
        TreadRouter(transformer, cfg.train.tread_routes)
        _say(
            console,
            "TREAD routes: "
            + ", ".join(
                f"{r.selection_ratio:g} of video tokens skip blocks {r.start_layer_idx}..{r.end_layer_idx}"
                for r in cfg.train.tread_routes
            ),
        )
    params = [p for p in transformer.parameters() if p.requires_grad]

    total_steps = resolve_total_steps(cfg, batches)
    optimizer = build_optimizer(params, cfg.optim, bitsandbytes_supported=_bnb_supported(decision), seed=cfg.train.seed)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    compute_dtype, autocast_dtype = _precision(cfg, backend)
    ctx = TrainContext(
        transformer=transformer,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        objective=ObjectiveConfig.from_train_section(cfg.train),
        generator=generator,
        device=backend.device,
        compute_dtype=compute_dtype,
        autocast_dtype=autocast_dtype,
        accumulation_steps=cfg.train.gradient_accumulation_steps,
        max_grad_norm=cfg.optim.max_grad_norm,
        audio_channels=transformer.config.audio_in_channels,
        video_channels=transformer.config.in_channels,
        data_parallel=None if env is None else distributed.DataParallel(env),
        modes=build_modes(cfg),
    )

    start_step = 0
    model_version = version_of_transformer_config(transformer.config)  # what the weights are, named in checkpoints
    resume_path = checkpoint.resolve_resume(run_dir, cfg.checkpoint.resume)
    if resume_path is not None:
        check_resume_settings(resume_path, cfg)
        try:
            info = ckpt.load_checkpoint(
                resume_path,
                model=transformer,
                optimizer=optimizer,
                scheduler=scheduler,
                generator=generator,
                backend=backend,
            )
        except LowvramError as e:
            raise checkpoint.ResumeFailed(str(e)) from None
        except Exception as e:  # e.g. torch refusing a state dict of another shape
            first = (str(e).splitlines() or [""])[0][:300]
            raise checkpoint.ResumeFailed(f"cannot resume from {resume_path}: {type(e).__name__}: {first}") from None
        check_resume_version(info.extra.get("model_version"), model_version, resume_path)
        batches.seek(info.data_position)
        start_step = info.step
        for schedule in scheduler.lr_lambdas:  # a longer --max-steps stretches the decay from here on
            schedule.total_steps = total_steps
        _say(console, f"resumed from {resume_path} at step {start_step}")
    elif cfg.checkpoint.resume == "latest":
        _say(console, "no checkpoint to resume from: starting at step 0")

    _say(console, f"memory: {applied.describe()}")
    _say(
        console,
        f"training {sum(p.numel() for p in params):,} LoRA parameters for {total_steps} steps "
        f"({batches.batches_per_epoch()} batches/epoch, batch {cfg.train.batch_size}, "
        f"accumulation {cfg.train.gradient_accumulation_steps})",
    )
    metrics = MetricsLog(distributed.rank_dir(run_dir), resume_step=start_step)
    last_step = total_steps if stop_after is None else min(total_steps, stop_after)
    every = cfg.checkpoint.every_n_steps

    def save(step: int) -> None:
        try:
            ckpt.save_checkpoint(
                run_dir,
                step=step,
                model=transformer,
                optimizer=optimizer,
                scheduler=scheduler,
                generator=generator,
                data_position=batches.position(),
                keep_last=cfg.checkpoint.keep_last,
                extra={"total_steps": total_steps, "settings": resume_settings(cfg), "model_version": model_version},
                backend=backend,
            )
        except Exception as e:
            if env is not None:
                raise  # sharded: the export is collective, and the ranks are no longer in step
            raise _checkpoint_failed(step, e, transformer, run_dir, cfg) from None

    peak_rss = [0]
    try:
        with Progress(total_steps, start_step, console=console) as progress:

            def on_step(step: int, r: StepResult, seconds: float) -> None:
                vram = backend.memory_stats().max_allocated_bytes if backend.is_accelerator else None
                validation_seconds = None
                if validate is not None and cfg.validation.every_n_steps and step % cfg.validation.every_n_steps == 0:
                    progress.note(f"validating at step {step}")
                    t0 = time.perf_counter()
                    with optimizer_off_device(optimizer, backend) if cfg.validation.offload_optimizer else \
                            contextlib.nullcontext():  # fmt: skip
                        validate(step)
                    validation_seconds = time.perf_counter() - t0
                    progress.note("")
                rss = process_rss_bytes()
                peak_rss[0] = max(peak_rss[0], rss)
                metrics.write(
                    {
                        "step": step,
                        "loss": r.loss,
                        "loss_video": r.loss_video,
                        "loss_audio": r.loss_audio,
                        "lr": r.lr,
                        "grad_norm": r.grad_norm,
                        "s_per_step": seconds,
                        "epoch": batches.position()["epoch"],
                        "peak_vram_bytes": vram,
                        "rss_bytes": rss,
                        **({"validation_seconds": validation_seconds} if validation_seconds is not None else {}),
                    }
                )
                progress.update(step, r.loss, seconds, vram, peak_rss[0])
                if (every and step % every == 0) or step == last_step:
                    save(step)
                if after_step is not None:
                    after_step(step)

            try:
                results = train(ctx, start_step=start_step, total_steps=last_step, on_step=on_step)
            except StepOutOfMemory as oom:
                saved = {p.name for p in checkpoint.list_checkpoints(run_dir)}
                if oom.state_intact and oom.step > start_step and f"step-{oom.step:08d}" not in saved:
                    save(oom.step)  # the last completed step is kept: recovery resumes exactly there
                raise
    finally:
        metrics.close()
    return results


def resume_settings(cfg) -> dict[str, Any]:
    """The settings a checkpoint's state belongs to: resuming under others would load into another LoRA or
    optimizer (or silently train on with another one), so a resume with different values is refused."""
    return {
        "optim.optimizer": cfg.optim.optimizer,
        "lora.rank": cfg.lora.rank,
        "lora.alpha": cfg.lora.alpha,
        "lora.targets": list(cfg.lora.targets),
        "train.mode": cfg.train.mode,
    }


def check_resume_settings(path: Path, cfg) -> None:
    """ResumeFailed (one line, exit 1) naming the first setting that differs from the checkpoint's run."""
    from lowvram.train.checkpoint import ResumeFailed, read_state

    trained = read_state(path).get("extra", {}).get("settings") or {}  # checkpoints before this check hold none
    for key, now in resume_settings(cfg).items():
        if key in trained and trained[key] != now:
            raise ResumeFailed(
                f"checkpoint {path} was trained with {key} = {json.dumps(trained[key])} and this run sets "
                f"{json.dumps(now)}: resume with {key} = {json.dumps(trained[key])}, or train into another --output-dir"
            )


def _checkpoint_failed(step: int, err: Exception, transformer: torch.nn.Module, run_dir: Path, cfg) -> LowvramError:
    """A checkpoint that cannot be written stops the run, but the LoRA trained so far is written first."""
    detail = str(err) if isinstance(err, LowvramError) else f"{type(err).__name__}: {err}"
    detail = (detail.splitlines() or [type(err).__name__])[0][:300]
    try:
        lora = export_lora(transformer, run_dir / LORA_FILE, cfg)
        kept = f"the LoRA trained so far (step {step}) is in {lora}"
    except Exception as e2:  # e.g. the disk that refused the checkpoint refuses the LoRA too
        kept = f"the LoRA could not be written either ({(str(e2).splitlines() or [type(e2).__name__])[0][:200]})"
    return LowvramError(f"the checkpoint of step {step} could not be saved ({detail}); {kept}")


def describe_memory(cfg) -> str:
    m = cfg.memory
    parts = []
    if m.blocks_to_swap:
        parts.append(f"block swap {m.blocks_to_swap}")
    if m.ramtorch:
        parts.append(f"weight streaming {m.ramtorch}")
    if m.group_offload:
        parts.append("group offload")
    if m.activation_offload:
        parts.append("activation offload")
    parts.append("checkpointing" if m.gradient_checkpointing is not False else "no checkpointing")
    return ", ".join(parts)


def resolve_total_steps(cfg, batches: BatchSource) -> int:
    if cfg.train.max_train_steps > 0:
        return cfg.train.max_train_steps
    if cfg.train.num_train_epochs > 0:
        per_epoch = max(1, batches.batches_per_epoch() // cfg.train.gradient_accumulation_steps)
        return cfg.train.num_train_epochs * per_epoch
    raise LowvramError("train.max_train_steps and train.num_train_epochs are both 0: set one of them")


def _precision(cfg, backend) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype inputs are cast to, autocast dtype or None). bf16 autocast on accelerators; CPU trains in fp32."""
    if cfg.train.mixed_precision == "bf16" and backend.is_accelerator:
        return torch.bfloat16, torch.bfloat16
    return torch.float32, None


def _bnb_supported(decision: MemoryDecision) -> bool:
    return True if decision.profile is None else bool(decision.profile.supports.bitsandbytes)


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


# --------------------------------------------------------------------------------------------------------------------
# Seams to the other rooms of the house: models (load, LoRA), data (caches), plan (4b) and offload (strategies)


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
    from lowvram.models.ltx2_checkpoint import quantize_loaded
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
        from lowvram.models.ltx2_checkpoint import open_checkpoint

        # Header only: a wrong, pickle or other-version checkpoint fails before any work.
        open_checkpoint(cfg.model.checkpoint, version=cfg.model.version)
    job = start_caching(data_config_from_run(cfg), strict=cfg.data.strict)  # finds bad files before any model loads
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

    def load_vaes() -> nn.Module:
        parts = load_encoders(cfg, VAE_PARTS)
        return nn.ModuleDict({"video_vae": parts.video_vae, "audio_vae": parts.audio_vae})

    def encode_latents(vaes: nn.Module):
        parts = SimpleNamespace(video_vae=vaes["video_vae"], audio_vae=vaes["audio_vae"])
        return cache_latents(job, parts, cache_dir, vae_options=vae_options, audio=cfg.data.audio,
                             strict=cfg.data.strict)  # fmt: skip

    results = offload_during_startup(
        [Phase("text_cache", load_text, encode_text), Phase("latent_cache", load_vaes, encode_latents)],
        backend,
        monitor=monitor,
        phased=m.offload_during_startup is not False,
    )
    summary = results[-1].result
    _say(console, summary.format())
    return DiskBatches(summary.items, cfg.train.batch_size, seed=cfg.train.seed, fps=cfg.data.fps)


def inject_lora(transformer: torch.nn.Module, cfg) -> None:
    """Add trainable LoRA adapters to the configured targets; audio-only modules are left out in video mode."""
    from lowvram.train import lora

    if lora.lora_layers(transformer):
        return  # already added (a sharded run adds it while loading, before FSDP2 shards the module)
    lora.inject_lora(transformer, cfg.lora, include_audio=cfg.train.mode != "video")


def check_lora_targets(cfg) -> None:
    """Refuse in one line, before anything is cached or loaded, LoRA targets that select no module or have no name
    in the configured export format (checked on the family's transformer built on meta: no memory)."""
    from lowvram.models import ltx2
    from lowvram.train import lora

    skeleton = ltx2.build_on_meta("transformer", family=cfg.model.family)
    spec = lora.as_spec(cfg.lora, include_audio=cfg.train.mode != "video")
    lora.export_names(lora.target_modules(skeleton, spec), spec.lora_format)


def export_lora(transformer: torch.nn.Module, path: Path, cfg) -> Path:
    """Write the user-facing LoRA (`diffusion_model.*` keys, alpha folded into B) atomically."""
    from lowvram.train import lora

    return lora.export_lora(transformer, path, cfg.lora)


def apply_memory_plan(transformer: torch.nn.Module, decision: MemoryDecision, backend):
    """Hand the transformer to the offload strategies the settings name, then place what stays resident."""
    from lowvram import offload

    memory = decision.cfg.memory
    if memory.gradient_checkpointing is None:
        # On by default: block activations are recomputed in backward, the biggest single saving.
        memory = memory.model_copy(update={"gradient_checkpointing": True})
    if getattr(memory, "blocks_on_disk", None) and memory.disk_tier_dir is None:
        memory = memory.model_copy(update={"disk_tier_dir": str(Path(decision.cfg.output.output_dir) / "cache")})
    prewritten = getattr(transformer, "_lowvram_disk_tier_blocks", None)  # written by load_transformer
    applied = offload.apply_memory_plan(transformer, memory, backend, prewritten=prewritten)
    backend.place_module(transformer)
    return applied


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
