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

from lowvram.errors import LowvramError

app = typer.Typer(
    name="lowvram",
    help="LoRA training for LTX-2 (19B audio+video) on one consumer GPU, with a memory manager that proves it fits.",
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
    write: Path | None = typer.Option(None, "--write", help="Write the matched/measured profile to this TOML file."),
    bandwidth: bool = typer.Option(True, "--bandwidth/--no-bandwidth", help="Measure host-to-device GB/s (GPU only)."),
    disk_speed: bool = typer.Option(
        True, "--disk-speed/--no-disk-speed", help="Measure the cache folder's read GB/s (a fresh 256 MiB file)."
    ),
    cache_dir: Path = typer.Option(Path("."), "--cache-dir", help="Where caches will live (free disk is reported)."),
    resolution: str = typer.Option("832x480", "--resolution", help="Workload for auto-picked settings: WIDTHxHEIGHT."),
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

    result, profile = run_probe(measure_bandwidth=bandwidth, disk_path=cache_dir, measure_disk=disk_speed)
    picked = _auto_pick(profile, resolution, frames, batch) if (settings_out or not as_json) else None
    if write is not None:
        atomic_write_text(write, profile_to_toml(profile, f"written by `lowvram probe` ({result.profile_reason})"))
    if settings_out is not None and picked is not None:
        from lowvram.config import config_to_toml

        atomic_write_text(settings_out, config_to_toml(picked[0]))
    if as_json:
        out = result.to_json()
        print(json.dumps(out))
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
    if picked is not None:
        console.print(f"Auto-picked settings for {resolution}, {frames} frames, batch {batch}: {picked[1]}")
    if write is not None:
        console.print(f"Profile written to {write}")
    if settings_out is not None:
        console.print(f"Settings written to {settings_out}")


def _auto_pick(profile, resolution: str, frames: int, batch: int):
    """The planner's choice for this machine and workload, as (config, one-line summary); None if unavailable."""
    try:
        from lowvram.plan import plan_run
    except ImportError:
        return None
    from lowvram.config import load_config

    cfg, _ = load_config(None, {"model.family": "ltx2", "data.resolution": resolution, "data.frames": frames,
                                "train.batch_size": batch})
    plan = plan_run(cfg, profile, choose=True)
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
        "lora_format": "lora.format",
        "dataset": "data.dataset_dir",
        "checkpoint_path": "model.checkpoint",
        "margin": "memory.vram_safety_margin",
        "strict": "data.strict",
    }
    return {mapping[k]: v for k, v in kw.items() if v is not None}


def _load(config: Path | None, overrides: dict, family_default: str | None = None):
    from lowvram.config import load_config

    if config is None and family_default is not None:
        overrides = {"model.family": family_default, **overrides}
    cfg, notes = load_config(config, overrides)
    for note in notes:
        print(f"lowvram: note: {note}", file=sys.stderr)
    return cfg


def _profile(name: str | None, host_ram: str | None = None):
    """The profile to plan for, with the host RAM budgeted against: `--host-ram`, else this machine's (probed)."""
    from lowvram.profiles import load_profile

    host = _host(host_ram)
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
    host_ram: str | None = typer.Option(None, "--host-ram", help=PROFILE_HELP_RAM),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Memory-budget dry run for the real 19B LTX-2: does it fit, with which settings, how fast (no weights needed)."""
    overrides = _overrides(resolution=resolution, frames=frames, batch=batch, audio=audio, rank=rank,
                           precision=precision, margin=margin)
    cfg = _load(config, overrides, family_default="ltx2")
    if cfg.model.family != "ltx2":
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": "ltx2"})})
    host = _host(host_ram)
    hw = _profile(profile or cfg.memory.profile, host_ram)
    from lowvram.plan import plan_run

    result = plan_run(cfg, hw, choose=config is None, gpus=gpus, host=host)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        result.render(_console())
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
        None, "--checkpoint", help="Official LTX-2 .safetensors file or diffusers folder."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps."),
    batch: int | None = typer.Option(None, "--batch", help="Clips per step."),
    learning_rate: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
    precision: str | None = typer.Option(None, "--precision", help="Base precision (bf16, int8-torchao, ...)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    resume: str | None = typer.Option(None, "--resume", help="'latest' or a checkpoint folder to continue from."),
    lora_format: str | None = typer.Option(None, "--lora-format", help="Exported key naming: comfy or diffusers."),
    strict: bool | None = typer.Option(
        None, "--strict/--skip-bad", help="A bad dataset item stops caching (default: skipped and listed at the end)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only evaluate the memory plan (same as `lowvram plan`)."),
    force: bool = typer.Option(False, "--force", help="Train even if the plan says it will not fit."),
    auto_recover: bool = typer.Option(
        True, "--auto-recover/--no-auto-recover", help="On out-of-memory, save, re-plan with less VRAM and resume."
    ),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) to launch with torchrun (FSDP2)."),
    host_ram: str | None = typer.Option(None, "--host-ram", help=PROFILE_HELP_RAM),
) -> None:
    """Train a LoRA. With no --config: the embedded demo (synthetic clips, tiny model, CPU, ~100 steps)."""
    overrides = _overrides(output_dir=output_dir, dataset=dataset, checkpoint_path=checkpoint_path,
                           max_steps=max_steps, batch=batch, learning_rate=learning_rate, rank=rank,
                           precision=precision, seed=seed, resume=resume, lora_format=lora_format, strict=strict)
    from lowvram.train.loop import run_train

    if config is None:
        from lowvram.config import apply_overrides
        from lowvram.demo import default_demo_config

        cfg = apply_overrides(default_demo_config(overrides.get("output.output_dir", "output/demo")), overrides)
    else:
        cfg = _load(config, overrides)
    hw = None if profile is None and config is None else _profile(profile or cfg.memory.profile, host_ram)
    code = run_train(cfg, profile=hw, force=force, dry_run=dry_run, auto_recover=auto_recover, nproc=nproc)
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
    overrides = _overrides(output_dir=output_dir, dataset=dataset, strict=strict)
    from lowvram.train.loop import run_cache

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
    run_dir: Path = typer.Argument(..., help="A run folder holding memory.jsonl."),
    png: Path | None = typer.Option(None, "--png", help="Where to write the timeline (default RUN_DIR/memory.png)."),
) -> None:
    """Show a run's memory per phase (measured beside predicted) and write a PNG memory timeline."""
    from lowvram.errors import UsageError
    from lowvram.telemetry import MEMORY_FILE, read_memory_file, render_timeline, summary_table

    path = run_dir / MEMORY_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} has no {MEMORY_FILE}: pass the folder of a run (its --output-dir)")
    try:
        phases, _ = read_memory_file(path)
    except (ValueError, KeyError) as e:
        raise LowvramError(f"{path} is not a lowvram memory file: {e}") from None
    _console().print(summary_table(phases))
    out = render_timeline(run_dir, png)
    print(f"timeline written to {out}")


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
