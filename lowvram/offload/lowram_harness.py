"""A block-stack model for host-RAM tests and tools/bench_lowram.py: weights generated block by block (so a model
larger than RAM can be written to a checkpoint without ever being whole), LoRA adapters, anonymous RSS from /proc.

Test and benchmark scaffolding only: the trainer never imports it.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from lowvram.plan import host as host_ram


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, rank: int, device="cpu"):
        super().__init__()
        self.up = LoraLinear(nn.Linear(dim, hidden, bias=False, device=device), rank)
        self.down = LoraLinear(nn.Linear(hidden, dim, bias=False, device=device), rank)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class BlockStack(nn.Module):
    """`transformer_blocks` of identical blocks, checkpointed like the real transformer (non-reentrant)."""

    def __init__(self, layers: int, dim: int, hidden: int, rank: int = 4, device="cpu"):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(dim, hidden, rank, device) for _ in range(layers))
        self.is_gradient_checkpointing = True

    def enable_gradient_checkpointing(self) -> None:
        self.is_gradient_checkpointing = True

    def forward(self, x):
        for block in self.transformer_blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


def block_weights(index: int, dim: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Block `index`'s frozen weights, generated on their own (deterministic per block)."""
    g = torch.Generator().manual_seed(seed * 100003 + index)
    return {
        f"transformer_blocks.{index}.up.base.weight": torch.randn(hidden, dim, generator=g) / dim**0.5,
        f"transformer_blocks.{index}.down.base.weight": torch.randn(dim, hidden, generator=g) / hidden**0.5,
    }


def lora_init(model: BlockStack, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(layers: int, dim: int, hidden: int, *, materialize: bool, seed: int = 0) -> BlockStack:
    """The model; frozen weights left on meta unless `materialize` (LoRA always real)."""
    model = BlockStack(layers, dim, hidden, device="meta")
    for block in model.transformer_blocks:
        for lin in (block.up, block.down):
            lin.lora_A = nn.Parameter(torch.empty(lin.lora_A.shape))
            lin.lora_B = nn.Parameter(torch.empty(lin.lora_B.shape))
    lora_init(model)
    if materialize:
        for i in range(layers):
            for key, value in block_weights(i, dim, hidden, seed).items():
                owner, _, name = key.rpartition(".")
                model.get_submodule(owner)._parameters[name] = nn.Parameter(value, requires_grad=False)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def write_checkpoint(path: Path, layers: int, dim: int, hidden: int, seed: int = 0) -> int:
    """A safetensors checkpoint written one block at a time (never the whole model in RAM); returns its size."""
    shapes = {}
    for i in range(layers):
        shapes[f"transformer_blocks.{i}.up.base.weight"] = [hidden, dim]
        shapes[f"transformer_blocks.{i}.down.base.weight"] = [dim, hidden]
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = shape[0] * shape[1] * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(layers):
            for key, value in block_weights(i, dim, hidden, seed).items():
                assert key in header
                f.write(value.contiguous().numpy().tobytes())
    return path.stat().st_size


def rss_anon_bytes() -> int:
    """RssAnon + RssShmem of this process (anonymous and shared-memory pages: what RAM must hold)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                key, value, _ = line.split()
                fields[key] = int(value) * 1024
    return fields.get("RssAnon:", 0) + fields.get("RssShmem:", 0)


class AnonPeak:
    """Samples `rss_anon_bytes` on a thread (every `interval_s`) between start() and stop(); `peak` holds the max."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> AnonPeak:
        self.peak = rss_anon_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def train_steps(model: BlockStack, backend, x: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """`steps` forward + backward passes (no optimizer: the gradients of the last step are compared)."""
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        with backend.session() if hasattr(backend, "session") else _null():
            loss = model(x).square().mean()
            loss.backward()
    return lora_grads(model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def activation_bytes(layers: int, dim: int, hidden: int, tokens: int) -> int:
    """What autograd holds for this model in fp32: every block's checkpointed input, plus one block's recompute and
    backward (its two hidden-wide activations and their gradients)."""
    return 4 * (layers * tokens * dim + 4 * tokens * hidden)


def predicted_anon_bytes(
    tier: str,
    layers: int,
    blocks_to_swap: int,
    blocks_on_disk: int,
    block_bytes: int,
    *,
    activations: int = 0,
    ring_slots: int = 2,
) -> int:
    """The planner's host tiers for this model on the simulated device, whose device memory is host RAM too: the
    swapped blocks' RAM-side masters and staging ring (plan/host.py), the ring's device slots, the resident blocks
    and the activations."""
    ram, _ = host_ram.swap_host_components(tier, blocks_to_swap, blocks_on_disk, block_bytes)
    slots = min(ring_slots, blocks_to_swap) * block_bytes
    resident = (layers - blocks_to_swap) * block_bytes
    return sum(ram.values()) + slots + resident + activations


def measure_run(
    folder: str,
    *,
    tier: str = "pinned",
    layers: int = 8,
    dim: int = 512,
    hidden: int = 2048,
    tokens: int = 64,
    blocks_to_swap: int = 6,
    blocks_on_disk: int = 0,
    steps: int = 3,
    warm_steps: int = 0,
    h2d_gbps: float = 24.0,
    disk_gbps: float | None = None,
    tflops: float = 165.0,
    grads_out: str | None = None,
) -> dict:
    """One run in this process (start it in a fresh one: RSS is per process): load, apply the tier, `steps` LoRA
    steps on the simulated device. Peaks are anonymous RSS over the process's own baseline, per phase.

    blocks_to_swap=0: every weight in RAM, no offload (the baseline whose gradients the others must equal). Set
    MALLOC_MMAP_THRESHOLD_ small in the child's environment so freed tensors return to the OS at once.
    """
    import torch

    from lowvram.device import get_backend
    from lowvram.offload.block_swap import choose_swapped_blocks
    from lowvram.offload.disk_tier import apply_staged_block_swap

    torch.set_num_threads(1)
    path = Path(folder) / "weights.safetensors"
    if not path.exists():
        write_checkpoint(path, layers, dim, hidden)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(3))
    sim = get_backend("sim", h2d_gbps=h2d_gbps, tflops=tflops, disk_gbps=disk_gbps)
    # One step of a one-block model first: lazy imports, autograd's threads and kernel workspaces belong to the
    # process baseline, not to a tier.
    warm = build(1, dim, hidden, materialize=True)
    train_steps(warm, get_backend("sim"), x, 2)
    del warm
    model = build(layers, dim, hidden, materialize=False)
    baseline = rss_anon_bytes()
    block_bytes = 2 * dim * hidden * 4
    swapped = choose_swapped_blocks(layers, blocks_to_swap)
    on_disk = {swapped[i] for i in choose_swapped_blocks(len(swapped), blocks_on_disk)}
    t0 = time.perf_counter()
    with AnonPeak() as load_peak:
        for i in range(layers):  # the loader: every weight the disk tier does not read from the checkpoint
            if i in on_disk:
                continue
            for key, value in block_weights(i, dim, hidden).items():
                owner, _, name = key.rpartition(".")
                model.get_submodule(owner)._parameters[name] = nn.Parameter(value, requires_grad=False)
        swap = None
        if blocks_to_swap:
            swap = apply_staged_block_swap(
                model, sim, blocks_to_swap=blocks_to_swap, blocks_on_disk=blocks_on_disk, tier=tier, checkpoint=path
            )
        sim.place_module(model)
    load_s = time.perf_counter() - t0
    after_load = rss_anon_bytes()
    with AnonPeak() as train_peak:
        if warm_steps:  # the staged tiers learn their read-ahead order in the first steps
            train_steps(model, sim, x, warm_steps)
        sim.reset_counters()
        t0 = time.perf_counter()
        grads = train_steps(model, sim, x, steps)
        wall_s = time.perf_counter() - t0
    if grads_out is not None:
        from safetensors.torch import save_file

        save_file(grads, grads_out)
    acts = activation_bytes(layers, dim, hidden, tokens)
    out = {
        "tier": tier,
        "blocks_to_swap": blocks_to_swap,
        "blocks_on_disk": blocks_on_disk,
        "block_bytes": block_bytes,
        "file_bytes": path.stat().st_size,
        "baseline_anon_bytes": baseline,
        "load_peak_anon_bytes": load_peak.peak - baseline,
        "after_load_anon_bytes": after_load - baseline,
        "train_peak_anon_bytes": train_peak.peak - baseline,
        "predicted_train_anon_bytes": predicted_anon_bytes(
            tier, layers, blocks_to_swap, blocks_on_disk, block_bytes, activations=acts
        ),
        "sim_step_s": sim.stats().compute_s / steps,
        "wall_step_s": wall_s / steps,
        "load_s": load_s,
        "staged_misses": getattr(swap, "staged_misses", 0),
        "staged_reads": getattr(swap, "staged_reads", 0),
    }
    if swap is not None and hasattr(swap, "close"):
        swap.close()
    return out


def measure_in_subprocess(folder: str, timeout: float = 600, fn: str = "measure_run", **kwargs) -> dict:
    """`measure_run` (or `fn`) in a fresh Python process (its own RSS), with glibc returning freed memory at once."""
    import subprocess
    import sys

    code = (
        f"import json, sys; from lowvram.offload.lowram_harness import {fn}; "
        f"print(json.dumps({fn}({folder!r}, **json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[2])  # this checkout's lowvram, not whichever one is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "measure_run failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# The text encoder streamed from the disk tier while captions are cached (offload/text_disk_tier.py)


def gemma_config(layers: int = 12, hidden: int = 512, intermediate: int = 2048) -> dict:
    """A Gemma3 config (the tiny family's, widened) whose decoder layers dominate its weights."""
    from lowvram.models.ltx2 import tiny_configs

    base = tiny_configs()["text_encoder"]
    wide = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}
    text = {**base["text_config"], **wide, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128}
    return {**base, "text_config": text}


def write_gemma(folder: Path, config: dict, seed: int = 0) -> Path:
    """The Gemma3 of `config` saved as transformers writes it (safetensors, bf16: half the file)."""
    from lowvram.models.ltx2 import build_text_encoder

    with torch.device("meta"):
        model = build_text_encoder(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # random weights, without transformers' slow init
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def predicted_text_anon_bytes(config: dict, precision: str, tokens: int, on_disk: bool = True) -> int:
    """The planner's text-cache phase for this Gemma on the simulated device (device memory is host RAM too): its
    host components past the process, plus its device components past the reserve (plan/budget.py)."""
    from lowvram.models.ltx2 import tiny_configs
    from lowvram.plan.budget import Measurements, Settings, TextLayers, WeightGroup, text_disk_tier_bytes
    from lowvram.plan.measure import ModelConfigs, measure_text_encode, text_encoder_layer_weights
    from lowvram.plan.measure import text_encoder_weights as te_weights

    configs = ModelConfigs("lowram-gemma", {}, config, tiny_configs()["connectors"], {}, {})
    te = WeightGroup(**te_weights(configs))
    layers = text_encoder_layer_weights(configs)
    m = Measurements.__new__(Measurements)  # only the text encoder's fields are read
    object.__setattr__(m, "text_encoder", te)
    object.__setattr__(m, "connectors", WeightGroup({}, 0, 0))
    object.__setattr__(m, "text_layers", TextLayers(layers["layers"], WeightGroup(**layers["all"]),
                                                    WeightGroup(**layers["largest"])))  # fmt: skip
    s = Settings(text_encoder_precision=precision, text_encoder_on_disk=on_disk)
    device, ram, _ = text_disk_tier_bytes(m, s, "fp32")
    staging = 2 * 2 * te.largest_param  # budget(): the loader's largest tensor, read and converted
    acts = measure_text_encode(configs, tokens, compute_dtype="fp32")["gemma_peak_bytes"]
    return sum(ram.values()) + staging + sum(device.values()) + acts


def measure_text_run(folder: str, *, on_disk: bool, precision: str = "int8-quanto", tokens: int = 32,
                     out: str | None = None) -> dict:  # fmt: skip
    """Load the Gemma in `folder`/gemma (quantized while read) and encode one batch twice on the simulated device,
    its decoder layers streamed from the disk tier or all in RAM; anonymous RSS over the process baseline. Run it in
    a fresh process (`measure_in_subprocess(..., fn="measure_text_run")`)."""
    from lowvram.device import get_backend
    from lowvram.models.ltx2.checkpoint import load_text_encoder_quantized
    from lowvram.offload.text_disk_tier import TextDiskTier

    torch.set_num_threads(1)
    gemma = Path(folder) / "gemma"
    ids = torch.randint(3, 256, (2, tokens), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, : tokens // 4] = 0

    def encode(te) -> torch.Tensor:
        return torch.stack(te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, -1)

    warm, _ = load_text_encoder_quantized(gemma, precision, dtype=torch.float32)  # imports, kernels: the baseline
    encode(warm)
    del warm
    sim = get_backend("sim", disk_gbps=3.5)
    baseline = rss_anon_bytes()
    tier = TextDiskTier(Path(folder) / f"disk-{os.getpid()}") if on_disk else None
    with AnonPeak() as load_peak:
        te, _ = load_text_encoder_quantized(gemma, precision, dtype=torch.float32,
                                            progress_for=tier.progress_for if tier else None)  # fmt: skip
        if tier is not None:
            tier.apply(te, sim)
        sim.place_module(te)
    with AnonPeak() as encode_peak:
        first = encode(te)
        second = encode(te)
    result = {
        "peak_anon_bytes": max(load_peak.peak, encode_peak.peak) - baseline,
        "load_peak_anon_bytes": load_peak.peak - baseline,
        "encode_peak_anon_bytes": encode_peak.peak - baseline,
        "second_equals_first": bool(torch.equal(first, second)),
        "staged_misses": tier.swap.staged_misses if tier else 0,
        "staged_reads": tier.swap.staged_reads if tier else 0,
    }
    if tier is not None:
        tier.release()
        result["disk_tier_files_left"] = len(list(tier.folder.iterdir()))
    if out is not None:
        from safetensors.torch import save_file

        save_file({"hidden_states": second.contiguous()}, out)
    return result
