"""Each offload strategy on a real GPU (CUDA or ROCm): measured peak VRAM, s/step and H2D GB/s beside predictions.

Builds a few blocks of the real LTX-2 transformer width (ltx-2.0 config, fewer layers) with LoRA, runs one strategy
at a time through the device seam, and prints measured vs the planner's predictions (`lowvram.plan.predict_peak` and
`predict_step_time` for the same shapes and settings: "pred s" is the no-offload step or the copy time, whichever
is longer; "plan s" is the planner's step-time model on --profile). `--simulate` runs the same code on the simulated
accelerator with the tiny family's widths (tests run it, so this path is never dead code). It changes no setting of
the GPU.
`--sanitize` runs every strategy under PyTorch's CUDA stream sanitizer (torch.cuda._sanitizer, through the device
seam) and reports each stream race it finds instead of timings; with `--simulate` the simulated device's own race
detector is the sanitizer (it also sees frees a missing record_stream leaves unguarded).

    python tools/gpu_check.py                 # CUDA / ROCm
    python tools/gpu_check.py --sanitize      # CUDA / ROCm, stream races: last line races=none
    python tools/gpu_check.py --simulate      # anywhere (add --sanitize for the race report)
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

STRATEGIES = ("none", "streaming", "block_swap", "group_block_level", "group_leaf_level", "activation_offload")


@dataclass(frozen=True)
class Row:
    strategy: str
    peak_bytes: int
    predicted_peak_bytes: int
    step_s: float
    predicted_step_s: float
    h2d_bytes_per_step: int
    refused: str | None = None
    race: str | None = None
    planned_step_s: float = 0.0  # the planner's step-time model for these settings on --profile


def plan_config(args):
    """The run config whose shapes the model and batch are built from, and the planner predicts for.

    On a GPU: the real LTX-2 block width at the given latent shape. Under --simulate: the tiny family (the planner's
    prediction for it is tested against the simulated device within 5%).
    """
    from lowvram.config import load_config

    family = "tiny" if args.simulate else "ltx2"
    cfg, _ = load_config(
        None,
        {
            "model.family": family,
            "model.precision": args.precision,
            "train.mixed_precision": args.dtype,
            "data.resolution": f"{args.width * 32}x{args.height * 32}",
            "data.frames": (args.frames - 1) * 8 + 1,
            "data.max_text_tokens": args.text_tokens,
            "lora.rank": args.rank,
        },
    )
    return cfg


def _build(args, backend):
    from lowvram.calibrate import random_lora_transformer
    from lowvram.models.ltx2 import real_transformer_config
    from lowvram.offload.harness import plan_batch, tiny_lora_transformer

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.simulate:
        # Cast before quantizing, so quantized scales and LoRA weights share the compute dtype.
        transformer = tiny_lora_transformer(args.precision, num_layers=args.layers, rank=args.rank, dtype=dtype)
    else:
        # Real width, random weights materialised on the GPU (a host init of 4 x 386M parameters takes minutes);
        # strategies move their share to pinned host memory.
        config = {k: v for k, v in real_transformer_config().items() if not k.startswith("_")}
        precision = "bf16" if args.precision == "fp32" else args.precision
        transformer = random_lora_transformer(
            config, num_layers=args.layers, rank=args.rank, dtype=dtype, device=backend.device, precision=precision
        )
    batch = plan_batch(transformer, plan_config(args))
    if args.dtype == "bf16":
        batch = type(batch)(
            **{
                k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "sigma" else v
                for k, v in batch.__dict__.items()
            }
        )
    return transformer, batch


def _backend(args):
    from lowvram.device import accelerator_available, get_backend
    from lowvram.profiles import load_profile

    if args.simulate:
        profile = load_profile(args.profile)
        return get_backend("sim", h2d_gbps=profile.h2d_pinned_gbps, tflops=profile.bf16_tflops, check_races=True)
    if not accelerator_available():
        raise SystemExit("gpu_check: no CUDA or ROCm device here: run with --simulate")
    return get_backend("cuda")


def _apply(name: str, transformer, backend, args):
    from lowvram import offload

    if name == "activation_offload":
        return offload.apply_activation_offload(transformer, backend)
    transformer.enable_gradient_checkpointing()
    if name == "streaming":
        return offload.apply_weight_streaming(transformer, backend, patterns="transformer_blocks.*")
    if name == "block_swap":
        return offload.apply_block_swap(transformer, backend, blocks_to_swap=args.layers - 1)
    if name == "group_block_level":
        return offload.apply_group_offload(transformer, backend, offload_type="block_level")
    if name == "group_leaf_level":
        return offload.apply_group_offload(transformer, backend, offload_type="leaf_level")
    return None


def _run(name: str, args) -> tuple[int, float, int, object]:
    """(peak bytes, median s/step, H2D bytes/step, strategy) of `args.steps` steps after one warm-up."""
    from lowvram.offload.harness import lora_step, zero_grads

    backend = _backend(args)
    transformer, batch = _build(args, backend)
    strategy = _apply(name, transformer, backend, args)
    backend.place_module(transformer)
    session = backend.session() if hasattr(backend, "session") else _null()
    times, peak, moved = [], 0, 0
    with session:
        for i in range(args.steps + 1):
            zero_grads(transformer)
            backend.synchronize()
            if hasattr(backend, "reset_counters"):
                backend.reset_counters()
            backend.reset_peak_memory_stats()
            before = getattr(strategy, "copied_bytes", 0)
            start = backend.clock_s()  # wall clock on a GPU; the simulated clock on the simulated device
            lora_step(transformer, batch, backend)
            if i == 0:
                continue  # warm-up: prefetch orders are learned, rings filled, kernels chosen
            times.append(backend.clock_s() - start)
            stats = backend.memory_stats()
            peak = max(peak, stats.max_reserved_bytes)
            moved = getattr(strategy, "copied_bytes", 0) - before
    del transformer, batch
    gc.collect()
    backend.empty_cache()
    return peak, sorted(times)[len(times) // 2], moved, strategy


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measure_link_gbps(args) -> float:
    """Pinned host -> device copy rate of this machine (256 MiB; 4 MiB under --simulate)."""
    backend = _backend(args)
    nbytes = (4 if args.simulate else 256) * 2**20
    host = backend.pin(torch.empty(nbytes, dtype=torch.uint8))
    backend.to_device(host)
    start = backend.clock_s()
    for _ in range(3):
        backend.to_device(host)
    return 3 * nbytes / (backend.clock_s() - start) / 1e9


def planner_settings(name: str, args):
    """The planner's `Settings` for the strategy as `_apply` applies it (checkpointing on, as it enables)."""
    from lowvram.offload.harness import plan_settings

    harness_name = {"block_swap": "block_swap_all_but_one"}.get(name, name)
    return plan_settings(harness_name, args.precision, checkpointing=True, num_blocks=args.layers)


def race_errors(args) -> tuple[type[BaseException], ...]:
    """The exceptions a stream race raises in this run: the simulated device's, and on a GPU under --sanitize
    PyTorch's CUDA stream sanitizer's (enabled here, before any model is built)."""
    from lowvram.device_sim import StreamRaceError

    if args.sanitize and not args.simulate:
        from lowvram.device import enable_stream_sanitizer

        return (StreamRaceError, *enable_stream_sanitizer())
    return (StreamRaceError,)


def _race_line(error: BaseException) -> str:
    inner = getattr(error, "errors", None)  # CUDASanitizerErrors wraps the sanitizer's UnsynchronizedAccessErrors
    text = str(inner[0]) if inner else str(error)
    return " ".join(line.strip() for line in text.splitlines()[:4] if line.strip())


def run(args) -> list[Row]:
    from lowvram.errors import UsageError
    from lowvram.plan import predict_peak
    from lowvram.profiles import load_profile

    profile = load_profile(args.profile)
    cfg = plan_config(args)

    def planned_s(name: str) -> float:
        from lowvram.plan import predict_step_time

        return predict_step_time(cfg, profile, planner_settings(name, args), num_layers=args.layers).seconds

    def predicted(name: str) -> int:
        """The planner's peak of one forward + backward with this strategy (the check runs no optimizer step; on a
        GPU, max reserved also holds allocator slack, which the profile's reserve covers in a plan)."""
        return predict_peak(cfg, profile, planner_settings(name, args), num_layers=args.layers).step_bytes

    races = race_errors(args)
    try:
        base_peak, base_s, _, _ = _run("none", args)
    except races as race:
        return [Row("none", 0, 0, 0.0, 0.0, 0, race=_race_line(race))]
    rows = [Row("none", base_peak, predicted("none"), base_s, base_s, 0, planned_step_s=planned_s("none"))]
    for name in args.strategies.split(","):
        if name == "none":
            continue
        try:
            peak, step_s, moved, strategy = _run(name, args)
        except UsageError as refused:
            rows.append(Row(name, 0, 0, 0.0, 0.0, 0, refused=str(refused)))
            continue
        except races as race:
            rows.append(Row(name, 0, 0, 0.0, 0.0, 0, race=_race_line(race)))
            continue
        # A streamed copy overlaps compute: the step takes the longer of the two (the copy at the profile's link).
        predicted_s = max(base_s, moved / (profile.h2d_pinned_gbps * 1e9))
        rows.append(Row(name, peak, predicted(name), step_s, predicted_s, moved, planned_step_s=planned_s(name)))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="run on the simulated accelerator (no GPU needed)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks to build (the real model has 48)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8-quanto", "int8-torchao"])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="float weights (default: bf16 on GPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--frames", type=int, default=3, help="latent frames (3 = 17 video frames)")
    parser.add_argument("--height", type=int, default=15, help="latent height (15 = 480 px)")
    parser.add_argument("--width", type=int, default=26, help="latent width (26 = 832 px)")
    parser.add_argument("--audio-tokens", type=int, default=17)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps after a warm-up (3; 1 with --sanitize)")
    parser.add_argument(
        "--profile", default="4090", help="profile name or .toml file (e.g. a calibrated one) the predictions use"
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--sanitize",
        action="store_true",
        help="report stream races: PyTorch's CUDA stream sanitizer on a GPU, the simulated device's with --simulate",
    )
    args = parser.parse_args(argv)
    from lowvram.device import accelerator_available

    if args.sanitize and not args.simulate and not accelerator_available():
        print(
            "gpu_check: --sanitize runs PyTorch's CUDA stream sanitizer, which needs a CUDA or ROCm device; "
            "use --simulate --sanitize here (the simulated device's race detector)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.steps is None:
        args.steps = 1 if args.sanitize else 3  # the sanitizer checks every kernel: slow, and timings mean nothing
    if args.simulate:
        torch.set_num_threads(1)
        if args.dtype is None:
            args.dtype = "fp32"
        args.frames, args.height, args.width = min(args.frames, 2), min(args.height, 4), min(args.width, 4)
        args.text_tokens = min(args.text_tokens, 8)
    elif args.dtype is None:
        args.dtype = "bf16"
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as refused:  # a usage error: argparse's, or --sanitize without a GPU
        return int(refused.code or 0)
    link = measure_link_gbps(args)
    rows = run(args)
    return report(args, rows, link)


def report(args: argparse.Namespace, rows: list[Row], link: float) -> int:
    """Print the table and the verdict line; 1 when a measured peak exceeds its prediction by over 5%."""
    where = "simulated accelerator (tiny widths)" if args.simulate else "GPU"
    print(f"{where}: {args.layers} blocks, {args.precision}/{args.dtype}, pinned H2D measured {link:.2f} GB/s")
    header = (
        f"{'strategy':<20}{'peak MiB':>10}{'pred MiB':>10}{'s/step':>10}{'pred s':>10}{'H2D GB/s':>10}{'MB/step':>10}"
        f"{'plan s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.refused:
            print(f"{r.strategy:<20}refused: {r.refused}")
            continue
        if r.race:
            print(f"{r.strategy:<20}RACE: {r.race}")
            continue
        rate = r.h2d_bytes_per_step / r.step_s / 1e9 if r.step_s else 0.0
        print(
            f"{r.strategy:<20}{r.peak_bytes / 2**20:>10.2f}{r.predicted_peak_bytes / 2**20:>10.2f}{r.step_s:>10.4g}"
            f"{r.predicted_step_s:>10.4g}{rate:>10.3f}{r.h2d_bytes_per_step / 1e6:>10.2f}{r.planned_step_s:>10.4g}"
        )
    over = [r.strategy for r in rows if not r.refused and not r.race and r.peak_bytes > 1.05 * r.predicted_peak_bytes]
    raced = [r.strategy for r in rows if r.race]
    if args.sanitize:
        print(f"peaks_over_prediction={','.join(over) or 'none'}")
        print(f"races={','.join(raced) or 'none'}")  # the figure --sanitize is for: last
    else:
        if raced:
            print(f"races={','.join(raced)}")
        print(f"peaks_over_prediction={','.join(over) or 'none'}")
    return 1 if over or raced else 0


if __name__ == "__main__":
    sys.exit(main())
