"""Training from the disk tier within an anonymous-RAM budget smaller than the model (offload/disk_tier.py).

A block-stack model whose offloaded weight file is at least 3x the budget trains LoRA steps on the simulated device,
each configuration in a fresh process (RSS is per process), with glibc returning freed memory at once:
- all weights in RAM, no offload: the gradients every other run must equal exactly;
- in-RAM block swap (pinned masters): the step time the disk tier is compared with;
- the disk tier: the fewest swapped blocks on disk whose anonymous RAM (the planner's tier arithmetic, plan/host.py)
  fits the budget; its peak RssAnon + RssShmem over the process's own baseline is compared with the budget.
Sim clock: a 4070-class link (24 GB/s) and disk (3.5 GB/s), compute scaled so one block's compute : its copy equals
the real 19B fp8 block's on the 4070 profile (the planner's measured FLOPs). Wall clock: this CPU and its disk.
Last lines: anon_rss_over_budget=X (peak over baseline / budget - 1; <= 0 is within) and disk_tier_step_ratio=Y
(disk tier / in-RAM block swap on the simulated clock).

    /work/venv/bin/python tools/bench_lowram.py [--budget-mib 256] [--layers 24] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

MIB = 2**20
PLAN_ACCURACY = 1.10


def block_compute_to_copy_4070(profile_name: str = "4070") -> tuple[float, str]:
    """One fp8 19B block's forward compute time / its copy time over the profile's pinned link (planner figures)."""
    from lowvram.config import load_config
    from lowvram.plan import plan_run
    from lowvram.plan.budget import DEFAULT_EFFICIENCY
    from lowvram.profiles import load_profile

    profile = load_profile(profile_name)
    cfg, _ = load_config(None, {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"precision": "fp8-torchao"})})
    plan = plan_run(cfg, profile, choose=False)
    m = plan.measured
    compute_s = m["block_forward_flops"] / (profile.bf16_tflops * 1e12 * DEFAULT_EFFICIENCY)
    copy_s = m["block_params"] / (profile.h2d_pinned_gbps * 1e9)  # fp8: one byte per parameter (scales aside)
    return compute_s / copy_s, f"{compute_s * 1e3:.0f} ms compute vs {copy_s * 1e3:.0f} ms copy per block"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=float, default=256.0, help="anonymous RAM budget for the run (MiB)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--disk-gbps", type=float, default=3.5, help="simulated disk (4070-class NVMe)")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the weight file (default: a temp folder)")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from lowvram.offload import lowram_harness as H

    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-lowram-"))
    folder.mkdir(parents=True, exist_ok=True)
    block = 2 * args.dim * args.hidden * 4
    file_bytes = args.layers * block
    budget = int(args.budget_mib * MIB)
    acts = H.activation_bytes(args.layers, args.dim, args.hidden, args.tokens)
    # The fewest blocks on disk whose planned anonymous RAM, plus the 10% the plan may be off by per tier
    # (tests/test_disk_tier.py), fits the budget
    choice = None
    for k in range(args.layers - 1, 1, -1):
        for d in range(0, k + 1):
            need = H.predicted_anon_bytes("pinned", args.layers, k, d, block, activations=acts)
            if need * PLAN_ACCURACY <= budget:
                choice = (k, d, need)
                break
        if choice and choice[1] < k:
            break
    if choice is None:
        print(
            f"a budget of {args.budget_mib:g} MiB cannot hold the ring and staging buffers of {block / MIB:.0f} MiB "
            "blocks: raise --budget-mib",
            file=sys.stderr,
        )
        return 2
    k, d, need = choice
    print(
        f"model: {args.layers} blocks x {block / MIB:.0f} MiB = {file_bytes / MIB:.0f} MiB weight file, "
        f"{file_bytes / budget:.1f}x the {budget / MIB:.0f} MiB budget; {k} blocks swapped, {d} of them on disk "
        f"(planned anonymous RAM {need / MIB:.0f} MiB)"
    )
    if file_bytes < 3 * budget:
        print("note: the weight file is under 3x the budget (raise --layers)")

    ratio, what = block_compute_to_copy_4070()
    params = args.dim * args.hidden * 2
    copy_s = block / 24e9
    tflops = 2 * args.tokens * params / (ratio * copy_s) / 1e12
    print(f"4070 profile, fp8 19B block: {what}; simulated compute {tflops:.3g} TFLOP/s keeps that ratio")

    common = dict(
        layers=args.layers,
        dim=args.dim,
        hidden=args.hidden,
        tokens=args.tokens,
        steps=args.steps,
        warm_steps=2,
        h2d_gbps=24.0,
        tflops=tflops,
        disk_gbps=args.disk_gbps,
    )
    runs = {}
    for name, kw in (
        ("disk", dict(blocks_to_swap=k, blocks_on_disk=d)),
        ("ram", dict(blocks_to_swap=k, blocks_on_disk=0)),
        ("all-in-ram", dict(blocks_to_swap=0)),
    ):
        runs[name] = H.measure_in_subprocess(str(folder), grads_out=str(folder / f"grads-{name}"), **common, **kw)
        r = runs[name]
        print(
            f"{name:>10}: train peak {r['train_peak_anon_bytes'] / MIB:7.1f} MiB over a "
            f"{r['baseline_anon_bytes'] / MIB:.0f} MiB process baseline "
            f"(planned {r['predicted_train_anon_bytes'] / MIB:.1f}), "
            f"load peak {r['load_peak_anon_bytes'] / MIB:.1f} MiB; sim {r['sim_step_s'] * 1e3:.2f} ms/step, "
            f"wall {r['wall_step_s']:.2f} s/step; staged reads {r['staged_reads']}, misses {r['staged_misses']}"
        )
    base = load_file(folder / "grads-all-in-ram")
    exact = all(
        load_file(folder / f"grads-{n}").keys() == base.keys()
        and all((load_file(folder / f"grads-{n}")[k] == v).all() for k, v in base.items())
        for n in ("disk", "ram")
    )
    print(f"LoRA gradients equal the all-in-RAM baseline exactly: {exact}")
    disk, ram = runs["disk"], runs["ram"]
    over = disk["train_peak_anon_bytes"] / budget - 1
    print(f"disk tier vs in-RAM block swap, CPU wall clock: {disk['wall_step_s'] / ram['wall_step_s']:.2f}")
    print(f"anon_rss_over_budget={over:.3f}")
    print(f"disk_tier_step_ratio={disk['sim_step_s'] / ram['sim_step_s']:.2f}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
