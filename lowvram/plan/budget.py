"""Peak bytes per phase x device x component, and predicted seconds per step, for one set of memory settings.

Pure arithmetic on measurements (measure.py) and a hardware profile: no model is built here, so evaluating
thousands of candidate settings is instant. It does not choose settings (plan.py does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lowvram.plan import host
from lowvram.profiles import HardwareProfile
from lowvram.quant.layout import quantized_linear_bytes, quantized_weight_bytes

GB = 10**9
GIB = 2**30

# Host memory of the training process before any weight: CUDA/HIP runtime, torch, diffusers, transformers and the
# data pipeline. An idle CUDA torch process with these imported sits at 2-3 GiB RSS (nvidia/pytorch forum reports);
# the pure-Python part measured here is ~0.3-1 GiB. An assumption, stated in the plan output.
HOST_PROCESS_BYTES = 3 * GIB
# Share of the profile's bf16 TFLOP/s a LoRA training step reaches (large bf16 matmuls at 2-5k tokens). An
# assumption (typical 35-50% MFU of bf16 transformer training); the README compares it with field reports.
DEFAULT_EFFICIENCY = 0.4
# Cached latents and text embeddings are stored in bf16.
CACHE_ITEM_BYTES = 2

OFFLOAD_KINDS = ("none", "block_swap", "ramtorch", "group")


@dataclass(frozen=True)
class Settings:
    """One candidate for every memory decision. `dotted()` maps it to the run config's keys."""

    precision: str = "bf16"
    text_encoder_precision: str = "bf16"
    offload: str = "none"  # none | block_swap | ramtorch | group
    blocks_to_swap: int = 0
    swap_tier: str = "pinned"  # where swapped blocks' masters live in RAM: pinned | pageable (plan/host.py)
    blocks_on_disk: int = 0  # of the swapped blocks, how many are read from the disk tier's file instead
    ramtorch_share: float = 0.0  # share of the transformer blocks whose Linear weights are streamed
    group_blocks_per_group: int = 1
    group_type: str = "block_level"  # block_level | leaf_level
    # The offload code refuses diffusers' stream prefetch in training (checkpoint recompute breaks its order).
    group_use_stream: bool = False
    gradient_checkpointing: bool = True
    activation_offload: bool = False
    offload_during_startup: bool = True
    ramtorch_text_encoder: bool = False
    text_encoder_on_disk: bool = False  # Gemma's decoder layers streamed from the disk tier while caching text
    vae_tiling: bool = False
    vae_slicing: bool = False
    vae_patch_conv: bool = False
    vae_temporal_roll: bool = False
    vae_batch_size: int = 1
    optimizer: str = "adamw"

    def dotted(self) -> dict[str, Any]:
        ramtorch: bool | float = False
        if self.offload == "ramtorch":
            ramtorch = True if self.ramtorch_share >= 1.0 else round(self.ramtorch_share, 4)
        return {
            "model.precision": self.precision,
            "model.text_encoder_precision": self.text_encoder_precision,
            "memory.ramtorch": ramtorch,
            "memory.ramtorch_text_encoder": self.ramtorch_text_encoder,
            "memory.text_encoder_on_disk": self.text_encoder_on_disk,
            "memory.blocks_to_swap": self.blocks_to_swap if self.offload == "block_swap" else 0,
            "memory.swap_tier": self.swap_tier if self.offload == "block_swap" else "pinned",
            "memory.blocks_on_disk": self.blocks_on_disk if self.offload == "block_swap" else 0,
            "memory.group_offload": self.offload == "group",
            "memory.group_offload_type": self.group_type,
            "memory.group_offload_blocks_per_group": self.group_blocks_per_group,
            "memory.group_offload_use_stream": self.group_use_stream if self.offload == "group" else False,
            "memory.gradient_checkpointing": self.gradient_checkpointing,
            "memory.activation_offload": self.activation_offload,
            "memory.offload_during_startup": self.offload_during_startup,
            "memory.vae_tiling": self.vae_tiling,
            "memory.vae_slicing": self.vae_slicing,
            "memory.vae_patch_conv": self.vae_patch_conv,
            "memory.vae_temporal_roll": self.vae_temporal_roll,
            "memory.vae_batch_size": self.vae_batch_size,
            "optim.optimizer": self.optimizer,
        }

    def describe(self) -> str:
        parts = [self.precision]
        if self.offload == "block_swap":
            tiers = [] if self.swap_tier == "pinned" else ["pageable masters"]
            if self.blocks_on_disk:
                tiers.append(f"{self.blocks_on_disk} from disk")
            parts.append(f"block swap {self.blocks_to_swap}" + (f" ({', '.join(tiers)})" if tiers else ""))
        elif self.offload == "ramtorch":
            parts.append(f"stream {self.ramtorch_share:.0%} of block Linears")
        elif self.offload == "group":
            kind = f"x{self.group_blocks_per_group}" if self.group_type == "block_level" else "leaf level"
            parts.append(f"group offload {kind}" + (" +stream" if self.group_use_stream else ""))
        else:
            parts.append("no offload")
        parts.append("checkpointing" if self.gradient_checkpointing else "no checkpointing")
        if self.activation_offload:
            parts.append("activation offload")
        return ", ".join(parts)


@dataclass(frozen=True)
class PhaseBudget:
    """Peak bytes of one phase, per device, per component (the peaks of components are summed: conservative)."""

    name: str
    vram: dict[str, int]
    ram: dict[str, int]
    disk_bytes_per_item: int | None = None
    disk: dict[str, int] = field(default_factory=dict)  # weights kept in files (never counted against RAM)

    @property
    def vram_peak_bytes(self) -> int:
        return sum(self.vram.values())

    @property
    def ram_peak_bytes(self) -> int:
        return sum(self.ram.values())

    def host_demand_bytes(self, unified: bool) -> int:
        """Host RAM the phase needs. Where device memory is host memory (`unified`, the cpu profile) the device
        bytes come out of the same RAM, counted once: the device-side reserve is the process the host side holds."""
        if not unified:
            return self.ram_peak_bytes
        return self.ram_peak_bytes + self.vram_peak_bytes - self.vram.get("reserve", 0)


@dataclass(frozen=True)
class StepTime:
    seconds: float
    compute_seconds: float
    transfer_seconds: float  # copies per step, before overlap
    dequant_seconds: float
    streamed_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def offload_overhead(self) -> float:
        base = self.compute_seconds + self.dequant_seconds
        return self.seconds / base - 1.0 if base > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Measurements, as the budget sees them


class LazyMap(Mapping):
    """A mapping whose values are measured on first access (a plan only pays for the measurements it reads)."""

    def __init__(self, keys: tuple, compute: Callable[[Any], Any]):
        self._keys = keys
        self._compute = compute
        self._values: dict = {}

    def __getitem__(self, key):
        # Iteration lists the keys the chooser considers; a lookup measures any key `compute` accepts (a config's
        # own combination of options, say).
        if key not in self._values:
            self._values[key] = self._compute(key)
        return self._values[key]

    def __iter__(self) -> Iterator:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _itemsize(dtype: str) -> int:
    return {"bf16": 2, "fp32": 4}[dtype]


def _parse_shape(key: str) -> tuple[int, int]:
    out, inp = key.split("x")
    return int(out), int(inp)


@dataclass(frozen=True)
class WeightGroup:
    """Quantizable Linear weights (shape -> count) plus other parameters kept in the compute dtype."""

    linear_shapes: dict[str, int]
    other_params: int
    largest_param: int = 0  # elements of the largest single tensor (a Gemma embedding is 1B)

    def linear_bytes(self, precision: str, dtype: str) -> int:
        """Quantized weights with their scales and per-module buffers; biases are counted with the other params."""
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        total = 0
        for key, n in self.linear_shapes.items():
            out_features, in_features = _parse_shape(key)
            total += n * quantized_linear_bytes(
                in_features, out_features, bias=False, dtype=torch_dtype, precision=precision
            )
        return total

    def bytes(self, precision: str, dtype: str) -> int:
        return self.linear_bytes(precision, dtype) + self.other_params * _itemsize(dtype)

    def largest_linear_bytes(self, dtype: str) -> int:
        return max((math.prod(_parse_shape(k)) * _itemsize(dtype) for k in self.linear_shapes), default=0)

    @property
    def params(self) -> int:
        return self.other_params + sum(math.prod(_parse_shape(k)) * n for k, n in self.linear_shapes.items())


@dataclass(frozen=True)
class StepMeasure:
    """One measured transformer step (see measure.measure_transformer_step), composed to any depth."""

    marks: dict[str, int]
    peaks: dict[str, int]
    flops: dict[str, int]
    lora_params_per_block: int

    @property
    def kept_per_block_bytes(self) -> int:
        return self.marks["block_fwd_end"] - self.marks["block_fwd_start"]

    @property
    def recomputed_per_block_bytes(self) -> int:
        """What one block keeps for backward without checkpointing, seen in a checkpointed run's recompute."""
        return self.marks.get("recompute_end", 0) - self.marks.get("recompute_start", 0)

    def activation_points(
        self,
        num_layers: int,
        lora_grad_per_block_bytes: int,
        *,
        offloaded_kept: bool = False,
        first_block_bwd_bytes: int | None = None,
    ) -> dict[str, int]:
        """Activations + LoRA grads for `num_layers` identical blocks at each point of the step where one can peak:
        `head`, `block_fwd`, `tail` (forward, loss and the output layers' backward), `block_bwd`, `head_bwd`.

        Every block's kept activations stay alive from its forward to its backward, so each later point of the
        step sees (N-1) more blocks' worth than the one-block run. LoRA grads accumulate as backward proceeds: the
        backward of block j runs beside the kept bytes of the j blocks before it and the LoRA grads of the N-1-j
        after it (linear in j, so the ends are the worst). With `offloaded_kept`, kept block inputs live on the
        host except the two in flight. Points are separate because group offload holds different weights at each.
        `first_block_bwd_bytes`: block 0's backward peak measured as a first block (inputs need no grad), which
        backs up last, beside every other block's LoRA grads; the measured block then stands for blocks 1..N-1.
        """
        d = self.kept_per_block_bytes
        waiting = (min(2, num_layers) - 1 if offloaded_kept else num_layers - 1) * d
        p = self.peaks
        drop = self.marks["block_bwd_end"] - self.marks["block_bwd_start"]  # per block backward, usually < 0
        grads = (num_layers - 1) * lora_grad_per_block_bytes
        last = p["block_bwd"] + grads
        if first_block_bwd_bytes is not None:
            last = first_block_bwd_bytes + grads
            if num_layers > 1:  # block 1: one block waiting, N-2 blocks' grads
                last = max(last, p["block_bwd"] + min(waiting, d) + grads - lora_grad_per_block_bytes)
        return {
            "head": p.get("head", 0),
            "block_fwd": p["block_fwd"] + waiting,
            "tail": p.get("tail", 0) + waiting,
            "block_bwd": max(
                p["block_bwd"] + waiting,  # the first block backward: every other block waiting, no grads yet
                last,  # the last one (block 0): the other blocks' LoRA grads all exist
                # the first block backward after N-1 others (only higher when a block's backward grows memory)
                p["block_bwd"] + waiting + (num_layers - 1) * drop if not offloaded_kept else 0,
            ),
            "head_bwd": p.get("head_bwd", 0) + grads,
        }

    def activation_peak_bytes(
        self, num_layers: int, lora_grad_per_block_bytes: int, *, offloaded_kept: bool = False
    ) -> int:
        """Peak of activations + LoRA grads for `num_layers` identical blocks (see activation_points)."""
        return max(
            self.activation_points(num_layers, lora_grad_per_block_bytes, offloaded_kept=offloaded_kept).values()
        )


def mixed_activation_points(
    normal: StepMeasure,
    blocks: list[StepMeasure],
    lora_grad_per_block_bytes: int,
    *,
    offloaded_kept: bool = False,
) -> dict[str, int]:
    """`StepMeasure.activation_points` for blocks that differ (TREAD: routed blocks see fewer tokens).

    `blocks[i]` is block i's measurement, all taken at the run's shapes (so their head and tail agree; `normal` gives
    them). Block i's forward runs beside the kept bytes of the blocks before it; its backward beside those and, for
    each later block, what that block's backward left (its LoRA grads, or more when its backward grows memory). With
    identical blocks and no activation offload this equals `normal.activation_points` (tests/test_plan_tread.py);
    with activation offload it also sees block 1's backward beside block 0's fetched input and N-2 blocks' grads.
    """
    n = len(blocks)
    g = lora_grad_per_block_bytes
    kept = [b.kept_per_block_bytes for b in blocks]
    left = [
        g if offloaded_kept else max(g, d + b.marks["block_bwd_end"] - b.marks["block_bwd_start"])
        for d, b in zip(kept, blocks, strict=True)
    ]
    before = [0] * n  # kept bytes waiting while block i runs
    for i in range(1, n):
        before[i] = kept[i - 1] if offloaded_kept else before[i - 1] + kept[i - 1]
    after = [0] * n  # what the later blocks' backward left behind when block i's backward runs
    for i in range(n - 2, -1, -1):
        after[i] = after[i + 1] + left[i + 1]
    waiting_at_tail = sum(kept[-min(2, n) :]) if offloaded_kept else sum(kept)  # the last block's kept included
    last = blocks[-1]
    return {
        "head": normal.peaks.get("head", 0),
        "block_fwd": max(b.peaks["block_fwd"] + before[i] for i, b in enumerate(blocks)),
        "tail": last.peaks.get("tail", 0) - kept[-1] + waiting_at_tail,
        "block_bwd": max(b.peaks["block_bwd"] + before[i] + after[i] for i, b in enumerate(blocks)),
        "head_bwd": normal.peaks.get("head_bwd", 0) + (n - 1) * g,
    }


@dataclass(frozen=True)
class Tread:
    """TREAD routes over the blocks and the step measured with block 0 routed, by (selection ratio, checkpointing)."""

    routes: tuple[tuple[int, int, float], ...]  # (first block, last block, selection ratio), indices resolved
    step: Mapping[tuple[float, bool], StepMeasure]

    def ratio_of(self, block: int) -> float | None:
        return next((r for s, e, r in self.routes if s <= block <= e), None)

    def blocks(self, normal: StepMeasure, num_layers: int, checkpointing: bool) -> list[StepMeasure]:
        """Each block's measurement: the routed one inside a route, `normal` elsewhere."""
        out = []
        for i in range(num_layers):
            ratio = self.ratio_of(i)
            out.append(normal if ratio is None else self.step[(ratio, checkpointing)])
        return out

    def describe(self) -> str:
        return ", ".join(f"{r:.0%} of video tokens around blocks {s}..{e}" for s, e, r in self.routes)


@dataclass(frozen=True)
class Rollout:
    """Scheduled sampling's no-grad forwards before each training forward (method/modes/scheduled_sampling.py)."""

    peak_bytes: int  # one rollout forward: the step's inputs, the rolled-out latents, one no-grad forward
    forwards_per_step: float  # expected per micro-batch: steps x P(any sample of the batch is rolled out)
    steps: int


# The train phase's component for the rollout: only what its forward needs above the training step's own peak.
@dataclass(frozen=True)
class TextLayers:
    """The text encoder's decoder layers: how many, all of them together, and the largest (a ring slot's size)."""

    count: int
    all: WeightGroup
    largest: WeightGroup


ROLLOUT_LABEL = "scheduled sampling rollout (no-grad forward) above the step's peak"


@dataclass(frozen=True)
class Crepa:
    """CREPA's projection head (train phase) and DINOv2 (latent-cache phase); plan/modes.py measures them."""

    head_params: int
    head_peak_bytes: int  # the term's forward + backward: batch features on the device, head activations, grads
    head_flops: int
    feature_item_bytes: int  # one clip's cached DINOv2 features
    encoder_params: int
    encoder_peak_bytes: int  # DINOv2's no-grad forward over one clip's latent frames


CREPA_HEAD_LABEL = "CREPA head (weights + grads)"
CREPA_ACTS_LABEL = "CREPA term (features, head activations + grads)"


@dataclass(frozen=True)
class Measurements:
    """Everything the budget needs about the model at the run's shapes (all from measure.py)."""

    num_layers: int
    block: WeightGroup
    rest: WeightGroup
    text_encoder: WeightGroup
    connectors: WeightGroup
    video_vae_params: int
    audio_vae_params: int
    step: Mapping[bool, StepMeasure]  # by gradient checkpointing (measured on first use)
    text_encode_peak_bytes: int  # max(Gemma, connectors) activations for one caption
    connectors_peak_bytes: int  # the connectors' activations alone (a trainer that runs them every step pays it)
    audio_encode_peak_bytes: int
    video_input_bytes: int
    video_encode: Mapping[str, int]  # VAE option name -> activation peak (measured on first use)
    text_item_bytes: int
    latent_item_bytes: int
    batch_input_bytes: int  # latents + text of one training batch on the host
    attention: str  # flash | math
    # The checkpointed step with every frozen leaf computing from a fresh copy (leaf_level group offload), by
    # gradient checkpointing; measured on first use. None: not available (leaf_level then budgets as block_level).
    onload_step: Mapping[bool, StepMeasure] | None = None
    onload_first_block: Mapping[bool, StepMeasure] | None = None  # the same with block 0 as a first block
    nonleaf_params: int = 0  # parameters outside leaf modules, one block + outside the blocks
    tread: Tread | None = None  # TREAD routes (train.tread_routes) with their routed-block measurements
    model_version: str = "2.0"  # the LTX-2 release measured (lowvram.models.versions)
    rollout: Rollout | None = None  # scheduled sampling (scheduled_sampling.enabled)
    crepa: Crepa | None = None  # CREPA (crepa.enabled)
    text_layers: TextLayers | None = None  # the text encoder's decoder layers (memory.text_encoder_on_disk)

    def block_steps(self, checkpointing: bool) -> list[StepMeasure]:
        """Each block's measured step (they differ only under TREAD routes)."""
        normal = self.step[checkpointing]
        if self.tread is None:
            return [normal] * self.num_layers
        return self.tread.blocks(normal, self.num_layers, checkpointing)

    def kept_bytes(self, checkpointing: bool) -> int:
        """What all blocks keep from forward to backward."""
        return sum(b.kept_per_block_bytes for b in self.block_steps(checkpointing))

    def lora_params(self) -> int:
        return self.step[True].lora_params_per_block * self.num_layers


# --------------------------------------------------------------------------------------------------------------------
# The budget


def _crepa_cache_components(m: Measurements, s, dtype: str) -> dict[str, int]:
    """DINOv2 beside the VAEs in the latent-cache phase (CREPA): its weights, and its forward over the frames of
    one VAE batch of clips (the VAE's activations are freed by then; counted on top, an upper bound)."""
    if m.crepa is None:
        return {}
    return {
        "DINOv2 weights (CREPA)": m.crepa.encoder_params * _itemsize(dtype),
        "DINOv2 activations (CREPA)": m.crepa.encoder_peak_bytes * s.vae_batch_size,
    }


@dataclass(frozen=True)
class BudgetOptions:
    compute_dtype: str = "bf16"
    lora_dtype: str = "fp32"
    efficiency: float = DEFAULT_EFFICIENCY
    host_process_bytes: int = HOST_PROCESS_BYTES
    gpus: int = 1  # FSDP2 processes (one per GPU); budgets are per GPU, host RAM for all of them
    grad_accumulation_steps: int = 1


def optimizer_state_bytes(optimizer: str, params: int, param_dtype: str = "fp32") -> int:
    """Optimizer state for `params` trainable parameters stored in `param_dtype`.

    torch AdamW keeps two moments in the parameters' dtype; AdamWBF16 two bf16 moments; bitsandbytes AdamW8bit two
    uint8 moments plus one float32 absmax per 256-value block each (blockwise quantization) and two shared
    256-entry float32 code maps.
    """
    if optimizer == "adamw":
        return 2 * params * _itemsize(param_dtype)
    if optimizer == "adamw_bf16":
        return 2 * params * 2
    if optimizer == "adamw8bit":
        return 2 * (params + math.ceil(params / 256) * 4) + 2 * 256 * 4
    raise ValueError(f"unknown optimizer {optimizer!r}")


def vae_option_name(s: Settings) -> str:
    parts = [n for n in ("tiling", "slicing", "patch_conv", "temporal_roll") if getattr(s, f"vae_{n}")]
    return "+".join(parts) or "none"


def transformer_device_bytes(m: Measurements, s: Settings, dtype: str, gpus: int = 1) -> dict[str, int]:
    """Transformer weights on the device and the offload machinery's device buffers."""
    n = m.num_layers
    w_block = m.block.bytes(s.precision, dtype)
    lin_block = m.block.linear_bytes(s.precision, dtype)
    rest = m.rest.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
    out = {"transformer outside blocks": rest}
    if gpus > 1:
        # FSDP2 (train/distributed.py): each block is a shard unit, gathered whole for its forward and backward;
        # the next block's gather overlaps the current one. The root unit (outside the blocks) is gathered too.
        out[f"transformer blocks (1/{gpus} shard)"] = math.ceil(n * w_block / gpus)
        out["gathered blocks (current + prefetch)"] = 2 * w_block
        return out
    if s.offload == "block_swap":
        k = min(s.blocks_to_swap, n)
        slots = min(2, k)  # one block computing, the next loading; block_swap.py never allocates more than k
        out["transformer blocks (resident)"] = (n - k) * w_block
        out[f"block swap ring ({slots} slots)"] = slots * w_block
    elif s.offload == "ramtorch":
        streamed = round(s.ramtorch_share * n)
        out["transformer blocks (resident)"] = n * w_block - streamed * lin_block
        # one Linear in use + one prefetching, at the stored precision
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        largest = max(
            (quantized_weight_bytes(_parse_shape(k), torch_dtype, s.precision) for k in m.block.linear_shapes),
            default=0,
        )
        out["streaming buffers (2 Linears)"] = 2 * largest if streamed else 0
    elif s.offload == "group":
        # Everything frozen is offloaded, the layers outside the blocks too: what is onloaded depends on the point
        # of the step (group_offload_weights), so the budget adds it beside that point's activations.
        return {}
    else:
        out["transformer blocks"] = n * w_block
    return out


def saved_weight_copy_share(m: Measurements, s: Settings, dtype: str) -> float:
    """How much of a dense compute-dtype copy of each frozen block weight autograd holds for backward (0..1).

    Plain and quanto Linears save the resident weight itself (no bytes). torchao's int8 weight-only linear computes
    with `int_data.to(dtype)`, which autograd saves: a dense copy per Linear whose input needs grad (measured on the
    simulated device), except for streamed Linears (they save nothing). leaf_level group offload saves the
    onloaded copies, at the stored precision.
    """
    share = 0.0
    if s.precision == "int8-torchao":
        share = 1.0 - (s.ramtorch_share if s.offload == "ramtorch" else 0.0)
    if s.offload == "group" and s.group_type == "leaf_level":
        dense = m.block.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
        share = max(share, m.block.bytes(s.precision, dtype) / dense if dense else 1.0)
    return min(max(share, 0.0), 1.0)


def activation_points(m: Measurements, s: Settings, dtype: str, lora_grad_per_block_bytes: int) -> dict[str, int]:
    """Activations + LoRA grads (+ weight copies autograd saves) at each point of the step, for settings `s`.

    The copies come from the step measured with every frozen leaf computing from a fresh copy (with block 0 also
    measured as a first block, whose inputs need no grad); they are scaled by `saved_weight_copy_share`.
    """
    n = m.num_layers
    plain = m.step[s.gradient_checkpointing].activation_points(
        n, lora_grad_per_block_bytes, offloaded_kept=s.activation_offload
    )
    routed = plain
    if m.tread is not None:
        routed = mixed_activation_points(
            m.step[s.gradient_checkpointing],
            m.block_steps(s.gradient_checkpointing),
            lora_grad_per_block_bytes,
            offloaded_kept=s.activation_offload,
        )
    share = saved_weight_copy_share(m, s, dtype) if m.onload_step is not None else 0.0
    if share == 0.0:
        return routed
    first = m.onload_first_block[s.gradient_checkpointing] if m.onload_first_block is not None else None
    copies = m.onload_step[s.gradient_checkpointing].activation_points(
        n,
        lora_grad_per_block_bytes,
        offloaded_kept=s.activation_offload,
        first_block_bwd_bytes=first.peaks["block_bwd"] if first is not None else None,
    )
    # The saved weight copies do not depend on the token count: the unrouted difference is added to the routed plan.
    return {k: routed[k] + math.ceil(share * max(0, copies[k] - plain[k])) for k in plain}


def group_offload_peak(
    m: Measurements, s: Settings, dtype: str, lora_grad_per_block_bytes: int
) -> tuple[dict[str, int], int, str]:
    """Group offload's (onloaded weights by component, activations + LoRA grads, point) at its worst point.

    block_level (the adapter in offload/group.py, no stream): the outside layers form one group onloaded for the
    whole forward; a group of blocks is onloaded while its blocks run and stays bound until the next group onloads
    (in backward too: the checkpoint recompute onloads it). leaf_level: each frozen leaf is onloaded for its own
    forward and lives on only where autograd saved it (counted in `activation_points`); the non-leaf parameters
    (norms, modulation tables) are added whole.
    """
    n = m.num_layers
    points = activation_points(m, s, dtype, lora_grad_per_block_bytes)
    if s.group_type == "leaf_level" and m.onload_step is not None:
        point = max(points, key=points.get)
        weights = {"non-leaf weights (norms, tables)": m.nonleaf_params * _itemsize(dtype)}
        return weights, points[point], f"{point}, onloaded leaf weights included"
    outside = m.rest.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
    group = min(s.group_blocks_per_group, n) * m.block.bytes(s.precision, dtype)
    onloaded = {
        "head": {"outside layers (onloaded)": outside},
        "block_fwd": {"outside layers (onloaded)": outside, "block group (onloaded)": group},
        "tail": {"outside layers (onloaded)": outside},
        "block_bwd": {"block group (onloaded)": group},
        "head_bwd": {"block group (onloaded)": group},
    }
    point = max(points, key=lambda k: points[k] + sum(onloaded[k].values()))
    return onloaded[point], points[point], point


def transformer_host_bytes(m: Measurements, s: Settings, dtype: str) -> dict[str, int]:
    n = m.num_layers
    w_block = m.block.bytes(s.precision, dtype)
    if s.offload == "block_swap":
        return host.swap_host_components(s.swap_tier, min(s.blocks_to_swap, n), s.blocks_on_disk, w_block)[0]
    if s.offload == "ramtorch":
        return {"streamed Linears (pinned)": round(s.ramtorch_share * n) * m.block.linear_bytes(s.precision, dtype)}
    if s.offload == "group":
        kind = "pinned" if s.group_use_stream else "pageable"
        return {f"offloaded groups ({kind})": n * w_block}
    return {}


def text_encoder_bytes(m: Measurements, s: Settings, dtype: str) -> tuple[int, int]:
    """(device, host) bytes of Gemma3 + connectors during text caching."""
    te_linear = m.text_encoder.linear_bytes(s.text_encoder_precision, dtype)
    te_other = m.text_encoder.other_params * _itemsize(dtype)
    conn = m.connectors.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
    if s.ramtorch_text_encoder:
        largest = max(
            (
                quantized_weight_bytes(_parse_shape(k), torch.bfloat16, s.text_encoder_precision)
                for k in m.text_encoder.linear_shapes
            ),
            default=0,
        )
        return te_other + 2 * largest + conn, te_linear
    return te_linear + te_other + conn, 0


def text_disk_tier_bytes(
    m: Measurements, s: Settings, dtype: str
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(device, host RAM, disk) of Gemma3 + connectors with the decoder layers streamed from the disk tier."""
    if m.text_layers is None:
        raise ValueError("memory.text_encoder_on_disk needs the text encoder's layer measurements")
    p = s.text_encoder_precision
    whole = m.text_encoder.bytes(p, dtype)
    tl = m.text_layers
    device, ram, disk = host.text_disk_tier_components(
        tl.count, tl.all.bytes(p, dtype), tl.largest.bytes(p, dtype), whole, quantized=p not in ("bf16", "fp32")
    )
    device["connectors"] = m.connectors.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
    if p not in ("bf16", "fp32"):  # a weight-only quantized Linear dequantizes its weight for the matmul
        device["dequantized text encoder weight (transient)"] = m.text_encoder.largest_linear_bytes(dtype)
    return device, ram, disk


def vae_bytes(m: Measurements, dtype: str) -> int:
    return (m.video_vae_params + m.audio_vae_params) * _itemsize(dtype)


def budget(
    m: Measurements, s: Settings, profile: HardwareProfile, opts: BudgetOptions = BudgetOptions()
) -> dict[str, PhaseBudget]:
    """Peak bytes of the three phases for settings `s`."""
    dtype = opts.compute_dtype
    n = m.num_layers
    reserve = profile.reserve_bytes
    tx_device = transformer_device_bytes(m, s, dtype, opts.gpus)
    tx_host = transformer_host_bytes(m, s, dtype)
    te_device, te_host = text_encoder_bytes(m, s, dtype)
    vae_device = vae_bytes(m, dtype)
    process = {
        "process (runtime + libraries)" + (f" x {opts.gpus}" if opts.gpus > 1 else ""): opts.host_process_bytes
        * opts.gpus
    }
    # Weights stream from the safetensors file one tensor at a time (quantized on the fly): host RAM holds at most
    # the largest tensor twice (read + converted).
    staging = (
        2
        * 2
        * max(m.block.largest_param, m.rest.largest_param, m.text_encoder.largest_param, m.connectors.largest_param)
    )

    others_resident = {}
    if not s.offload_during_startup:
        others_resident = {
            "transformer (loaded at startup)": sum(tx_device.values()),
            "text encoder + connectors (loaded at startup)": te_device,
            "VAEs (loaded at startup)": vae_device,
        }

    def resident_except(name: str) -> dict[str, int]:
        return {k: v for k, v in others_resident.items() if not k.lower().startswith(name)}

    text_vram = {"text encoder + connectors": te_device}
    text_ram = {"streamed text encoder Linears (pinned)": te_host} if te_host else {}
    text_disk: dict[str, int] = {}
    if s.text_encoder_on_disk:
        text_vram, text_ram, text_disk = text_disk_tier_bytes(m, s, dtype)
    text = PhaseBudget(
        "text_cache",
        vram={
            "reserve": reserve,
            **text_vram,
            "text encode activations": m.text_encode_peak_bytes,
            **resident_except("text"),
        },
        ram={**process, "loading staging": staging, **text_ram},
        disk_bytes_per_item=m.text_item_bytes,
        disk=text_disk,
    )
    option = vae_option_name(s)
    # Slicing changes how many clips encode at once, not one clip's peak: the measurement is per clip.
    per_clip = "+".join(p for p in option.split("+") if p != "slicing") or "none"
    latent = PhaseBudget(
        "latent_cache",
        vram={
            "reserve": reserve,
            "VAEs": vae_device,
            "clip input": m.video_input_bytes * s.vae_batch_size,
            f"VAE encode activations ({option})": m.video_encode[per_clip] * s.vae_batch_size
            if not s.vae_slicing
            else m.video_encode[per_clip],
            "audio encode activations": m.audio_encode_peak_bytes,
            **resident_except("vae"),
            **_crepa_cache_components(m, s, dtype),
        },
        ram={**process, "loading staging": staging, "decoded clips": m.video_input_bytes * s.vae_batch_size * 2},
        disk_bytes_per_item=m.latent_item_bytes + (m.crepa.feature_item_bytes if m.crepa is not None else 0),
    )
    step = m.step[s.gradient_checkpointing]
    lora_params = step.lora_params_per_block * n
    lora_item = _itemsize(opts.lora_dtype)
    lora_grad_block = step.lora_params_per_block * lora_item
    acts = max(activation_points(m, s, dtype, lora_grad_block).values())
    acts_label = "activations + LoRA grads (peak)"
    if saved_weight_copy_share(m, s, dtype) > 0:
        acts_label = "activations + LoRA grads + weight copies saved for backward (peak)"
    if s.offload == "group" and opts.gpus == 1:
        onloaded, acts, point = group_offload_peak(m, s, dtype, lora_grad_block)
        tx_device = {**tx_device, **{f"{k} at the peak ({point})": v for k, v in onloaded.items()}}
    train_vram = {
        "reserve": reserve,
        **tx_device,
        "LoRA parameters": math.ceil(lora_params * lora_item / opts.gpus),
        "optimizer state": math.ceil(optimizer_state_bytes(s.optimizer, lora_params, opts.lora_dtype) / opts.gpus)
        + (optimizer_state_bytes(s.optimizer, m.crepa.head_params, opts.lora_dtype) if m.crepa is not None else 0),
        # LoRA grads are inside the measured peak: they accumulate during backward as activations are freed
        acts_label: acts,
        # with gradient accumulation the previous micro-batches' grads are alive through the next forward
        "LoRA grads held between micro-batches": lora_params * lora_item if opts.grad_accumulation_steps > 1 else 0,
        **({ROLLOUT_LABEL: max(0, m.rollout.peak_bytes - acts)} if m.rollout is not None else {}),
        # The head's weights and grads (the LoRA's dtype), and the term's own peak on top of the step's: it runs
        # between the forward and the backward, and the grad it sends to its block lives until that block's backward.
        **({CREPA_HEAD_LABEL: 2 * m.crepa.head_params * lora_item, CREPA_ACTS_LABEL: m.crepa.head_peak_bytes}
           if m.crepa is not None else {}),  # fmt: skip
        **resident_except("transformer"),
    }
    if s.precision not in ("bf16", "fp32"):
        # weight-only quantized Linears dequantize one weight to bf16 for the matmul (and its backward)
        train_vram["dequantized weight (transient)"] = m.block.largest_linear_bytes(dtype)
    train_ram = {**process, **tx_host, "training batch": m.batch_input_bytes}
    if opts.gpus > 1:
        # Each process loads the whole transformer on the host and FSDP2 moves its shard to its GPU; the processes
        # take turns (train/distributed.py `in_turn`), so the load peak holds one whole copy.
        whole = n * m.block.bytes(s.precision, dtype) + m.rest.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
        train_ram["whole transformer while loading (processes in turn)"] = whole
    if s.activation_offload:
        train_ram["offloaded activations (pinned)"] = m.kept_bytes(s.gradient_checkpointing)
    swapped = min(s.blocks_to_swap, n) if s.offload == "block_swap" else 0
    on_disk = min(s.blocks_on_disk, swapped)
    disk = host.swap_host_components(s.swap_tier, swapped, on_disk, m.block.bytes(s.precision, dtype))[1]
    train = PhaseBudget("train", vram=train_vram, ram=train_ram, disk=disk)
    whole = n * m.block.bytes(s.precision, dtype) + m.rest.bytes("bf16" if dtype == "bf16" else "fp32", dtype)
    load = PhaseBudget(
        "load",
        vram={"reserve": reserve},
        ram={
            **process,
            # the transformer's own largest tensor, read and converted (Gemma's embedding is not loaded here)
            "loading staging": 2 * 2 * max(m.block.largest_param, m.rest.largest_param),
            **host.load_ram_components(
                s.swap_tier,
                swapped,
                on_disk,
                m.block.bytes(s.precision, dtype),
                whole,
                quantized=s.precision not in ("bf16", "fp32"),
            ),
        },
        disk=disk,
    )
    export = PhaseBudget(
        "export",
        vram={"reserve": reserve},
        ram={**process, **host.export_ram_components(lora_params * lora_item)},
    )
    return {"text_cache": text, "latent_cache": latent, "load": load, "train": train, "export": export}


# --------------------------------------------------------------------------------------------------------------------
# Step time


def compute_flops_per_s(profile: HardwareProfile, efficiency: float = DEFAULT_EFFICIENCY) -> float:
    """FLOP/s a training step reaches: measured on one LTX-2 block (`lowvram probe --calibrate`) where the profile
    has it, else the profile's peak bf16 TFLOP/s x the assumed `efficiency` (an estimate)."""
    if profile.train_tflops:
        return profile.train_tflops * 1e12
    return profile.bf16_tflops * 1e12 * efficiency


def figure_basis(profile: HardwareProfile, efficiency: float = DEFAULT_EFFICIENCY) -> tuple[str, ...]:
    """One line per figure of the profile a plan rests on (compute, link, memory sizes): measured here or assumed."""
    if profile.train_tflops:
        compute = (
            f"compute {profile.train_tflops:g} TFLOP/s: measured (one LTX-2 block forward+backward with LoRA; "
            f"{profile.calibration or 'calibrated profile'})"
        )
    else:
        compute = (
            f"compute {profile.bf16_tflops * efficiency:g} TFLOP/s: assumed ({efficiency:.0%} of the profile's "
            f"{profile.bf16_tflops:g} bf16 TFLOP/s; `lowvram probe --calibrate --write FILE` measures it)"
        )
    def basis(*fields: str) -> str:
        return "measured" if all(profile.is_measured(f) for f in fields) else "assumed (spec sheet / public reports)"

    return (
        compute,
        f"host->device {profile.h2d_pinned_gbps:g} GB/s pinned: {basis('h2d_pinned_gbps')}",
        f"{profile.vram_bytes / GIB:.1f} GiB VRAM: {basis('vram_bytes')}; {profile.host_ram_bytes / GIB:.1f} GiB host "
        f"RAM: {basis('host_ram_bytes')}",
    )


def step_time(
    m: Measurements, s: Settings, profile: HardwareProfile, opts: BudgetOptions = BudgetOptions()
) -> StepTime:
    """FLOPs / (TFLOP/s x efficiency) plus what copies cannot hide; overlap per strategy.

    A copy overlaps compute only with asynchronous streams (profile.supports.streams) and a strategy that
    prefetches (block swap's ring, streamed Linears, group offload with use_stream). Then each streamed block costs
    max(compute, copy) per pass; otherwise compute + copy.
    """
    n = m.num_layers
    dtype = opts.compute_dtype
    flops_rate = compute_flops_per_s(profile, opts.efficiency)
    # FLOPs from the checkpointed run: its block backward section holds the recompute (one more forward)
    f = m.step[True].flops
    blocks = m.block_steps(True)
    fwds = [b.flops["block_fwd"] / flops_rate for b in blocks]
    bwds = [(b.flops["block_bwd"] - b.flops["block_fwd"]) / flops_rate for b in blocks]
    recomputes = fwds if s.gradient_checkpointing else [0.0] * n
    fwd, bwd, recompute = fwds[0], bwds[0], recomputes[0]  # block 0 (never routed in practice) for the notes
    outside = (f.get("head", 0) + f.get("tail", 0) + f.get("head_bwd", 0)) / flops_rate
    compute = outside + sum(fwds) + sum(bwds) + sum(recomputes)

    dequant = 0.0
    if s.precision not in ("bf16", "fp32"):
        # each use reads the quantized weight and writes + reads a bf16 copy: uses are forward, backward, recompute
        uses = 3 if s.gradient_checkpointing else 2
        per_block = m.block.linear_bytes(s.precision, dtype) + 2 * m.block.linear_bytes("bf16", dtype)
        dequant = n * uses * per_block / (profile.memory_bandwidth_gbps * GB)

    pinned = profile.h2d_pinned_gbps * GB
    w_block = m.block.bytes(s.precision, dtype)
    lin_block = m.block.linear_bytes(s.precision, dtype)
    kept_by_block = [b.kept_per_block_bytes if s.activation_offload else 0 for b in blocks]
    async_copies = profile.supports.streams
    notes: list[str] = []

    # (blocks streamed, bytes per forward pass, bytes per backward pass, bandwidth, can overlap)
    if s.offload == "block_swap":
        k = min(s.blocks_to_swap, n)
        bw = host.swap_bandwidth_bytes_per_s(s.swap_tier, profile.h2d_pinned_gbps, profile.disk_read_gbps)
        disk_bw = host.swap_bandwidth_bytes_per_s("disk", profile.h2d_pinned_gbps, profile.disk_read_gbps)
        streamed, fwd_bytes, bwd_bytes, overlap = k, w_block, w_block, async_copies
        on_disk = min(s.blocks_on_disk, k)
    elif s.offload == "ramtorch":
        k = round(s.ramtorch_share * n)
        # a streamed Linear is copied for forward, for the recompute and again for its backward
        streamed, fwd_bytes = k, lin_block
        bwd_bytes = lin_block * (2 if s.gradient_checkpointing else 1)
        bw, overlap = pinned, async_copies
    elif s.offload == "group":
        k = n
        streamed, fwd_bytes, bwd_bytes = n, w_block, w_block
        bw = pinned if s.group_use_stream else profile.h2d_pageable_gbps * GB
        overlap = async_copies and s.group_use_stream
    elif opts.gpus > 1:
        # FSDP2 all-gathers each block for its forward and again for its backward (the recompute runs inside that
        # gather) while prefetching the next; a ring all-gather brings (N-1)/N of the block over the link between
        # GPUs, taken to be as fast as the profile's pinned host->device copies (PCIe; NVLink is faster).
        part = w_block * (opts.gpus - 1) // opts.gpus
        streamed, fwd_bytes, bwd_bytes, bw, overlap = n, part, part, pinned, True
    else:
        streamed, fwd_bytes, bwd_bytes, bw, overlap = 0, 0, 0, pinned, async_copies
    if s.offload != "block_swap":
        disk_bw, on_disk = bw, 0

    def pass_time(compute_s: float, copy_bytes: int, overlapped: bool, rate: float = bw) -> float:
        copy_s = copy_bytes / rate
        return max(compute_s, copy_s) if overlapped else compute_s + copy_s

    total = outside + dequant
    streamed_bytes = 0
    transfer = 0.0
    no_grad_forward = f.get("head", 0) / flops_rate  # a rollout forward: head, blocks (streamed as in forward)
    for i in range(n):
        is_streamed = i < streamed
        fb = (fwd_bytes if is_streamed else 0) + kept_by_block[i]
        bb = (bwd_bytes if is_streamed else 0) + kept_by_block[i]
        overlapped = overlap if is_streamed else async_copies
        rate = disk_bw if i < on_disk else bw  # which swapped blocks are on disk does not change the sum
        total += pass_time(fwds[i], fb, overlapped, rate) + pass_time(bwds[i] + recomputes[i], bb, overlapped, rate)
        no_grad_forward += pass_time(fwds[i], fwd_bytes if is_streamed else 0, overlapped, rate)
        streamed_bytes += fb + bb
        transfer += (fb + bb) / rate
    if m.rollout is not None:
        k = m.rollout.forwards_per_step
        total += k * no_grad_forward
        compute += k * (f.get("head", 0) / flops_rate + sum(fwds))
        rollout_copies = k * fwd_bytes * streamed
        streamed_bytes += round(rollout_copies)
        # the disk tier's blocks come at the disk's rate in a rollout forward too
        transfer += k * fwd_bytes * (on_disk / disk_bw + (streamed - on_disk) / bw)
        notes.append(
            f"scheduled sampling: {k:.2f} no-grad forwards expected per step, {k * no_grad_forward:.2f} s of the step"
        )
    if m.crepa is not None:  # the head's forward + backward (the DINOv2 features are cached)
        total += m.crepa.head_flops / flops_rate
        compute += m.crepa.head_flops / flops_rate
    if streamed and overlap:
        notes.append(
            f"per streamed block: copy {fwd_bytes / bw * 1e3:.0f} ms vs compute {fwd * 1e3:.0f} ms forward, "
            f"copy {bwd_bytes / bw * 1e3:.0f} ms vs compute {(bwd + recompute) * 1e3:.0f} ms backward"
        )
        if on_disk:
            notes.append(
                f"per block from the disk tier ({on_disk}): read + copy {fwd_bytes / disk_bw * 1e3:.0f} ms forward, "
                f"{bwd_bytes / disk_bw * 1e3:.0f} ms backward (the disk reads {profile.disk_read_gbps:g} GB/s)"
            )
    return StepTime(total, compute, transfer, dequant, streamed_bytes, tuple(notes))
