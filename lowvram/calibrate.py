"""`lowvram probe --calibrate`: the user's GPU measures itself, so the planner's step times rest on measured throughput.

bf16 matmul TFLOP/s at the LTX-2 block's GEMM shapes, attention at the run's token count, host-to-device GB/s
(pinned and pageable) and one real-width LTX-2 block's forward+backward with LoRA at the run's shape, on random
weights (nothing is downloaded). Everything goes through the device seam, so the simulated accelerator runs the same
code at tiny widths (tests). It changes no device setting and loads no checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import asdict, dataclass

import torch

from lowvram.device import Backend
from lowvram.profiles import HardwareProfile

# The whole calibration must fit in a minute on a GPU; a section that would start past it is skipped with a note.
DEFAULT_BUDGET_S = 60.0
LINK_BYTES = 256 * 2**20  # host-to-device copy size on a GPU (what `lowvram probe` times)
SIM_LINK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Calibration:
    """What one calibration measured. Rates in 10^12 FLOP/s and GB/s; None: not measured (see `notes`)."""

    device: str
    shape: str  # the run shape the block and attention were measured at
    matmul_tflops: float | None
    attention_tflops: float | None
    h2d_pinned_gbps: float | None
    h2d_pageable_gbps: float | None
    block_seconds: float | None  # one block's forward + backward (+ checkpoint recompute) at the run's shape
    block_tflop: float | None  # FLOPs of that, counted as the planner counts them (10^12)
    train_tflops: float | None  # block_tflop / block_seconds: what step times use
    seconds: float  # the calibration's own wall time
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def _bf16_or_fp32(backend: Backend) -> torch.dtype:
    # The simulated device times FLOPs, not kernels: fp32 keeps its CPU matmuls exact and fast.
    return torch.float32 if backend.name == "sim" else torch.bfloat16


def _timed(backend: Backend, fn, repeats: int) -> float:
    """Best seconds of `repeats` calls of `fn` after one warm-up, on the backend's clock."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = backend.clock_s()
        fn()
        best = min(best, backend.clock_s() - start)
    return best


def _attention_kind(backend: Backend):
    """The SDPA kernels a step uses: flash / memory-efficient on a GPU. On the simulated device the math kernel, whose
    matmuls its clock times (it does not time the CPU flash kernel), so time and FLOPs describe the same ops."""
    from lowvram.fakemem import attention_backend

    return attention_backend("math" if backend.name == "sim" else "flash")


def gemm_shapes(transformer_config: dict, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of a video block's Linears: q/k/v/out (dim x dim) and the feed-forward (dim x 4dim, 4dim x dim)."""
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return [(tokens, dim, dim), (tokens, dim, 4 * dim), (tokens, 4 * dim, dim)]


def measure_matmul_tflops(backend: Backend, shapes, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP-weighted matmul rate over `shapes` (10^12 FLOP/s)."""
    flops = seconds = 0.0
    for m, k, n in shapes:
        a = backend.to_device(torch.randn(m, k, dtype=dtype))
        b = backend.to_device(torch.randn(k, n, dtype=dtype))
        with backend.session():
            seconds += _timed(backend, lambda a=a, b=b: torch.matmul(a, b), repeats)
        flops += 2.0 * m * k * n
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def measure_attention_tflops(
    backend: Backend, *, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, repeats: int = 3
) -> float:
    """Self-attention (SDPA) forward rate at the run's video token count (10^12 FLOP/s, 4·B·H·S²·D per call)."""
    q, k, v = (backend.to_device(torch.randn(batch, heads, tokens, head_dim, dtype=dtype)) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with _attention_kind(backend), backend.session():
        seconds = _timed(backend, lambda: sdpa(q, k, v), repeats)
    flops = 4.0 * batch * heads * tokens * tokens * head_dim
    return flops / seconds / 1e12 if seconds > 0 else float("nan")


def random_lora_transformer(
    config: dict,
    *,
    num_layers: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device | str,
    precision: str = "bf16",
    seed: int = 0,
) -> torch.nn.Module:
    """The real LTX-2 transformer class at `config`'s width with random weights, built on meta and materialised
    straight on `device` (no host copy of the weights), optionally quantized, with LoRA on the default targets.

    Weights ~ N(0, 0.02), biases 0, norm scales 1; LoRA B random (so every LoRA weight gets a gradient).
    """
    from lowvram.method.lora import inject_lora
    from lowvram.models.ltx2 import build_component

    with torch.device("meta"):
        transformer = build_component("transformer", {**config, "num_layers": num_layers})
    transformer = transformer.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    if precision not in ("bf16", "fp32"):
        from lowvram.quant.backends import quantize_model
        from lowvram.quant.exclude import LTX2_TRANSFORMER_EXCLUDE

        # Each weight is quantized whole where it lives: row slicing stages the result in host memory, which is for
        # loading checkpoints into RAM, not for weights already on the device.
        quantize_model(transformer, precision, LTX2_TRANSFORMER_EXCLUDE, chunk_bytes=2**62)
    inject_lora(transformer, rank=rank)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(device=device, dtype=dtype)
                if ".lora_B." in name:
                    p.normal_(0.0, 0.02, generator=g)
    return transformer


def batch_for(transformer: torch.nn.Module, cfg, dtype: torch.dtype):
    """The run's token counts as a batch of random inputs (host tensors; `lora_step` moves them)."""
    from lowvram.offload.harness import plan_batch

    batch = plan_batch(transformer, cfg)
    if dtype == torch.float32:
        return batch
    fields = {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "sigma" else v
        for k, v in batch.__dict__.items()
    }
    return type(batch)(**fields)


def _step_time_and_flops(backend: Backend, cfg, config: dict, num_layers: int, dtype, repeats: int):
    """(seconds, FLOPs) of one checkpointed forward + backward of a `num_layers`-block model at the run's shape."""
    from lowvram.fakemem import LiveBytes
    from lowvram.offload.harness import lora_step, zero_grads

    device = "cpu" if backend.name == "sim" else backend.device
    transformer = random_lora_transformer(config, num_layers=num_layers, rank=cfg.lora.rank, dtype=dtype, device=device)
    transformer.enable_gradient_checkpointing()  # as training runs it: the backward holds a recompute
    backend.place_module(transformer)
    batch = batch_for(transformer, cfg, dtype)

    def step():
        zero_grads(transformer)
        lora_step(transformer, batch, backend)

    with _attention_kind(backend), backend.session():
        seconds = _timed(backend, step, repeats)
        zero_grads(transformer)
        counter = LiveBytes()  # the planner's FLOP counter, so the rate divides like with like
        with counter:
            lora_step(transformer, batch, backend)
    flops = sum(counter.flops.values())
    transformer = batch = None  # freed before the next model is built (the closure holds them otherwise)
    backend.empty_cache()
    return seconds, flops


def measure_block(backend: Backend, cfg, config: dict, dtype, repeats: int = 2) -> tuple[float, float]:
    """(seconds, FLOPs) of one block: a two-block model's step less a one-block model's (the rest cancels)."""
    t1, f1 = _step_time_and_flops(backend, cfg, config, 1, dtype, repeats)
    t2, f2 = _step_time_and_flops(backend, cfg, config, 2, dtype, repeats)
    return max(t2 - t1, 0.0), float(f2 - f1)


def calibrate(
    backend: Backend, cfg, *, budget_s: float = DEFAULT_BUDGET_S, progress=None, repeats: int = 2
) -> Calibration:
    """Measure this device for the run `cfg` (its shape, LoRA rank, model family's widths). `progress(str)` is told
    each section as it starts. Sections that would start after `budget_s` are skipped and noted. Each timing is the
    best of `repeats` after a warm-up."""
    from lowvram.hardware import measure_h2d_gbps
    from lowvram.plan.measure import model_configs
    from lowvram.plan.plan import run_shape

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    notes: list[str] = []
    configs = model_configs(cfg.model.family)
    config = dict(configs.transformer)
    shape = run_shape(cfg, configs)
    width, height = cfg.data.width_height
    label = f"{width}x{height}x{cfg.data.frames} batch {shape.batch}, LoRA r{cfg.lora.rank}"
    if cfg.model.family == "tiny":
        label += " (tiny widths)"
    dtype = _bf16_or_fp32(backend)
    tokens = shape.batch * shape.video_tokens
    results: dict[str, float | None] = dict.fromkeys(
        ("matmul", "attention", "pinned", "pageable", "block_s", "block_f"), None
    )

    def section(key: str, what: str, fn) -> None:
        if time.perf_counter() - start > budget_s:
            notes.append(f"{what}: skipped (calibration budget of {budget_s:g} s spent)")
            return
        say(what)
        results[key] = fn()

    link = SIM_LINK_BYTES if backend.name == "sim" else LINK_BYTES
    section("matmul", "bf16 matmul at the block's GEMM shapes",
            lambda: measure_matmul_tflops(backend, gemm_shapes(config, tokens), dtype, repeats))
    section("attention", f"attention at {shape.video_tokens} video tokens", lambda: measure_attention_tflops(
        backend, batch=shape.batch, heads=config["num_attention_heads"], tokens=shape.video_tokens,
        head_dim=config["attention_head_dim"], dtype=dtype, repeats=repeats))
    section("pinned", "host->device copies, pinned", lambda: measure_h2d_gbps(backend, link, pinned=True))
    section("pageable", "host->device copies, pageable", lambda: measure_h2d_gbps(backend, link, pinned=False))

    def block() -> float:
        seconds, flops = measure_block(backend, cfg, config, dtype, repeats)
        results["block_f"] = flops
        return seconds

    section("block_s", "one LTX-2 block forward+backward with LoRA (random weights)", block)
    block_s, block_f = results["block_s"], results["block_f"]
    train = block_f / block_s / 1e12 if block_s and block_f else None
    if results["block_s"] is not None and train is None:
        notes.append("the block's time did not resolve on this clock: no compute rate measured")
    return Calibration(
        device=_device_name(backend),
        shape=label,
        matmul_tflops=_finite(results["matmul"]),
        attention_tflops=_finite(results["attention"]),
        h2d_pinned_gbps=_finite(results["pinned"]),
        h2d_pageable_gbps=_finite(results["pageable"]),
        block_seconds=block_s,
        block_tflop=block_f / 1e12 if block_f else None,
        train_tflops=train,
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
    )


def _finite(x: float | None) -> float | None:
    return x if x is not None and x == x and x not in (float("inf"), float("-inf")) and x > 0 else None


def _device_name(backend: Backend) -> str:
    if backend.name == "sim":
        return f"simulated accelerator ({backend.tflops:g} TFLOP/s, {backend.h2d_gbps:g} GB/s)"
    from lowvram import device

    with contextlib.suppress(Exception):
        return device.accelerator_name(backend.device.index or 0)
    return backend.name


def calibrated_profile(base: HardwareProfile, cal: Calibration) -> HardwareProfile:
    """`base` with every figure the calibration measured put in, and `measured` naming them."""
    update: dict = {}
    pairs = {
        "bf16_tflops": cal.matmul_tflops,
        "attention_tflops": cal.attention_tflops,
        "h2d_pinned_gbps": cal.h2d_pinned_gbps,
        "h2d_pageable_gbps": cal.h2d_pageable_gbps,
        "train_tflops": cal.train_tflops,
    }
    for key, value in pairs.items():
        if value is not None:
            update[key] = round(value, 3)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    update["calibration"] = f"{cal.device}, {cal.shape}, {stamp}"
    update["measured"] = tuple(dict.fromkeys([*base.measured, *(k for k in pairs if k in update)]))
    if not base.name.endswith("-calibrated"):
        update["name"] = f"{base.name}-calibrated"
    return base.model_copy(update=update)
