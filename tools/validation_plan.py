"""Predicted validation-phase VRAM peak per profile (issue 19): `python tools/validation_plan.py [profiles...]`.

The training plan is 832x480x17 batch 2 (the planner's choice of memory settings per profile); validation renders
832x480x49 with guidance (two rows). Prints one line per profile, then `name=value` for the first.
"""

from __future__ import annotations

import sys

from lowvram.config import load_config
from lowvram.plan import plan_run
from lowvram.profiles import load_profile


def main(names: list[str]) -> None:
    cfg, _ = load_config(None, {"data.resolution": "832x480", "data.frames": 17, "train.batch_size": 2,
                                "validation.enabled": True, "validation.resolution": "832x480",
                                "validation.num_frames": 49})  # fmt: skip
    first = None
    for name in names:
        profile = load_profile(name)
        plan = plan_run(cfg, profile, choose=True)
        v = plan.phases.get("validation")
        train = plan.phases.get("train")
        gib = (v.vram_peak_bytes - v.vram.get("reserve", 0)) / 2**30 if v else float("nan")
        first = gib if first is None else first
        print(f"{name}: fits={plan.fits} train {(train.vram_peak_bytes - train.vram.get('reserve', 0)) / 2**30:.2f} "
              f"GiB, validation {gib:.2f} GiB (usable {plan.vram_usable_bytes / 2**30:.2f}); "
              f"{plan.settings.get('memory.blocks_to_swap')} blocks swapped, "
              f"offload_optimizer={plan.settings.get('validation.offload_optimizer')}, "
              f"vae_tiling={plan.settings.get('validation.vae_tiling')}; {plan.reason or ''}")
        if v:
            for k, b in v.vram.items():
                if b and k != "reserve":
                    print(f"    {k}: {b / 2**30:.3f} GiB")
    print(f"validation_vram_gib_{names[0]}={first:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["3090", "4090", "4070"])
