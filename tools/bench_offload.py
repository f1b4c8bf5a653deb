"""Offload machinery cost on the simulated device: per strategy, step time relative to no offload and bytes moved.

Runs a small LTX-2 transformer (real diffusers class, narrow widths, a realistic token count) with LoRA and
checkpointing, one step per strategy in turn so machine load hits all alike, and prints a table. CPU ratio
(fastest of the timed steps, process CPU time): what our hooks, copies and stand-ins cost on this CPU, the
machinery itself (goal <= 1.10).
Sim ratio: the simulated clock, calibrated so one block's compute : its weights' copy equals the real 19B block's
at this token count on the profile (bf16, linear FLOPs) -- the exposed copy time a GPU would show.
Last line: worst_step_time_ratio=X (worst CPU ratio).

    /work/venv/bin/python tools/bench_offload.py [--layers 6] [--steps 5] [--profile 4090]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build(args, precision: str):
    from lowvram.offload.harness import tiny_batch, tiny_lora_transformer

    config = dict(
        num_attention_heads=4,
        attention_head_dim=32,
        cross_attention_dim=128,
        audio_num_attention_heads=4,
        audio_attention_head_dim=16,
        audio_cross_attention_dim=64,
    )
    transformer = tiny_lora_transformer(precision, num_layers=args.layers, config=config, rank=8)
    batch = tiny_batch(
        transformer,
        frames=args.frames,
        height=args.height,
        width=args.width,
        audio_tokens=args.audio_tokens,
        text_tokens=16,
    )
    return transformer, batch


def calibrated_tflops(args) -> float:
    """The simulated matmul rate at which a block's step compute : its frozen weights' copy equals the real model's.

    Real LTX-2 block, bf16, per step (forward, recompute, backward ~ 4 forwards of 2·P·T FLOPs) against one copy of
    its 2·P bytes: ratio 4·T·BW/F. The narrow bench block has its own FLOPs and bytes, measured here.
    """
    from lowvram.device import get_backend
    from lowvram.offload.weights import frozen_parameters, tensor_bytes
    from lowvram.profiles import load_profile

    profile = load_profile(args.profile)
    sim = get_backend("sim", h2d_gbps=profile.h2d_pinned_gbps, tflops=1.0)
    transformer, batch = build(args, args.precision)
    transformer.enable_gradient_checkpointing()
    sim.place_module(transformer)
    step((transformer, batch, sim, None))
    st = sim.stats()
    flops_per_block = (st.compute_s - st.stall_s) * 1e12 / args.layers
    block = transformer.transformer_blocks[0]
    bytes_per_block = sum(tensor_bytes(m._parameters[n]) for m, n, _ in frozen_parameters(block))
    tokens = args.frames * args.height * args.width + args.audio_tokens
    real_ratio = 4 * tokens * profile.h2d_pinned_gbps * 1e9 / (profile.bf16_tflops * 1e12)
    tflops = flops_per_block * profile.h2d_pinned_gbps * 1e9 / (bytes_per_block * real_ratio) / 1e12
    print(
        f"clock calibration: real block step compute / copy = {real_ratio:.2f} at {tokens} tokens on "
        f"{args.profile}; bench block {flops_per_block / 1e9:.3f} GFLOP, {bytes_per_block / 1e6:.3f} MB "
        f"-> simulated {tflops * 1e3:.3f} GFLOP/s"
    )
    return tflops


def make_case(name: str, args):
    """(transformer, batch, backend, strategy) ready to step."""
    from lowvram import offload
    from lowvram.device import get_backend
    from lowvram.profiles import load_profile

    profile = load_profile(args.profile)
    # CPU time of the strategies' own machinery: the race detector (test instrumentation) stays off here.
    sim = get_backend("sim", h2d_gbps=profile.h2d_pinned_gbps, tflops=args.tflops, check_races=False)
    transformer, batch = build(args, args.precision)
    half = args.layers // 2
    strategy = None
    if name == "activation_offload":
        strategy = offload.apply_activation_offload(transformer, sim)
    else:
        transformer.enable_gradient_checkpointing()
    if name == "streaming":
        strategy = offload.apply_weight_streaming(transformer, sim)
    elif name == "streaming_half":
        strategy = offload.apply_weight_streaming(transformer, sim, share=0.5, patterns="transformer_blocks.*")
    elif name == "block_swap_spread":
        strategy = offload.apply_block_swap(transformer, sim, blocks_to_swap=half, placement="spread")
    elif name == "block_swap_last":
        strategy = offload.apply_block_swap(transformer, sim, blocks_to_swap=half, placement="last")
    elif name == "block_swap_all_but_one":
        strategy = offload.apply_block_swap(transformer, sim, blocks_to_swap=args.layers - 1)
    elif name == "group_block_level":
        strategy = offload.apply_group_offload(transformer, sim, offload_type="block_level")
    elif name == "group_leaf_level":
        strategy = offload.apply_group_offload(transformer, sim, offload_type="leaf_level")
    sim.place_module(transformer)
    return transformer, batch, sim, strategy


def step(case):
    from lowvram.offload.harness import lora_step, zero_grads

    transformer, batch, sim, _ = case
    zero_grads(transformer)
    with sim.session():
        sim.reset_counters()
        # CPU time of this (single-threaded) process: on a shared machine, cpu_s time mostly measures the neighbours.
        start = time.process_time()
        lora_step(transformer, batch, sim)
        cpu_s = time.process_time() - start
    return cpu_s, sim.stats()


CASES = [
    "none",
    "streaming",
    "streaming_half",
    "block_swap_spread",
    "block_swap_last",
    "block_swap_all_but_one",
    "group_block_level",
    "group_leaf_level",
    "activation_offload",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy (after one warm-up)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames (3 = 17 video frames)")
    parser.add_argument("--height", type=int, default=15, help="latent height (15 = 480 px)")
    parser.add_argument("--width", type=int, default=26, help="latent width (26 = 832 px)")
    parser.add_argument("--audio-tokens", type=int, default=17, help="audio latent frames (25 per second)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8-quanto", "int8-torchao"])
    parser.add_argument("--profile", default="4090", help="hardware profile for the simulated clock")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    args.tflops = calibrated_tflops(args)
    names = args.cases.split(",")
    cases = {name: make_case(name, args) for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    stats = {}
    for name in names:  # warm-up: the first step records prefetch orders and fills rings
        step(cases[name])
    for _ in range(args.steps):
        for name in names:  # interleaved, so load changes on this shared machine hit every strategy alike
            cpu_s, st = step(cases[name])
            cpu_times[name].append(cpu_s)
            stats[name] = st
    base_cpu = min(cpu_times["none"]) if "none" in cpu_times else None
    base_sim = stats["none"].compute_s if "none" in stats else None
    header = (
        f"{'strategy':<24}{'cpu s/step':>12}{'cpu ratio':>11}{'sim ms/step':>12}{'sim ratio':>10}"
        f"{'stall ms':>10}{'H2D MB/step':>12}{'D2H MB/step':>12}{'peak MB':>9}"
    )
    print(
        f"precision {args.precision}, {args.layers} layers, video tokens {args.frames * args.height * args.width}, "
        f"checkpointing on, profile {args.profile}, fastest of {args.steps} timed steps"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name in names:
        cpu_s = min(cpu_times[name])
        st = stats[name]
        cpu_ratio = cpu_s / base_cpu if base_cpu else float("nan")
        sim_ratio = st.compute_s / base_sim if base_sim else float("nan")
        if name != "none":
            worst = max(worst, cpu_ratio)
        print(
            f"{name:<24}{cpu_s:>12.4f}{cpu_ratio:>11.3f}{st.compute_s * 1e3:>12.4f}{sim_ratio:>10.3f}"
            f"{st.stall_s * 1e3:>10.4f}{st.h2d_bytes / 1e6:>12.3f}{st.d2h_bytes / 1e6:>12.3f}"
            f"{st.peak_bytes / 1e6:>9.2f}"
        )
    print(f"worst_step_time_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
