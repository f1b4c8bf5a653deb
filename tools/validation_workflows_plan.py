"""What I2V / S2V validation adds to the plan (issue 19): `python tools/validation_workflows_plan.py [profile]`.

The training plan is 832x480x17 batch 2 (the planner's choice of memory settings); validation renders 832x480x49
with guidance. For each workflow: the validation phase's device peak, its sampling point (where the I2V per-token
timesteps and the reference tokens land), and the latent_cache phase's extra for the reference encode. Ratios are
to the T2V run of the same profile, measured in this one run; the last line is `name=value`.
"""

from __future__ import annotations

import sys

from lowvram.config import load_config
from lowvram.plan import plan_run
from lowvram.plan.measure import MeasureCache
from lowvram.plan.plan import model_configs
from lowvram.plan.validation import collect_validation
from lowvram.profiles import load_profile

GIB = 2**30
WORKFLOWS = {"t2v": {}, "i2v": {"validation.reference_image": "ref.png"},
             "s2v": {"validation.reference_audio": "voice.wav"}}  # fmt: skip


def main(name: str) -> None:
    profile = load_profile(name)
    base = {"data.resolution": "832x480", "data.frames": 17, "train.batch_size": 2, "validation.enabled": True,
            "validation.resolution": "832x480", "validation.num_frames": 49}  # fmt: skip
    peaks = {}
    sampling_t2v = None
    for workflow, extra in WORKFLOWS.items():
        cfg, _ = load_config(None, {**base, **extra})
        plan = plan_run(cfg, profile, choose=True)
        v = plan.phases["validation"]
        peaks[workflow] = v.vram_peak_bytes - v.vram.get("reserve", 0)
        attention = "flash" if profile.supports.flash_attention else "math"
        vm = collect_validation(cfg, model_configs(cfg.model.family), MeasureCache(), attention=attention,
                                compute_dtype="bf16")  # fmt: skip
        sampling = vm.sample_peak_bytes + vm.reference_bytes
        sampling_t2v = sampling_t2v or sampling
        extra_encode = plan.phases["latent_cache"].vram.get("validation reference encode (beyond a clip's)", 0)
        print(f"{name} {workflow}: fits={plan.fits} validation {peaks[workflow] / GIB:.3f} GiB "
              f"(x{peaks[workflow] / peaks['t2v']:.4f} of t2v), worst point entries: "
              f"{[k for k in v.vram if '(at ' in k]}, sampling activations + references {sampling / GIB:.3f} GiB "
              f"(x{sampling / sampling_t2v:.4f}, {(sampling - sampling_t2v) / 2**20:+.2f} MiB), "
              f"reference encode beyond a clip {extra_encode / GIB:.3f} GiB")
    print(f"i2v_validation_vram_gib_{name}={peaks['i2v'] / GIB:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "3090")
