"""Time `lowvram plan` for the full LTX-2 on the 3090 profile (832x480, 17 frames, batch 2): cold, then warm.

Imports are done before timing (diffusers + peft alone take ~15 s here; the CLI imports them lazily). The cold run
starts from an empty measurement cache; the warm run reads the cache the cold run wrote. Last line: plan_seconds=X
(the cold run). `--model-version V` plans LTX-2.3 or 2.5 (default 2.0); `--cache-dir DIR` keeps the measurements
there (it must be empty for a cold run) so later `lowvram plan` runs can reuse them (LOWVRAM_CACHE_DIR=DIR/..).
`--field-reports` also prints the predicted VRAM of the seed's field-report settings (README table).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

GIB = 2**30
GB = 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-version", default="2.0", help="LTX-2 release: 2.0, 2.3 or 2.5")
    parser.add_argument("--cache-dir", default=None, help="an empty folder to keep the measurements in")
    parser.add_argument("--field-reports", action="store_true", help="also print the field-report table")
    args = parser.parse_args()
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore")
    import diffusers  # noqa: F401  (imported up front: excluded from the plan's time)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from lowvram.config import load_config
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    import_s = time.perf_counter() - t0
    cfg, _ = load_config(
        None,
        {
            "model.family": "ltx2",
            "model.version": args.model_version,
            "data.resolution": "832x480",
            "data.frames": 17,
            "train.batch_size": 2,
        },
    )
    profile = load_profile("3090")
    if args.cache_dir is not None and any(Path(args.cache_dir).glob("*.json")):
        sys.exit(f"bench_plan: --cache-dir {args.cache_dir} is not empty: a cold run needs an empty folder")
    keep = contextlib.nullcontext(args.cache_dir) if args.cache_dir is not None else None
    with keep or tempfile.TemporaryDirectory(prefix="lowvram-plan-bench-") as cache_dir:
        t = time.perf_counter()
        cold = plan_run(cfg, profile, choose=True, cache_dir=cache_dir)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        warm = plan_run(cfg, profile, choose=True, cache_dir=cache_dir)
        warm_s = time.perf_counter() - t
    assert cold.to_json() == warm.to_json(), "a warm plan must equal the cold one"
    print(f"imports (excluded): {import_s:.1f} s")
    print(f"LTX-{cfg.model.version}, profile 3090, 832x480x17 batch 2")
    print(f"plan: fits={cold.fits} {cold.explanation[0] if cold.explanation else ''}")
    print(
        f"train VRAM peak: {cold.phases['train'].vram_peak_bytes / 2**30:.2f} GiB of "
        f"{profile.vram_bytes / 2**30:.0f} GiB; predicted {cold.step_seconds_estimate} s/step"
    )
    print(f"cold (empty measurement cache): {cold_s:.2f} s")
    print(f"warm (cache on disk): {warm_s:.2f} s  (cold/warm = {cold_s / warm_s:.1f}x)")
    if args.field_reports:
        field_reports(cfg)
    print(f"plan_seconds={cold_s:.2f}")


def field_reports(cfg) -> None:
    """Predicted VRAM for the settings of the seed's field reports (480p, 17 frames, batch 2), in GiB.

    "as lowvram" is our train phase: connector outputs cached, text encoder and VAE freed before training.
    "as SimpleTuner" adds what that trainer keeps on the device while training: the VAE (for validation) and the
    text connectors with their activations (it caches Gemma's 188160-wide stack and runs the connectors every step).
    """
    from lowvram.plan import Settings, budget_settings
    from lowvram.plan.measure import MeasureCache
    from lowvram.plan.plan import collect_measurements
    from lowvram.profiles import load_profile

    rows = [
        ("bf16, no offload", "a100-80g", Settings(precision="bf16"), "~48 GB"),
        ("int8-torchao, no offload", "a100-80g", Settings(precision="int8-torchao"), "29-30 GB"),
        (
            "RamTorch incl. text encoder, 7900XTX",
            "7900xtx",
            Settings(precision="bf16", offload="ramtorch", ramtorch_share=1.0, ramtorch_text_encoder=True),
            "~13 GB",
        ),
    ]
    print(
        "| settings (480p, 17 frames, batch 2) | reported | predicted, as lowvram runs it | "
        "predicted, holding what SimpleTuner holds | text-cache phase |"
    )
    print("|---|---|---|---|---|")
    for label, profile_name, settings, reported in rows:
        profile = load_profile(profile_name)
        plan = budget_settings(cfg, profile, settings)
        m = collect_measurements(cfg, profile, MeasureCache())
        train = plan.phases["train"].vram_peak_bytes
        vae = plan.phases["latent_cache"].vram["VAEs"]
        connectors = m.connectors.bytes("bf16", "bf16") + m.connectors_peak_bytes
        text = plan.phases["text_cache"].vram_peak_bytes
        print(
            f"| {label} | {reported} | {train / GIB:.1f} GiB | {(train + vae + connectors) / GIB:.1f} GiB "
            f"(+{vae / GIB:.1f} VAE, +{connectors / GIB:.1f} connectors) | {text / GIB:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
