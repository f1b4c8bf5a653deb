"""Memory options for LTX-2's video VAE encode (tiling, slicing, batch size, patch conv, temporal roll) and their peaks.

The options change only how the encode is scheduled, never the model; patch conv and temporal roll are exact. It
does not choose options (the planner does) and does not decode (validation uses diffusers' own tiling).

How the two exact modes differ:
- patch conv: each causal Conv3d runs on frame chunks (with its k-1 frames of left context) and writes into one
  output; the layers still hand full-length activations to each other, so memory still grows with clip length,
  minus the padded copy and the conv's full-size workspace.
- temporal roll: the WHOLE encoder runs frame group by frame group; every causal conv keeps a rolling cache of its
  last k-1 input frames and the temporal downsamplers prepend the first frame only once, so live activations are
  those of one group plus small caches: memory no longer grows with clip length (only the tiny latent does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from lowvram.errors import UsageError


@dataclass(frozen=True)
class VaeOptions:
    """How to schedule a video VAE encode. Defaults: plain diffusers encode, one clip per call."""

    tiling: bool = False
    slicing: bool = False
    batch_size: int = 1
    patch_conv: bool = False
    temporal_roll: bool = False
    # diffusers' tiling knobs (pixels / frames); temporal tiling is on when `tiling` is (framewise encode).
    tile_sample_min_height: int = 512
    tile_sample_min_width: int = 512
    tile_sample_stride_height: int = 448
    tile_sample_stride_width: int = 448
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_num_frames: int = 8
    patch_conv_frames: int = 8  # output frames per Conv3d call
    roll_frames: int = 8  # input frames per rolled group (a multiple of the VAE's temporal compression)

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError(f"vae_batch_size must be >= 1, got {self.batch_size}")
        if self.temporal_roll and self.tiling:
            # diffusers' tiled_encode would run several spatial tiles through one rolling state and mix them.
            raise UsageError("vae_temporal_roll and vae_tiling cannot be combined: pick one (roll is exact)")
        if self.patch_conv_frames < 1 or self.roll_frames < 1:
            raise UsageError("patch_conv_frames and roll_frames must be >= 1")

    @property
    def name(self) -> str:
        parts = [n for n in ("tiling", "slicing", "patch_conv", "temporal_roll") if getattr(self, n)]
        return "+".join(parts) or "none"


# --------------------------------------------------------------------------------------------------------------------
# Configs


def real_video_vae_config() -> dict[str, Any]:
    """Constructor kwargs of LTX-2.0's video VAE: the config the models package ships (from diffusers' conversion
    script for Lightricks/LTX-2); its encoder has 694M parameters."""
    from lowvram.models.ltx2.configs import real_video_vae_config as shipped

    return shipped()


def build_video_vae_on_meta(config: dict[str, Any]):
    from diffusers import AutoencoderKLLTX2Video

    with torch.device("meta"):
        return AutoencoderKLLTX2Video(**config)


# --------------------------------------------------------------------------------------------------------------------
# Encode


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, options: VaeOptions = VaeOptions()) -> torch.Tensor:
    """`[B, 3, F, H, W]` in [-1, 1] -> the posterior mean `[B, C, F', H', W']` (not normalized).

    Runs `options.batch_size` clips per call; everything else per `options`.
    """
    chunks = []
    for part in video.split(options.batch_size):
        with vae_memory_options(vae, options):
            if options.temporal_roll:
                moments = rolling_encode(vae, part, options.roll_frames, slicing=options.slicing)
                chunks.append(_posterior_mode(moments))
            else:
                chunks.append(vae.encode(part).latent_dist.mode())
    return torch.cat(chunks)


def _posterior_mode(moments: torch.Tensor) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).mode()


@contextlib.contextmanager
def vae_memory_options(vae, options: VaeOptions) -> Iterator[None]:
    """Apply tiling / slicing / patch conv to this VAE instance for the duration of the block, then restore it."""
    saved = {
        name: getattr(vae, name)
        for name in (
            "use_tiling", "use_slicing", "use_framewise_decoding", "use_framewise_encoding",
            "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
            "tile_sample_stride_width", "tile_sample_min_num_frames", "tile_sample_stride_num_frames",
        )
    }  # fmt: skip
    try:
        vae.use_slicing = options.slicing
        if options.tiling:
            vae.enable_tiling(
                tile_sample_min_height=options.tile_sample_min_height,
                tile_sample_min_width=options.tile_sample_min_width,
                tile_sample_min_num_frames=options.tile_sample_min_num_frames,
                tile_sample_stride_height=options.tile_sample_stride_height,
                tile_sample_stride_width=options.tile_sample_stride_width,
                tile_sample_stride_num_frames=options.tile_sample_stride_num_frames,
            )
            # diffusers' _encode switches to temporal tiles on `use_framewise_decoding` (sic): it drives encode too.
            vae.use_framewise_decoding = True
            vae.use_framewise_encoding = True
        else:
            vae.use_tiling = False
            vae.use_framewise_decoding = False
            vae.use_framewise_encoding = False
        with patch_conv(vae.encoder, options.patch_conv_frames) if options.patch_conv else contextlib.nullcontext():
            yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


# --------------------------------------------------------------------------------------------------------------------
# Patch conv: chunk each causal Conv3d along time


def _causal_convs(module: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoCausalConv3d

    return [m for m in module.modules() if isinstance(m, LTX2VideoCausalConv3d)]


@contextlib.contextmanager
def patch_conv(module: torch.nn.Module, chunk_frames: int = 8) -> Iterator[None]:
    """Within the block, every LTX2VideoCausalConv3d under `module` computes `chunk_frames` output frames per call.

    Output frames [a, b) need padded input frames [a, b + k - 1): the chunk is cut from the input (a view) plus the
    replicated edge frames the original pads with, so the result equals the unchunked conv.
    """
    convs = _causal_convs(module)
    for conv in convs:
        conv.forward = _chunked_forward(conv, chunk_frames)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward  # back to the class's forward


def _chunked_forward(module, chunk_frames: int):
    original = type(module).forward.__get__(module)

    def forward(hidden_states: torch.Tensor, causal: bool = True) -> torch.Tensor:
        conv = module.conv
        k = module.kernel_size[0]
        frames = hidden_states.shape[2]
        if conv.stride[0] != 1 or conv.dilation[0] != 1 or frames <= chunk_frames:
            return original(hidden_states, causal=causal)
        pad_left = k - 1 if causal else (k - 1) // 2
        out = None
        for a in range(0, frames, chunk_frames):
            b = min(frames, a + chunk_frames)
            lo, hi = a - pad_left, b + k - 1 - pad_left  # source frames this chunk reads, edges replicated
            parts = []
            if lo < 0:
                parts.append(hidden_states[:, :, :1].expand(-1, -1, -lo, -1, -1))
            parts.append(hidden_states[:, :, max(lo, 0) : min(hi, frames)])
            if hi > frames:
                parts.append(hidden_states[:, :, -1:].expand(-1, -1, hi - frames, -1, -1))
            y = conv(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], frames, y.shape[3], y.shape[4]))
            out[:, :, a:b] = y
            del y
        return out

    return forward


# --------------------------------------------------------------------------------------------------------------------
# Temporal roll: stream the whole encoder over frame groups with rolling causal caches


@torch.no_grad()
def rolling_encode(vae, video: torch.Tensor, group_frames: int = 8, *, slicing: bool = False) -> torch.Tensor:
    """The encoder's output moments for `[B, 3, 1+8n, H, W]`, computed group by group; equals `vae.encoder(video)`.

    Groups: frame 0 plus `group_frames` frames, then `group_frames` at a time; `group_frames` must be a multiple of the
    VAE's temporal compression so every temporal downsampler sees whole pairs.
    """
    tc = vae.temporal_compression_ratio
    frames = video.shape[2]
    if (frames - 1) % tc:
        raise UsageError(f"temporal roll needs {tc}k+1 frames, got {frames}")
    if group_frames % tc:
        raise UsageError(f"vae roll_frames must be a multiple of {tc}, got {group_frames}")
    if vae.encoder.patch_size_t != 1:
        raise UsageError("temporal roll supports patch_size_t=1 (LTX-2) only")
    samples = video.split(1) if slicing else (video,)
    outputs = []
    for sample in samples:
        bounds = [0, min(frames, 1 + group_frames)]
        while bounds[-1] < frames:
            bounds.append(min(frames, bounds[-1] + group_frames))
        pieces = []
        with _rolling_state(vae.encoder):
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                pieces.append(vae.encoder(sample[:, :, a:b], causal=True))
        outputs.append(torch.cat(pieces, dim=2))
    return torch.cat(outputs)


@contextlib.contextmanager
def _rolling_state(encoder: torch.nn.Module) -> Iterator[None]:
    from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoDownsampler3d

    convs = _causal_convs(encoder)
    downsamplers = [m for m in encoder.modules() if isinstance(m, LTX2VideoDownsampler3d)]
    for conv in convs:
        conv.forward = _rolling_conv_forward(conv)
    for down in downsamplers:
        down.forward = _rolling_downsample_forward(down)
    try:
        yield
    finally:
        for m in convs + downsamplers:
            del m.forward


def _rolling_conv_forward(module):
    cache: list[torch.Tensor | None] = [None]  # the last k-1 input frames seen (after causal padding)

    def forward(hidden_states: torch.Tensor, causal: bool = True) -> torch.Tensor:
        if not causal:
            raise UsageError("temporal roll needs a causal encoder (LTX-2's is)")
        conv = module.conv
        if conv.stride[0] != 1 or conv.dilation[0] != 1:
            raise UsageError("temporal roll supports stride-1, dilation-1 causal convs (LTX-2's encoder)")
        keep = module.kernel_size[0] - 1
        if keep == 0:
            return conv(hidden_states)
        head = cache[0] if cache[0] is not None else hidden_states[:, :, :1].expand(-1, -1, keep, -1, -1)
        x = torch.cat([head, hidden_states], dim=2)
        cache[0] = x[:, :, -keep:].clone()  # a copy, so the group's big input can be freed
        return conv(x)

    return forward


def _rolling_downsample_forward(module):
    first = [True]
    st, sh, sw = module.stride

    def space_to_channels(x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // st, st, h // sh, sh, w // sw, sw)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * st * sh * sw, f // st, h // sh, w // sw)

    def forward(hidden_states: torch.Tensor, causal: bool = True) -> torch.Tensor:
        # LTX-2 prepends the first st-1 frames once to the whole clip; in a roll only the first group does.
        if first[0] and st > 1:
            hidden_states = torch.cat([hidden_states[:, :, : st - 1], hidden_states], dim=2)
        first[0] = False
        if hidden_states.shape[2] % st:
            raise UsageError("temporal roll: a frame group does not split into whole downsampling steps")
        residual = space_to_channels(hidden_states)
        residual = residual.unflatten(1, (-1, module.group_size)).mean(dim=2)
        out = space_to_channels(module.conv(hidden_states, causal=causal))
        return out + residual

    return forward


# --------------------------------------------------------------------------------------------------------------------
# Peak measurement with the tracked-bytes instrument (lowvram.fakemem.LiveBytes, shared with the planner)


@dataclass(frozen=True)
class EncodePeak:
    options: str
    activation_peak_bytes: int  # tensors created by the encode (weights and input excluded)
    input_bytes: int
    weight_bytes: int  # encoder weights (what a GPU must hold besides)
    latent_shape: tuple[int, ...]


def measure_vae_encode_peak_bytes(
    config: dict[str, Any],
    width: int,
    height: int,
    frames: int,
    options: VaeOptions = VaeOptions(),
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> EncodePeak:
    """Measure one encode's activation peak with LiveBytes on fake tensors: exact shapes, no compute, no RAM.

    The planner calls this to predict the caching phase's peak for a config and option set (a few seconds for the
    real 694M encoder; the real weights are never materialized).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowvram.fakemem import LiveBytes

    # nn.Module.to: ModelMixin.to warns about fp32-kept modules, which this VAE has none of
    vae = torch.nn.Module.to(build_video_vae_on_meta(config), dtype)
    vae.decoder = None  # encode only; the decoder would double the fake weights for nothing
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae = vae.to_empty(device="cpu")
        video = torch.empty((batch, 3, frames, height, width), dtype=dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in vae.encoder.parameters())
        tracker = LiveBytes()
        tracker.ignore(*vae.parameters(), *vae.buffers(), video)  # views of these are not new memory
        with tracker:
            latents = encode_video(vae, video, options)
        return EncodePeak(
            options=options.name,
            activation_peak_bytes=tracker.peak_bytes,
            input_bytes=video.numel() * video.element_size(),
            weight_bytes=weight_bytes,
            latent_shape=tuple(latents.shape),
        )


def predict_vae_encode_peak_bytes(
    config: dict[str, Any], width: int, height: int, frames: int, options: VaeOptions = VaeOptions(), **kw
) -> int:
    """Bytes a device must hold to encode one batch: encoder weights + input + measured activation peak."""
    peak = measure_vae_encode_peak_bytes(config, width, height, frames, options, **kw)
    return peak.weight_bytes + peak.input_bytes + peak.activation_peak_bytes


def options_for_bench(base: VaeOptions, width: int, height: int) -> dict[str, VaeOptions]:
    """The four rows of the README table; tiling uses tiles of half the frame so it actually tiles at small sizes."""
    half_w, half_h = max(32, width // 2 // 32 * 32), max(32, height // 2 // 32 * 32)
    return {
        "none": base,
        "tiling": replace(
            base,
            tiling=True,
            tile_sample_min_width=half_w,
            tile_sample_min_height=half_h,
            tile_sample_stride_width=max(32, half_w * 3 // 4 // 32 * 32),
            tile_sample_stride_height=max(32, half_h * 3 // 4 // 32 * 32),
        ),
        "patch_conv": replace(base, patch_conv=True),
        "temporal_roll": replace(base, temporal_roll=True),
    }
