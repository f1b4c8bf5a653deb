"""Benchmark: peak host RAM and time of loading a bf16 checkpoint quantized, naive vs streaming vs quantized cache.

Writes a synthetic bf16 checkpoint (>= 2 GB by default, LTX-2-like layer shapes) in a temp dir, loads it in a fresh
subprocess per path, prints a table and, LAST, `peak_rss_over_quantized=X` for the streaming path, where
X = (peak RSS - the same process's RSS after imports) / bytes of the quantized weights. Needs ~2.5x the checkpoint
size in free RAM (the naive path). Usage: python tools/bench_quant_load.py [--gb 2.2] [--precision int8-quanto]
`--layout ltx2 [--layers 2]`: an official-layout single file of the real LTX-2 transformer class (real widths, only
`--layers` blocks; 2 = 2.2 GB bf16) loaded by `lowvram.models.ltx2.load_components`, as training loads it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HIDDEN = 4096
FF = 4 * HIDDEN
# One LTX-2-like block: four attention projections and the two feed-forward matrices (bf16: 384 MiB).
BLOCK_SHAPES = {
    "attn.to_q": (HIDDEN, HIDDEN),
    "attn.to_k": (HIDDEN, HIDDEN),
    "attn.to_v": (HIDDEN, HIDDEN),
    "attn.to_out": (HIDDEN, HIDDEN),
    "ff.up": (FF, HIDDEN),
    "ff.down": (HIDDEN, FF),
}


def block_count(target_bytes: int) -> int:
    per_block = sum(o * i * 2 + o * 2 for o, i in BLOCK_SHAPES.values())
    return max(1, -(-target_bytes // per_block))


def write_checkpoint(path: Path, blocks: int) -> int:
    """A safetensors file written tensor by tensor (never the whole model in memory); returns its size in bytes."""
    import torch

    entries = []
    offset = 0
    for b in range(blocks):
        for name, (o, i) in BLOCK_SHAPES.items():
            for suffix, shape in (("weight", [o, i]), ("bias", [o])):
                size = 2 * (o * i if suffix == "weight" else o)
                entries.append((f"blocks.{b}.{name}.{suffix}", shape, offset, offset + size))
                offset += size
    header = {key: {"dtype": "BF16", "shape": shape, "data_offsets": [s, e]} for key, shape, s, e in entries}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, shape, _, _ in entries:
            fan_in = shape[-1] if len(shape) == 2 else HIDDEN
            t = (torch.randn(shape, generator=gen) / fan_in**0.5).to(torch.bfloat16)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
    return path.stat().st_size


def ltx2_config(layers: int) -> dict:
    from lowvram.models import ltx2 as ck

    return {**ck.family_configs("ltx-2.0")["transformer"], "num_layers": layers}


def use_ltx2_layers(layers: int) -> None:
    """Make the ltx-2.0 family's transformer `layers` deep in this process: the synthetic file holds only that many
    blocks of the real model (a benchmark-only patch; everything else is the real loading code)."""
    from lowvram.models import ltx2 as ck

    real = ck.family_configs

    def configs(family: str) -> dict:
        out = real(family)
        if ck.canonical_family(family) == "ltx-2.0":
            out["transformer"] = {**out["transformer"], "num_layers": layers}
        return out

    ck.family_configs = configs


def write_ltx2_checkpoint(path: Path, layers: int) -> int:
    """The LTX-2 transformer (real widths, `layers` blocks) as the official single file, written tensor by tensor."""
    import torch

    from lowvram.models import ltx2 as ck

    skeleton = ck.build_on_meta("transformer", ltx2_config(layers))
    shapes = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    official = ck.diffusers_to_official("transformer", list(shapes))
    entries, offset = [], 0
    for key, diffusers_key in official.items():
        size = 2 * max(1, int(torch.Size(shapes[diffusers_key]).numel()))
        entries.append((key, shapes[diffusers_key], offset, offset + size))
        offset += size
    header = {key: {"dtype": "BF16", "shape": shape, "data_offsets": [s, e]} for key, shape, s, e in entries}
    header["__metadata__"] = {ck.FAMILY_METADATA_KEY: "ltx-2.0"}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, shape, _, _ in entries:
            t = (torch.randn(shape, generator=gen) / (shape[-1] if len(shape) == 2 else 64) ** 0.5).to(torch.bfloat16)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
    return path.stat().st_size


def build_stack(blocks: int):
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for group in ("attn", "ff"):
                layers = {
                    k.split(".")[1]: nn.Linear(s[1], s[0]) for k, s in BLOCK_SHAPES.items() if k.startswith(group)
                }
                setattr(self, group, nn.ModuleDict(layers))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))

    return Stack


class PeakRss:
    """Peak resident set size: a 1 ms sampling thread (RSS includes resident mmap'd file pages) and ru_maxrss."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        # ru_maxrss is a lifetime high-water mark: it speaks for the measured span only if it rises during it
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        rose = maxrss * 1024 if maxrss > self.maxrss_before else 0
        return max(self.peak, rose, self.proc.memory_info().rss)


def child(mode: str, ckpt: Path, cache_dir: Path, precision: str, blocks: int, layout: str = "blocks") -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import psutil
    import torch

    sys.path.insert(0, str(REPO))
    from lowvram.quant import allocated_bytes, build_empty, get_backend, load_quantized, quantize_model

    backend = get_backend(precision)
    backend._quantize_whole(torch.nn.Linear(64, 64))  # import the quantization library before the baseline
    if layout == "ltx2":
        from lowvram.models import ltx2

        use_ltx2_layers(blocks)
        ltx2.build_on_meta("transformer")  # import diffusers' transformer before the baseline
    else:
        Stack = build_stack(blocks)
    baseline = psutil.Process().memory_info().rss
    meter = PeakRss()
    t0 = time.perf_counter()
    status = None
    if layout == "ltx2":
        if mode == "naive":  # what training did before: bf16 load, then quantize in memory
            model = ltx2.load_components(ckpt, dtype=torch.bfloat16, components=("transformer",)).transformer
            ltx2.quantize_loaded(model, "transformer", precision)
        else:
            parts = ltx2.load_components(
                ckpt,
                dtype=torch.bfloat16,
                components=("transformer",),
                precision=precision,
                quant_cache_dir=cache_dir if mode != "stream" else None,
            )
            model, status = parts.transformer, parts.quant_loads["transformer"].cache_status
    elif mode == "naive":
        from safetensors.torch import load_file

        state = load_file(str(ckpt))
        with torch.device("meta"):
            model = Stack()
        model.load_state_dict(state, assign=True)
        del state
        quantize_model(model, precision)
    else:
        model = build_empty(Stack)
        result = load_quantized(
            model, ckpt, precision, dtype=torch.bfloat16, cache_dir=cache_dir if mode != "stream" else None
        )
        status = result.cache_status
    seconds = time.perf_counter() - t0
    peak = meter.stop()
    return {
        "mode": mode,
        "seconds": seconds,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "quantized_bytes": allocated_bytes(model),
        "cache_status": status,
    }


def run_child(mode: str, ckpt: Path, cache_dir: Path, precision: str, blocks: int, layout: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--cache-dir", str(cache_dir)]
    cmd += ["--precision", precision, "--blocks", str(blocks), "--layout", layout]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2, help="checkpoint size in GB (10^9 bytes)")
    ap.add_argument("--precision", default="int8-quanto")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoint (default: system temp)")
    ap.add_argument("--layout", choices=("blocks", "ltx2"), default="blocks", help="synthetic checkpoint kind")
    ap.add_argument("--layers", type=int, default=2, help="--layout ltx2: transformer blocks in the file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, Path(args.ckpt), Path(args.cache_dir), args.precision, args.blocks, args.layout)
        print(json.dumps(result))
        return

    blocks = block_count(int(args.gb * 1e9)) if args.layout == "blocks" else args.layers
    work = Path(tempfile.mkdtemp(prefix="lowvram-bench-quant-", dir=args.dir))
    try:
        ckpt = work / "synthetic-bf16.safetensors"
        t0 = time.perf_counter()
        if args.layout == "ltx2":
            sys.path.insert(0, str(REPO))
            size = write_ltx2_checkpoint(ckpt, blocks)
            what = f"official LTX-2 layout, real transformer widths, {blocks} blocks"
        else:
            size = write_checkpoint(ckpt, blocks)
            what = f"{blocks} blocks"
        print(f"checkpoint: {size / 1e9:.2f} GB bf16, {what}, written in {time.perf_counter() - t0:.1f} s")
        cache_dir = work / "cache"
        paths = [
            ("naive: bf16 then quantize", "naive"),
            ("streaming", "stream"),
            ("streaming + write cache", "stream-cache"),
            ("quantized cache hit", "stream-cache"),
        ]
        rows = [(label, run_child(mode, ckpt, cache_dir, args.precision, blocks, args.layout)) for label, mode in paths]
        print(f"precision {args.precision}; RSS after imports subtracted; GB = 10^9 bytes")
        print(f"{'path':34s} {'time_s':>7s} {'peak_rss_gb':>11s} {'over_base_gb':>12s} {'quant_gb':>9s} {'ratio':>6s}")
        for label, r in rows:
            over = r["peak_bytes"] - r["baseline_bytes"]
            label = label + (f" ({r['cache_status']})" if r["cache_status"] not in (None, "off") else "")
            print(
                f"{label:34s} {r['seconds']:7.1f} {r['peak_bytes'] / 1e9:11.2f} {over / 1e9:12.2f} "
                f"{r['quantized_bytes'] / 1e9:9.2f} {over / r['quantized_bytes']:6.2f}"
            )
        naive, stream, hit = rows[0][1], rows[1][1], rows[3][1]
        stream_over = stream["peak_bytes"] - stream["baseline_bytes"]
        naive_over = naive["peak_bytes"] - naive["baseline_bytes"]
        print(f"streaming/naive peak over baseline: {stream_over / naive_over:.2f}")
        print(f"cache hit time / streaming time: {hit['seconds'] / stream['seconds']:.2f}")
        x = stream_over / stream["quantized_bytes"]
        print(f"peak_rss_over_quantized={x:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
