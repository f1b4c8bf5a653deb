"""Print the README's per-profile plan table for each LTX-2 version: what `lowvram plan --model-version V --profile P
--batch B [--resolution WxH --frames N]` chooses, its train VRAM peak and predicted s/step, one markdown row each.

Measurements come from (and go to) the planner's disk cache (`--cache-dir`, default `$LOWVRAM_CACHE_DIR/plan`), so
a second run only budgets. It does not time anything (tools/bench_plan.py does).
"""

from __future__ import annotations

import argparse
import warnings

GIB = 2**30
SHAPES = {"832x480x17": ("832x480", 17), "768x512x121": ("768x512", 121)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default="2.0,2.3,2.5")
    parser.add_argument("--profiles", default=None, help="comma-separated (default: every built-in but cpu)")
    parser.add_argument("--cases", default="832x480x17:1,832x480x17:2,768x512x121:1", help="SHAPE:BATCH,...")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from lowvram.config import load_config
    from lowvram.errors import LowvramError
    from lowvram.plan import plan_run
    from lowvram.profiles import builtin_profile_names, load_profile

    names = args.profiles.split(",") if args.profiles else [n for n in builtin_profile_names() if n != "cpu"]
    print("| version | profile | clip | batch | chosen | train VRAM peak | predicted s/step |")
    print("|---|---|---|---|---|---|---|")
    rows = 0
    for version in args.versions.split(","):
        for name in names:
            for case in args.cases.split(","):
                shape, batch = case.split(":")
                resolution, frames = SHAPES[shape]
                cfg, _ = load_config(
                    None,
                    {
                        "model.family": "ltx2",
                        "model.version": version,
                        "data.resolution": resolution,
                        "data.frames": frames,
                        "train.batch_size": int(batch),
                    },
                )
                try:
                    plan = plan_run(cfg, load_profile(name), choose=True, cache_dir=args.cache_dir)
                except LowvramError as e:
                    print(f"| {version} | `{name}` | {shape} | {batch} | refused: {e} | | |")
                    rows += 1
                    continue
                if plan.fits:
                    chosen = plan.explanation[0].removeprefix("chosen: ").split(":")[0]
                    peak = f"{plan.phases['train'].vram_peak_bytes / GIB:.1f} GiB"
                    print(f"| {version} | `{name}` | {shape} | {batch} | {chosen} | {peak} | "
                          f"{plan.step_seconds_estimate:.2f} |")  # fmt: skip
                else:
                    print(f"| {version} | `{name}` | {shape} | {batch} | does not fit: {plan.reason} | | |")
                rows += 1
    print(f"rows={rows}")


if __name__ == "__main__":
    main()
