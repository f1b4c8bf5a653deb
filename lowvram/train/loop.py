"""The training recipe: cached batches -> forward -> loss -> backward -> clip -> optimizer -> schedule, told in order.

One step (`train_step`), the loop over steps (`train`), and `fit`: LoRA in, memory plan applied, optimizer and
schedule built, resume, the loop with its metrics and checkpoints. Memory strategies (offload, quantization,
checkpointing) are applied to the modules before the loop starts, as the decision says; the loop never asks which
one is active. It loads no model, builds no cache, runs no planner and knows no demo: the run assembly
(`train/run.py`) does those and calls `fit` (through `train/recover.py`, which recovers from out-of-memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError
from lowvram.fsutil import atomic_write_text
from lowvram.method.modes import build_modes
from lowvram.method.objective import ObjectiveConfig, flow_loss, prepare_inputs
from lowvram.method.tread import TreadRouter
from lowvram.train.batches import BatchSource, LatentBatch
from lowvram.train.run_folder import LORA_FILE, METRICS_FILE

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
    modes: tuple = ()  # method/modes/: each prepares the step's inputs (build_modes)


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
    from lowvram.models.ltx2.forward import TextEmbeddings, transformer_forward

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

    for mode in ctx.modes:  # training modes (method/modes/): rolled-out inputs and the like
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
# Fitting: LoRA, memory plan, optimizer and schedule, resume, then the loop with its metrics and checkpoints


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
# Seams to LoRA (method/lora.py) and the offload strategies (offload/), applied to the modules before the loop


def inject_lora(transformer: torch.nn.Module, cfg) -> None:
    """Add trainable LoRA adapters to the configured targets; audio-only modules are left out in video mode."""
    from lowvram.method import lora

    if lora.lora_layers(transformer):
        return  # already added (a sharded run adds it while loading, before FSDP2 shards the module)
    lora.inject_lora(transformer, cfg.lora, include_audio=cfg.train.mode != "video")


def export_lora(transformer: torch.nn.Module, path: Path, cfg) -> Path:
    """Write the user-facing LoRA (`diffusion_model.*` keys, alpha folded into B) atomically."""
    from lowvram.method import lora

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
