"""The `validation` phase of a plan: sampling with the training transformer, then VAE decode, then the vocoder.

Measured on fake tensors with the renderer's own calls (lowvram.models.sampling) and composed with the training
setup's resident weights: the transformer keeps its offload strategy (no second copy), the optimizer state may
leave the device for the phase, the video VAE decoder visits for the decode (tiled if that is what fits), then the
audio VAE decoder and the vocoder. It does not choose the training settings (plan.py does) or render anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowvram.plan.budget import (
    GIB,
    BudgetOptions,
    Measurements,
    PhaseBudget,
    Settings,
    _itemsize,
    optimizer_state_bytes,
    transformer_device_bytes,
    transformer_host_bytes,
)
from lowvram.plan.measure import LoraSpec, MeasureCache, ModelConfigs, _dtype, build_lora_transformer, train_shape


@dataclass(frozen=True)
class ValidationShape:
    width: int
    height: int
    frames: int
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_tokens: int
    text_tokens: int
    rows: int  # 2 with classifier-free guidance ([negative, prompt] in one batch), else 1
    mode: str
    audio: bool = True  # the run renders audio (data.audio and not a video-only run)

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def validation_shape(cfg, configs: ModelConfigs, *, frames: int | None = None, guidance: float | None = None):
    from lowvram.config import parse_resolution

    v = cfg.validation
    width, height = parse_resolution(v.resolution)
    frames = frames or v.num_frames
    t = train_shape(configs, width=width, height=height, frames=frames, fps=cfg.data.fps, batch=1,
                    text_tokens=cfg.data.max_text_tokens, audio=cfg.data.audio, mode=cfg.train.mode)  # fmt: skip
    g = max(guidance_values(cfg)) if guidance is None else guidance
    return ValidationShape(width, height, frames, t.latent_frames, t.latent_height, t.latent_width, t.audio_tokens,
                           t.text_tokens, 2 if g != 1.0 else 1, cfg.train.mode,
                           cfg.data.audio and cfg.train.mode != "video")  # fmt: skip


def guidance_values(cfg) -> list[float]:
    """The guidance of every validation render (one per adapter set when sets are given)."""
    return [cfg.validation.guidance]


def sample_shape(vs: ValidationShape, transformer_config: dict, fps: float):
    from lowvram.models.sampling import SampleShape

    return SampleShape(
        latent_frames=vs.latent_frames,
        latent_height=vs.latent_height,
        latent_width=vs.latent_width,
        audio_tokens=vs.audio_tokens,
        video_channels=transformer_config["in_channels"],
        audio_channels=transformer_config["audio_in_channels"],
        fps=fps,
        video=vs.mode != "audio",
        audio=vs.audio,
    )


# --------------------------------------------------------------------------------------------------------------------
# Measurements (fake tensors, the renderer's own calls)


def measure_sampling(configs: ModelConfigs, vs: ValidationShape, lora: LoraSpec, *, compute_dtype: str,
                     attention: str, fps: float = 25.0) -> dict:  # fmt: skip
    """Bytes one denoising step allocates (no grad): noise, the guidance batch of text rows, block activations.

    Two blocks: without autograd each block's activations die before the next block runs, so depth adds nothing.
    """
    from lowvram.fakemem import LiveBytes, attention_backend, fake_mode, register_module_storages
    from lowvram.models.ltx2 import TextEmbeddings
    from lowvram.models.sampling import denoise

    dtype = _dtype(compute_dtype)
    model = build_lora_transformer(configs.transformer, 2, lora, dtype)
    caption = configs.transformer["caption_channels"]
    shape = sample_shape(vs, configs.transformer, fps)
    with fake_mode(), torch.no_grad():
        model = model.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, model)

        def text() -> TextEmbeddings:
            return TextEmbeddings(
                video=torch.empty(1, vs.text_tokens, caption, dtype=dtype),
                audio=torch.empty(1, vs.text_tokens, caption, dtype=dtype),
                mask=torch.ones(1, vs.text_tokens, dtype=torch.int64),
            )

        prompt, negative = text(), text()  # on the device before sampling: counted as "text embeddings"
        live.ignore(*prompt.__dict__.values(), *negative.__dict__.values())
        with live, attention_backend(attention):
            live.enter_section("sample")
            denoise(model, shape, prompt, negative if vs.rows == 2 else None, steps=1, guidance=2.0 if vs.rows == 2
                    else 1.0, generator=torch.Generator(), device=torch.device("cpu"), dtype=dtype)  # fmt: skip
    text_bytes = 2 * (2 * vs.text_tokens * caption * _itemsize(compute_dtype) + vs.text_tokens * 8)
    return {"sample_peak_bytes": live.peak_bytes, "text_bytes": text_bytes}


def measure_decode(configs: ModelConfigs, vs: ValidationShape, *, tiling: bool, compute_dtype: str,
                   fps: float = 25.0) -> dict:  # fmt: skip
    """Video decode (tiled or not) and audio decode + vocoder: weights and activation peaks, on fake tensors."""
    from diffusers import AutoencoderKLLTX2Audio

    from lowvram.fakemem import LiveBytes, fake_mode
    from lowvram.models.sampling import decode_audio, decode_video
    from lowvram.vae import VaeOptions, build_video_vae_on_meta

    dtype = _dtype(compute_dtype)
    shape = sample_shape(vs, configs.transformer, fps)
    video_vae = torch.nn.Module.to(build_video_vae_on_meta(configs.video_vae), dtype)
    video_vae.encoder = None
    with torch.device("meta"):
        audio_vae = AutoencoderKLLTX2Audio(**configs.audio_vae)
        vocoder = _build_vocoder(configs.family)
    audio_vae.encoder = None
    audio_vae, vocoder = torch.nn.Module.to(audio_vae, dtype), torch.nn.Module.to(vocoder, dtype)
    out: dict[str, Any] = {
        "video_decoder_params": sum(p.numel() for p in video_vae.parameters()),
        "audio_decoder_params": sum(p.numel() for p in audio_vae.parameters()),
        "vocoder_params": sum(p.numel() for p in vocoder.parameters()),
    }
    with fake_mode(), torch.no_grad():
        if shape.video:
            video_vae = video_vae.to_empty(device="cpu")
            video_vae.latents_mean.zero_(), video_vae.latents_std.fill_(1.0)
            tokens = torch.empty(1, vs.video_tokens, configs.transformer["in_channels"], dtype=dtype)
            live = LiveBytes()
            live.ignore(*video_vae.parameters(), *video_vae.buffers(), tokens)
            with live:
                live.enter_section("decode")
                decode_video(video_vae, tokens, shape, VaeOptions(tiling=tiling))
            out["video_decode_peak_bytes"] = live.peak_bytes
        else:
            out["video_decode_peak_bytes"] = 0
        if shape.audio:
            audio_vae, vocoder = audio_vae.to_empty(device="cpu"), vocoder.to_empty(device="cpu")
            tokens = torch.empty(1, vs.audio_tokens, configs.transformer["audio_in_channels"], dtype=dtype)
            live = LiveBytes()
            live.ignore(*audio_vae.parameters(), *audio_vae.buffers(), *vocoder.parameters(), *vocoder.buffers(),
                        tokens)  # fmt: skip
            with live:
                live.enter_section("decode")
                decode_audio(audio_vae, vocoder, tokens)
            out["audio_decode_peak_bytes"] = live.peak_bytes
        else:
            out["audio_decode_peak_bytes"] = 0
    return out


def _build_vocoder(family: str):
    from lowvram.models.ltx2 import build_component, tiny_configs

    if family == "tiny":
        return build_component("vocoder", tiny_configs()["vocoder"])
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    return LTX2Vocoder()  # the class defaults are LTX-2.0's vocoder (56M parameters, DESIGN.md sizes)


@dataclass(frozen=True)
class ValidationMeasure:
    shape: ValidationShape
    sample_peak_bytes: int
    text_bytes: int
    latent_bytes: int  # the denoised video + audio tokens alive through the decodes
    decode: dict[bool, dict | None]  # tiling -> measure_decode (None: the tiled decode cannot run this shape)


def collect_validation(cfg, configs: ModelConfigs, cache: MeasureCache, *, attention: str, compute_dtype: str,
                       frames: int | None = None) -> ValidationMeasure:  # fmt: skip
    vs = validation_shape(cfg, configs, frames=frames)
    lora = LoraSpec(cfg.lora.rank, tuple(cfg.lora.targets), cfg.lora.dropout, include_audio=cfg.train.mode != "video")
    base = {"family": configs.family, "transformer": configs.transformer, "shape": vs.__dict__, "dtype": compute_dtype}
    sample = cache.get("validation-sample", {**base, "lora": lora.__dict__, "attention": attention},
                       lambda: measure_sampling(configs, vs, lora, compute_dtype=compute_dtype, attention=attention,
                                                fps=cfg.data.fps))  # fmt: skip
    vae_key = {**base, "video_vae": configs.video_vae, "audio_vae": configs.audio_vae}
    decode: dict[bool, dict | None] = {}
    for tiling in (False, True):
        try:
            decode[tiling] = cache.get("validation-decode", {**vae_key, "tiling": tiling},
                                       lambda tiling=tiling: measure_decode(configs, vs, tiling=tiling,
                                                                            compute_dtype=compute_dtype,
                                                                            fps=cfg.data.fps))  # fmt: skip
        except RuntimeError:
            if not tiling:
                raise
            # diffusers' tiled decode cannot run this shape (e.g. 480 px: a last tile one latent row high, which its
            # reflection padding refuses), so tiling is not an option here.
            decode[tiling] = None
    t = configs.transformer
    latent_bytes = (vs.video_tokens * t["in_channels"] + vs.audio_tokens * t["audio_in_channels"]) * _itemsize(
        compute_dtype
    )
    return ValidationMeasure(vs, sample["sample_peak_bytes"], sample["text_bytes"], latent_bytes, decode)


# --------------------------------------------------------------------------------------------------------------------
# Budget


def validation_budget(
    m: Measurements,
    vm: ValidationMeasure,
    s: Settings,
    profile,
    opts: BudgetOptions,
    *,
    offload_optimizer: bool,
    vae_tiling: bool,
) -> PhaseBudget:
    """Device and host peaks of the phase at its worst point (sampling, video decode or audio decode)."""
    dtype = opts.compute_dtype
    item = _itemsize(dtype)
    lora_params = m.lora_params()
    lora_item = _itemsize(opts.lora_dtype)
    optimizer = optimizer_state_bytes(s.optimizer, lora_params, opts.lora_dtype)
    tx = transformer_device_bytes(m, s, dtype)
    if s.offload == "group":
        # block_level groups onload while their blocks run: the outside layers and one group at a time
        tx = {"outside layers (onloaded)": m.rest.bytes("bf16" if dtype == "bf16" else "fp32", dtype),
              "block group (onloaded)": min(s.group_blocks_per_group, m.num_layers) * m.block.bytes(s.precision,
                                                                                                   dtype)}  # fmt: skip
    base = {
        "reserve": profile.reserve_bytes,
        **tx,
        "LoRA parameters": lora_params * lora_item,
        "optimizer state": 0 if offload_optimizer else optimizer,
        "validation text embeddings (prompt + negative)": vm.text_bytes,
    }
    if s.precision not in ("bf16", "fp32"):
        base["dequantized weight (transient)"] = m.block.largest_linear_bytes(dtype)
    vs = vm.shape
    latents = vm.latent_bytes
    decode = vm.decode[vae_tiling]
    points = {
        "sampling": {f"sampling activations ({vs.rows} guidance rows)": vm.sample_peak_bytes},
        "video decode": {
            "denoised latents": latents,
            "video VAE decoder": decode["video_decoder_params"] * item,
            f"video decode activations ({'tiled' if vae_tiling else 'untiled'})": decode["video_decode_peak_bytes"],
        },
        "audio decode": {
            "denoised latents": latents,
            "audio VAE decoder + vocoder": (decode["audio_decoder_params"] + decode["vocoder_params"]) * item,
            "audio decode + vocoder activations": decode["audio_decode_peak_bytes"],
        },
    }
    worst = max(points, key=lambda k: sum(points[k].values()))
    vram = {**base, **{f"{k} (at {worst})": v for k, v in points[worst].items()}}
    frames_bytes = 3 * vs.frames * vs.width * vs.height
    ram = {
        "process (runtime + libraries)": opts.host_process_bytes,
        **transformer_host_bytes(m, s, dtype),
        "VAEs + vocoder (host copies)": (m.video_vae_params + m.audio_vae_params + decode["vocoder_params"]) * item,
        "optimizer state (off the device for the phase)": optimizer if offload_optimizer else 0,
        "rendered frames": frames_bytes,
    }
    return PhaseBudget("validation", vram=vram, ram=ram)


def plan_validation(cfg, m: Measurements, s: Settings, profile, opts: BudgetOptions, vram_ok: int, ram_ok: int,
                    cache: MeasureCache, configs: ModelConfigs, attention: str):  # fmt: skip
    """(phase budget, chosen `validation.*` settings, one-line refusal or None).

    Options are tried exact first: the optimizer state leaving the device (exact, costs a copy each way) before a
    tiled decode (tile seams). A stated `validation.offload_optimizer` / `validation.vae_tiling` is kept as given.
    """
    v = cfg.validation
    offloads = [v.offload_optimizer] if v.offload_optimizer is not None else [False, True]
    tilings = [v.vae_tiling] if v.vae_tiling is not None else [False, True]
    options = [(o, t) for t in tilings for o in offloads]

    def evaluate(vm: ValidationMeasure):
        best = None
        for o, t in options:
            if vm.decode[t] is None:
                continue
            b = validation_budget(m, vm, s, profile, opts, offload_optimizer=o, vae_tiling=t)
            over = max(b.vram_peak_bytes - b.vram.get("reserve", 0) - vram_ok, b.ram_peak_bytes - ram_ok)
            if over <= 0:
                return b, (o, t), 0
            if best is None or over < best[2]:
                best = (b, (o, t), over)
        return best

    dtype = opts.compute_dtype
    vm = collect_validation(cfg, configs, cache, attention=attention, compute_dtype=dtype)
    if v.vae_tiling and vm.decode[True] is None:
        from lowvram.errors import UsageError

        raise UsageError(
            f"validation.vae_tiling = true: diffusers' tiled VAE decode cannot run {vm.shape.key} (its last tile "
            "would be too small to pad): set validation.vae_tiling = false, or a resolution whose sides tile evenly"
        )
    b, (o, t), over = evaluate(vm)
    chosen = {"validation.offload_optimizer": o, "validation.vae_tiling": t}
    if over <= 0:
        return b, chosen, None
    need = b.vram_peak_bytes - b.vram.get("reserve", 0)
    smaller = None
    for frames in range(vm.shape.frames - 8, 0, -8):
        if evaluate(collect_validation(cfg, configs, cache, attention=attention, compute_dtype=dtype,
                                       frames=frames))[2] <= 0:  # fmt: skip
            smaller = frames
            break
    fix = (f"set validation.num_frames = {smaller} (the longest clip at {v.resolution} that fits)" if smaller
           else "lower validation.resolution")  # fmt: skip
    reason = (
        f"validation at {vm.shape.key} needs {need / GIB:.2f} GiB of device memory beside the training setup "
        f"(usable {vram_ok / GIB:.2f} GiB) with the best of its options (optimizer state off the device, tiled VAE "
        f"decode): {fix}"
    )
    return b, chosen, reason


def validation_peak_bytes(budget: PhaseBudget) -> int:
    """The phase's device peak less the profile's reserve (what an allocator or the simulated device counts)."""
    return budget.vram_peak_bytes - budget.vram.get("reserve", 0)


