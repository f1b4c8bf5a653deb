"""Peak activation bytes of LTX-2's real-width video VAE encode per memory option, measured on fake tensors.

Usage: python tools/bench_vae.py [--width 128 --height 128 --frames 17,33,65] [--dtype bf16]
Builds the real 694M-parameter encoder on meta, runs each option's encode under FakeTensorMode with the
tracked-bytes instrument (exact tensor bytes, no compute, no weight memory) and prints peaks and ratios to `none`.
Kernel workspaces (im2col, cuDNN) are not tensors and are not in these numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowvram.vae import VaeOptions, measure_vae_encode_peak_bytes, options_for_bench, real_video_vae_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--frames", default="17,33,65", help="comma-separated 8k+1 frame counts")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    config = real_video_vae_config()
    dtype = DTYPES[args.dtype]
    print(f"LTX-2 video VAE encoder (real widths), {args.width}x{args.height}, {args.dtype}, batch 1, fake tensors")
    print(f"{'frames':>6} {'option':<14} {'act peak MiB':>12} {'vs none':>8} {'input MiB':>9} {'latent':>20} {'s':>5}")
    weights = None
    for frames in [int(f) for f in args.frames.split(",")]:
        base = None
        for name, options in options_for_bench(VaeOptions(), args.width, args.height).items():
            start = time.perf_counter()
            peak = measure_vae_encode_peak_bytes(config, args.width, args.height, frames, options, dtype=dtype)
            seconds = time.perf_counter() - start
            base = base or peak.activation_peak_bytes
            weights = peak.weight_bytes
            print(
                f"{frames:>6} {name:<14} {peak.activation_peak_bytes / 2**20:>12.2f} "
                f"{peak.activation_peak_bytes / base:>8.2f} {peak.input_bytes / 2**20:>9.2f} "
                f"{str(list(peak.latent_shape)):>20} {seconds:>5.1f}"
            )
    print(f"encoder weights: {weights / 2**30:.2f} GiB ({args.dtype}); tiling = diffusers tiles of half the frame")
    print_exactness()


def print_exactness() -> None:
    """Max |latent - plain latent| per option on the tiny VAE (real compute, fp32): which options are exact."""
    from lowvram.models.ltx2 import build_tiny_components
    from lowvram.vae import encode_video

    vae = build_tiny_components(seed=0).video_vae
    clip = torch.rand((1, 3, 33, 64, 96), generator=torch.Generator().manual_seed(0)) * 2 - 1
    options = options_for_bench(VaeOptions(), 96, 64)
    reference = encode_video(vae, clip, options["none"])
    diffs = {name: float((encode_video(vae, clip, o) - reference).abs().max()) for name, o in options.items()}
    print(
        "tiny VAE, 96x64, 33 frames, fp32: max |latent - none| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )


if __name__ == "__main__":
    main()
