"""The `lowvram` command line: probe, plan, train, report, profiles.

Thin wrappers: each command parses options and calls one library function. torch, diffusers and transformers are
imported only inside the commands that need them, so `--help`, `profiles` and usage errors answer at once.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer

from lowvram.errors import LowvramError, UsageError

app = typer.Typer(
    name="lowvram",
    help="LoRA training for LTX-2 (19B 2.0, 22B 2.3/2.5; audio+video) on one consumer GPU, with a memory manager "
    "that proves it fits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _err(message: str) -> None:
    print(f"lowvram: error: {message}", file=sys.stderr)


def friendly(fn):
    """Turn a LowvramError into one line on stderr and its exit code (2 usage, 1 runtime); no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowvramError as e:
            _err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _console():
    from lowvram.console import make_console

    return make_console()


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------------------------------
@app.command()
@friendly
def profiles(
    as_json: bool = typer.Option(False, "--json", help="Print the profiles as one JSON list instead of a table."),
) -> None:
    """List the built-in hardware profiles (VRAM, TFLOP/s, PCIe bandwidth, what each supports)."""
    from lowvram.profiles import all_profiles

    items = all_profiles()
    if as_json:
        print(json.dumps([p.model_dump() for p in items], indent=2))
        return
    from rich.table import Table

    table = Table(title="Built-in hardware profiles")
    for col in ("name", "vendor", "VRAM", "usable", "bf16 TFLOP/s", "H2D pinned/pageable GB/s", "host RAM",
                "fp8", "bnb", "flash attn"):
        table.add_column(col, justify="left" if col in ("name", "vendor") else "right")
    yes = {True: "yes", False: "no"}
    for p in items:
        table.add_row(
            p.name, p.vendor, _gib(p.vram_bytes), _gib(p.usable_vram_bytes), f"{p.bf16_tflops:g}",
            f"{p.h2d_pinned_gbps:g} / {p.h2d_pageable_gbps:g}", _gib(p.host_ram_bytes),
            yes[p.supports.fp8], yes[p.supports.bitsandbytes], yes[p.supports.flash_attention],
        )
    _console().print(table)
    print("Use --profile NAME or --profile path/to/custom.toml (see `lowvram probe --write`).")


# ---------------------------------------------------------------------------------------------------------------
@app.command()
@friendly
def probe(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (for machines) instead of tables."),
    write: Path | None = typer.Option(
        None, "--write", help="Write this machine's profile (built-in figures, measured ones put in) to this TOML file."
    ),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Measure this GPU (matmul, attention, copies, one LTX-2 block step; <= 60 s)."
    ),
    simulate: bool = typer.Option(
        False, "--simulate", help="With --calibrate: run it on the simulated accelerator at tiny widths (tests)."
    ),
    bandwidth: bool = typer.Option(True, "--bandwidth/--no-bandwidth", help="Measure host-to-device GB/s (GPU only)."),
    disk_speed: bool = typer.Option(
        True, "--disk-speed/--no-disk-speed", help="Measure the cache folder's read GB/s (a fresh 256 MiB file)."
    ),
    cache_dir: Path = typer.Option(Path("."), "--cache-dir", help="Where caches will live (free disk is reported)."),
    resolution: str = typer.Option(
        "832x480", "--resolution", help="Workload (auto-picked settings; --calibrate's shape): WIDTHxHEIGHT."
    ),
    frames: int = typer.Option(17, "--frames", help="Workload frames per clip (8k+1)."),
    batch: int = typer.Option(1, "--batch", help="Workload clips per step."),
    settings_out: Path | None = typer.Option(
        None, "--settings", help="Write the auto-picked memory settings for the workload to this TOML config."
    ),
) -> None:
    """Detect GPUs, RAM, cores and disk; match the nearest profile; auto-pick memory settings for a workload."""
    from lowvram.fsutil import atomic_write_text
    from lowvram.hardware import probe as run_probe
    from lowvram.hardware import profile_to_toml

    for flag, path in (("--write", write), ("--settings", settings_out)):
        _check_output_file(flag, path)
    if simulate and not calibrate:
        raise UsageError("--simulate only applies to --calibrate: add --calibrate or drop --simulate")
    _workload(resolution, frames, batch)  # a bad workload is refused before anything is measured
    result, profile = run_probe(measure_bandwidth=bandwidth, disk_path=cache_dir, measure_disk=disk_speed)
    calibration = None
    if calibrate:
        calibration, profile = _calibrate(profile, resolution, frames, batch, simulate, quiet=as_json)
    picked = _auto_pick(profile, resolution, frames, batch) if (settings_out or not as_json) else None
    if write is not None:
        source = f"written by `lowvram probe{' --calibrate' if calibrate else ''}` ({result.profile_reason})"
        atomic_write_text(write, profile_to_toml(profile, source))
    if settings_out is not None and picked is not None:
        from lowvram.config import apply_overrides, config_to_toml

        # The measured profile exists only as the --write file: the config names that file, or else the built-in
        # profile it started from, so `train --config` can load it.
        named = str(write.resolve()) if write is not None else result.profile
        atomic_write_text(settings_out, config_to_toml(apply_overrides(picked[0], {"memory.profile": named})))
    from lowvram.hub import default_model_needs, download_estimate

    # What training the default model by hub id would fetch into the HF cache (sizes only; nothing is downloaded).
    download = download_estimate(needs=default_model_needs())
    if as_json:
        out = result.to_json()
        out["measured_fields"] = list(profile.measured)
        if calibration is not None:
            out["calibration"] = calibration.to_json()
        print(json.dumps({**out, "download": download.to_json()}))
        return
    console = _console()
    from rich.table import Table

    for note in result.notes:
        console.print(note)
    table = Table(title="This machine")
    table.add_column("what")
    table.add_column("value")
    for g in result.gpus:
        link = f", PCIe gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else ""
        table.add_row(f"GPU {g.index}", f"{g.name} ({g.vendor}), {_gib(g.vram_total_bytes)}{link}")
        if g.h2d_pinned_gbps:
            table.add_row("  host->device", f"{g.h2d_pinned_gbps:.1f} GB/s pinned, {g.h2d_pageable_gbps:.1f} pageable")
    table.add_row("RAM", f"{_gib(result.ram_total_bytes)} total, {_gib(result.ram_available_bytes)} available")
    table.add_row("CPU cores", str(result.cpu_count))
    table.add_row("free disk", f"{_gib(result.disk_free_bytes)} at {result.disk_path}")
    if result.disk_read_gbps:
        table.add_row("  disk read", f"{result.disk_read_gbps:.2f} GB/s (fresh file, page cache dropped)")
    swap = _gib(result.swap_total_bytes) if result.swap_total_bytes else "none"
    table.add_row("swap", f"{swap} (never budgeted: a plan that needs it is refused)")
    table.add_row("profile", f"{result.profile} ({result.profile_reason})")
    console.print(table)
    console.print(f"Training {default_model_needs()[0].ref.text} by hub id (flavour dev, with Gemma3) downloads:")
    for line in download.lines():
        console.print(f"  {line}", markup=False, highlight=False)
    if calibration is not None:
        _print_calibration(console, calibration)
    if picked is not None:
        console.print(f"Auto-picked settings for {resolution}, {frames} frames, batch {batch}: {picked[1]}")
    if write is not None:
        measured = ", ".join(profile.measured) or "nothing"
        console.print(f"Profile written to {write} (measured here: {measured}; the rest from '{result.profile}')")
    if settings_out is not None:
        console.print(f"Settings written to {settings_out}")


def _check_output_file(flag: str, path: Path | None) -> None:
    """An output path must name a file in an existing folder: refused in one line before any work."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file path, e.g. {flag} {path / 'profile.toml'}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {path.parent} does not exist: create it or choose another path")


def _workload(resolution: str, frames: int, batch: int, family: str = "ltx2"):
    from lowvram.config import load_config

    cfg, _ = load_config(None, {"model.family": family, "data.resolution": resolution, "data.frames": frames,
                                "train.batch_size": batch})
    return cfg


def _calibrate(profile, resolution: str, frames: int, batch: int, simulate: bool, quiet: bool):
    """(Calibration, the profile with the measured figures put in) on this GPU, or on the simulated device."""
    from lowvram import device
    from lowvram.calibrate import calibrate, calibrated_profile

    cfg = _workload(resolution, frames, batch, family="tiny" if simulate else "ltx2")
    if simulate:
        backend = device.get_backend("sim", h2d_gbps=profile.h2d_pinned_gbps, tflops=profile.bf16_tflops)
    elif not device.accelerator_available():
        raise LowvramError(
            "--calibrate needs a CUDA or ROCm GPU and none is usable here (add --simulate to exercise it on the "
            "simulated accelerator)"
        )
    else:
        backend = device.get_backend("cuda")

    def progress(what: str) -> None:
        if not quiet:
            print(f"calibrating: {what} ...", file=sys.stderr, flush=True)

    cal = calibrate(backend, cfg, progress=progress)
    return cal, calibrated_profile(profile, cal)


def _print_calibration(console, cal) -> None:
    from rich.table import Table

    def fig(value, unit: str) -> str:
        return "not measured" if value is None else f"{value:.3g} {unit}"

    table = Table(title=f"Calibration: {cal.device}, {cal.shape} ({cal.seconds:.1f} s)")
    table.add_column("measured")
    table.add_column("value", justify="right")
    table.add_row("bf16 matmul (block GEMM shapes)", fig(cal.matmul_tflops, "TFLOP/s"))
    table.add_row("attention (run's tokens)", fig(cal.attention_tflops, "TFLOP/s"))
    table.add_row("host->device pinned", fig(cal.h2d_pinned_gbps, "GB/s"))
    table.add_row("host->device pageable", fig(cal.h2d_pageable_gbps, "GB/s"))
    table.add_row("one block fwd+bwd with LoRA", fig(cal.block_seconds and cal.block_seconds * 1e3, "ms"))
    table.add_row("  -> training compute rate", fig(cal.train_tflops, "TFLOP/s"))
    console.print(table)
    for note in cal.notes:
        console.print(f"note: {note}")


def _auto_pick(profile, resolution: str, frames: int, batch: int):
    """The planner's choice for this machine and workload, as (config, one-line summary); None if unavailable."""
    try:
        from lowvram.plan import plan_run
    except ImportError:
        return None
    plan = plan_run(_workload(resolution, frames, batch), profile, choose=True)
    return plan.config, plan.summary_line()


# ---------------------------------------------------------------------------------------------------------------
def _overrides(**kw) -> dict:
    mapping = {
        "resolution": "data.resolution",
        "frames": "data.frames",
        "batch": "train.batch_size",
        "audio": "data.audio",
        "rank": "lora.rank",
        "precision": "model.precision",
        "output_dir": "output.output_dir",
        "max_steps": "train.max_train_steps",
        "learning_rate": "optim.learning_rate",
        "seed": "train.seed",
        "resume": "checkpoint.resume",
        "start_over": "checkpoint.start_over",
        "lora_format": "lora.format",
        "lora_dtype": "lora.dtype",
        "dataset": "data.dataset_dir",
        "checkpoint_path": "model.checkpoint",
        "margin": "memory.vram_safety_margin",
        "strict": "data.strict",
        "model_version": "model.version",
    }
    return {mapping[k]: v for k, v in kw.items() if v is not None}


def _check_run_flags(*, output_dir: str | None = None, max_steps: int | None = None,
                     learning_rate: float | None = None, nproc: int | None = None) -> None:
    """Flags checked where they enter, before any config is read, so the message names the flag, not a file."""
    import math

    from lowvram.errors import UsageError

    if output_dir is not None and not output_dir.strip():
        raise UsageError("--output-dir is empty: give the run folder, e.g. --output-dir runs/first")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps {max_steps}: give 1 or more optimizer steps (to train by epochs instead, "
                         "leave --max-steps out and set train.num_train_epochs)")  # fmt: skip
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"--lr {learning_rate}: give a finite learning rate above 0, e.g. --lr 1e-4")
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc {nproc}: give 1 or more processes (one per GPU)")


def _load(config: Path | None, overrides: dict, family_default: str | None = None):
    from lowvram.config import load_config

    if config is None and family_default is not None:
        overrides = {"model.family": family_default, **overrides}
    cfg, notes = load_config(config, overrides)
    for note in notes:
        print(f"lowvram: note: {note}", file=sys.stderr)
    return cfg


def _profile(name: str | None, host=None):
    """The profile to plan for, with the host RAM budgeted against: `host` (from `_host`), else this machine's."""
    from lowvram.profiles import load_profile

    host = host or _host(None)
    if name is not None:
        profile = load_profile(name)
    else:
        from lowvram.hardware import probe as run_probe

        _, profile = run_probe(measure_bandwidth=True)
    return profile.model_copy(update={"host_ram_bytes": host.ram_bytes})


def _host(host_ram: str | None):
    from lowvram.plan.host import HostMemory, parse_host_ram, probe_host

    if host_ram is not None:
        return HostMemory(parse_host_ram(host_ram), "--host-ram")
    return probe_host()


PROFILE_HELP_RAM = "Host RAM to budget against, e.g. 16GiB (default: this machine's RAM, probed)."


PROFILE_HELP = "Hardware profile name (see `lowvram profiles`) or a path to a profile .toml; default: probe."


@app.command()
@friendly
def plan(
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP),
    config: Path | None = typer.Option(
        None, "--config", help="Evaluate exactly this run config (TOML or SimpleTuner JSON) instead of choosing."
    ),
    resolution: str | None = typer.Option(None, "--resolution", help="Clip size WIDTHxHEIGHT (multiples of 32)."),
    frames: int | None = typer.Option(None, "--frames", help="Frames per clip, 8k+1 (17, 33, 49, 57, 65, ...)."),
    batch: int | None = typer.Option(None, "--batch", help="Clips per step."),
    audio: bool | None = typer.Option(None, "--audio/--no-audio", help="Train the audio branch too."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
    precision: str | None = typer.Option(None, "--precision", help="Base precision (bf16, int8-torchao, ...)."),
    margin: float | None = typer.Option(None, "--margin", help="Share of usable VRAM kept free (default 0.10)."),
    gpus: int = typer.Option(1, "--gpus", help="GPUs the run is sharded over (FSDP2)."),
    model_version: str | None = typer.Option(
        None, "--model-version", help="LTX-2 release to plan: 2.0 (19B), 2.3 or 2.5 (22B); default 2.0."
    ),
    host_ram: str | None = typer.Option(None, "--host-ram", help=PROFILE_HELP_RAM),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Memory-budget dry run for the real LTX-2 (19B 2.0, 22B 2.3/2.5): does it fit, with which settings, how fast
    (no weights needed)."""
    if gpus < 1:
        from lowvram.errors import UsageError

        raise UsageError(f"--gpus {gpus}: the number of GPUs the run is sharded over must be 1 or more")
    from lowvram.config import MAX_PLANNED_FRAMES, frames_limit_reason

    if frames is not None and frames > MAX_PLANNED_FRAMES:
        from lowvram.errors import UsageError

        raise UsageError(f"--frames {frames}: {frames_limit_reason()}")
    overrides = _overrides(resolution=resolution, frames=frames, batch=batch, audio=audio, rank=rank,
                           precision=precision, margin=margin, model_version=model_version)
    # The real model unless a config names the tiny one: then the plan is the one `train --dry-run` makes for it.
    cfg = _load(config, overrides, family_default="ltx2")
    host = _host(host_ram)
    hw = _profile(profile or cfg.memory.profile, host)
    from lowvram.plan import plan_run

    result = plan_run(cfg, hw, choose=config is None, gpus=gpus, host=host)
    from lowvram.hub import download_estimate

    download = download_estimate(cfg)  # hub ids: what the run will fetch (sizes only; nothing is downloaded)
    if as_json:
        print(json.dumps({**result.to_json(), **({"download": download.to_json()} if download.items else {})}))
    else:
        result.render(_console())
        for line in download.lines():
            print(line)
    if not result.fits:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
@friendly
def train(
    config: Path | None = typer.Option(
        None, "--config", help="Run config (TOML or SimpleTuner JSON). Without one, the built-in demo runs."
    ),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Run folder (LoRA, checkpoints, metrics)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Folder of clips with same-name .txt captions."),
    checkpoint_path: str | None = typer.Option(
        None, "--checkpoint", help="Official LTX-2 .safetensors file, diffusers folder, or hub id (Lightricks/LTX-2)."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps."),
    batch: int | None = typer.Option(None, "--batch", help="Clips per step."),
    learning_rate: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
    precision: str | None = typer.Option(None, "--precision", help="Base precision (bf16, int8-torchao, ...)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    resume: str | None = typer.Option(None, "--resume", help="'latest' or a checkpoint folder to continue from."),
    start_over: bool = typer.Option(
        False, "--start-over", help="Start at step 0 although OUTPUT holds a run (with --resume latest: when none of "
        "its checkpoints verifies); its files are moved to OUTPUT/previous-runs/, never deleted.",
    ),
    lora_format: str | None = typer.Option(None, "--lora-format", help="Exported key naming: comfy or diffusers."),
    lora_dtype: str | None = typer.Option(
        None, "--lora-dtype", help="Exported LoRA file dtype: bf16 (default, as the official trainer), fp16, fp32."
    ),
    strict: bool | None = typer.Option(
        None, "--strict/--skip-bad", help="A bad dataset item stops caching (default: skipped and listed at the end)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only evaluate the memory plan (same as `lowvram plan`)."),
    force: bool = typer.Option(False, "--force", help="Train even if the plan says it will not fit."),
    auto_recover: bool = typer.Option(
        True, "--auto-recover/--no-auto-recover", help="On out-of-memory, save, re-plan with less VRAM and resume."
    ),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) to launch with torchrun (FSDP2)."),
    model_version: str | None = typer.Option(
        None, "--model-version", help="LTX-2 release (2.0, 2.3, 2.5); default: read from the checkpoint."
    ),
    host_ram: str | None = typer.Option(None, "--host-ram", help=PROFILE_HELP_RAM),
) -> None:
    """Train a LoRA. With no --config: the embedded demo (synthetic clips, tiny model, CPU, ~100 steps)."""
    _check_run_flags(output_dir=output_dir, max_steps=max_steps, learning_rate=learning_rate, nproc=nproc)
    overrides = _overrides(output_dir=output_dir, dataset=dataset, checkpoint_path=checkpoint_path,
                           max_steps=max_steps, batch=batch, learning_rate=learning_rate, rank=rank,
                           precision=precision, seed=seed, resume=resume, lora_format=lora_format, strict=strict,
                           lora_dtype=lora_dtype, start_over=start_over or None, model_version=model_version)
    from lowvram.train.run import run_train

    if config is None:
        from lowvram.config import apply_overrides
        from lowvram.demo import default_demo_config

        cfg = apply_overrides(default_demo_config(overrides.get("output.output_dir", "output/demo")), overrides)
    else:
        cfg = _load(config, overrides)
    host = None if profile is None and config is None else _host(host_ram)  # the budget and source `plan` states
    hw = None if host is None else _profile(profile or cfg.memory.profile, host)
    code = run_train(cfg, profile=hw, force=force, dry_run=dry_run, auto_recover=auto_recover, nproc=nproc,
                     host=host)  # fmt: skip
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
@friendly
def cache(
    config: Path | None = typer.Option(None, "--config", help="Run config (TOML or SimpleTuner JSON); default: demo."),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Run folder (caches go to OUTPUT/cache)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Folder of clips with same-name .txt captions."),
    strict: bool | None = typer.Option(
        None, "--strict/--skip-bad", help="A bad dataset item stops caching (default: skipped and listed at the end)."
    ),
) -> None:
    """Build the text and latent caches only (portable: build them where Gemma3 and the VAE fit, train anywhere)."""
    _check_run_flags(output_dir=output_dir)
    overrides = _overrides(output_dir=output_dir, dataset=dataset, strict=strict)
    from lowvram.train.run import run_cache

    if config is None:
        from lowvram.config import apply_overrides
        from lowvram.demo import default_demo_config

        cfg = apply_overrides(default_demo_config(overrides.get("output.output_dir", "output/demo")), overrides)
    else:
        cfg = _load(config, overrides)
    hw = None if profile is None and cfg.model.family == "tiny" else _profile(profile or cfg.memory.profile)
    raise typer.Exit(run_cache(cfg, profile=hw))


# ---------------------------------------------------------------------------------------------------------------
@app.command()
@friendly
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (its --output-dir); it may still be training."),
    png: Path | None = typer.Option(
        None, "--png", help="Where to write the dashboard PNG (default RUN_DIR/memory.png)."
    ),
) -> None:
    """Summarize a run (plan, predicted vs measured peaks, speed, ETA, loss) and plot memory, loss and lr to a PNG."""
    from lowvram.errors import UsageError
    from lowvram.telemetry import (
        check_png_destination,
        load_run,
        phases_with_live_train,
        render_timeline,
        run_summary,
        summary_table,
    )

    if png is not None:
        png = check_png_destination(png)  # a folder or an unwritable path: one line, exit 2, before any work
    view = load_run(run_dir)
    console = _console()
    for line in run_summary(view):
        console.print(line, markup=False, highlight=False)
    phases = phases_with_live_train(view)
    if phases:
        console.print(summary_table(phases))
    try:
        out = render_timeline(run_dir, png)
    except LowvramError as e:  # the destination became unwritable after the check
        raise UsageError(str(e)) from None
    print(f"dashboard written to {out}")


# Import-time chatter of optional kernels that CPU and ROCm builds lack (torchao's CUDA .so files, bitsandbytes'
# hub kernels, torch's pytree deprecations): it says nothing the user can act on, so only errors are shown.
QUIET_LOGGERS = ("torchao", "bitsandbytes", "diffusers.quantizers", "torch.utils._pytree")


def main() -> None:
    import logging
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft warns that torchao LoRA layers cannot be merged: lowvram never merges, it exports the LoRA separately.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    app()


if __name__ == "__main__":
    main()
