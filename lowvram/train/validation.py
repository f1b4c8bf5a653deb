"""Validation clips: the LoRA being trained samples each validation prompt from the text cache, decoded to mp4.

The transformer samples where it trains (its offload strategy stays on: no second copy); the optimizer state can
leave the device for the phase; the video VAE decoder visits the device for the decode, then the audio decoder and
the vocoder. Prompts were encoded at startup with the captions, so Gemma3 is never loaded here. It renders and
writes; it does not score anything, and it draws no training randomness (its own seeded CPU generator, and the
global CPU RNG is forked around it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.errors import ConfigError


def validation_prompts(cfg) -> list[str]:
    """`validation.prompts` (a list, or a text file with one prompt per line), else `[validation.prompt]`."""
    v = cfg.validation
    if v.prompts is None:
        return [v.prompt]
    if isinstance(v.prompts, list):
        prompts = [p for p in v.prompts if p.strip()]
        if not prompts:
            raise ConfigError("validation.prompts is an empty list: give at least one prompt, or leave it out")
        return prompts
    path = Path(v.prompts).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(
            f"validation.prompts: cannot read {path} ({why}): give a UTF-8 text file, one prompt a line"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"validation.prompts: {path} holds no prompt: write one prompt per line")
    return prompts


def texts_to_cache(cfg) -> list[str]:
    """What the text cache encodes at startup for validation: every prompt and the negative prompt."""
    if not cfg.validation.enabled:
        return []
    return [*validation_prompts(cfg), cfg.validation.negative_prompt]


@dataclass
class ValidationJob:
    """What a run renders at each validation, decided at startup."""

    prompts: list[str]
    negative_prompt: str
    text_paths: dict[str, Path] = field(default_factory=dict)  # filled by the text cache phase


def sample_shape_for(cfg, transformer, vaes):
    """The token shape of a validation clip, from the loaded VAEs' compression (as caching derives it)."""
    import math

    from lowvram.config import parse_resolution
    from lowvram.models.sampling import SampleShape

    width, height = parse_resolution(cfg.validation.resolution)
    frames = cfg.validation.num_frames
    vc, ac = vaes.video_vae.config, vaes.audio_vae.config
    spatial, temporal = vc.spatial_compression_ratio, vc.temporal_compression_ratio
    audio = cfg.data.audio and cfg.train.mode != "video"
    audio_tokens = math.ceil(frames / cfg.data.fps * ac.sample_rate / ac.mel_hop_length / 4) if audio else 1
    return SampleShape(
        latent_frames=(frames - 1) // temporal + 1,
        latent_height=height // spatial,
        latent_width=width // spatial,
        audio_tokens=audio_tokens,
        video_channels=transformer.config.in_channels,
        audio_channels=transformer.config.audio_in_channels,
        fps=cfg.data.fps,
        video=cfg.train.mode != "audio",
        audio=audio,
    )


@contextlib.contextmanager
def visiting(modules, backend) -> Iterator[None]:
    """The frozen modules' weights on the device for the block, then their host tensors back (no copy back).

    The device copies replace the parameter and buffer entries; the host tensors are never read through an op
    while they are away, so nothing but the copy itself touches them.
    """
    saved = []
    try:
        for module in modules:
            for sub in module.modules():
                for table in (sub._parameters, sub._buffers):
                    for name, t in table.items():
                        if t is None:
                            continue
                        saved.append((table, name, t))
                        copy = backend.to_device(t)
                        is_param = table is sub._parameters
                        table[name] = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
        yield
    finally:
        for table, name, t in reversed(saved):
            table[name] = t


@contextlib.contextmanager
def optimizer_off_device(optimizer, backend) -> Iterator[None]:
    """The optimizer state on the host for the block (the official trainer's `offload_optimizer_during_validation`)."""
    if not backend.is_accelerator:
        yield
        return
    moved = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                moved.append((state, key))
                state[key] = backend.to_host(value)
    try:
        yield
    finally:
        for state, key in moved:
            state[key] = backend.to_device(state[key])


def _text(path: Path):
    from lowvram.data.text_cache import load_text_embedding
    from lowvram.models.ltx2.forward import TextEmbeddings

    t = load_text_embedding(path)
    return TextEmbeddings(video=t["video"][None], audio=t["audio"][None], mask=t["mask"][None].long())


def _on_device(text, backend, dtype):
    from lowvram.models.ltx2.forward import TextEmbeddings

    return TextEmbeddings(video=backend.to_device(text.video.to(dtype)), audio=backend.to_device(text.audio.to(dtype)),
                          mask=backend.to_device(text.mask))  # fmt: skip


@torch.no_grad()
def render_sample(transformer, vaes, text, negative, shape, *, steps: int, guidance: float, seed: int, backend,
                  dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None, tiling: bool = False,
                  on_step=None):  # fmt: skip
    """The device part of one clip: denoise, decode video, decode audio. Returns (frames uint8 [F,H,W,3], wave)."""
    from lowvram.models.sampling import decode_audio, decode_video, denoise
    from lowvram.vae import VaeOptions

    was_training = transformer.training
    transformer.eval()
    autocast = (
        torch.autocast(backend.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    try:
        with torch.random.fork_rng(devices=[]):
            prompt = _on_device(text, backend, dtype)
            neg = _on_device(negative, backend, dtype) if negative is not None and guidance != 1.0 else None
            with autocast:
                video, audio = denoise(transformer, shape, prompt, neg, steps=steps, guidance=guidance,
                                       generator=torch.Generator().manual_seed(seed), device=backend.device,
                                       dtype=dtype, on_step=on_step)  # fmt: skip
            del prompt, neg
            frames = wave = None
            if shape.video:
                with visiting([vaes.video_vae.decoder], backend):
                    frames = decode_video(vaes.video_vae, video, shape, VaeOptions(tiling=tiling)).cpu()
            del video
            if shape.audio and vaes.vocoder is not None:
                with visiting([vaes.audio_vae.decoder, vaes.vocoder], backend):
                    wave = decode_audio(vaes.audio_vae, vaes.vocoder, audio).cpu()
            del audio
    finally:
        transformer.train(was_training)
    return frames, wave


def render_validation(cfg, job: ValidationJob, vaes, transformer, step_dir: Path, *, backend,
                      dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                      on_step=None) -> list[Path]:  # fmt: skip
    """Every validation prompt with the LoRA being trained: `step_dir/NN.mp4` (video + audio) + `NN.json`."""
    from lowvram.fsutil import atomic_write_text

    v = cfg.validation
    shape = sample_shape_for(cfg, transformer, vaes)
    negative = _text(job.text_paths[job.negative_prompt]) if v.guidance != 1.0 else None
    written = []
    for i, prompt in enumerate(job.prompts):
        frames, wave = render_sample(
            transformer, vaes, _text(job.text_paths[prompt]), negative, shape, steps=v.num_inference_steps,
            guidance=v.guidance, seed=v.seed, backend=backend, dtype=dtype, autocast_dtype=autocast_dtype,
            tiling=bool(v.vae_tiling), on_step=on_step,
        )  # fmt: skip
        path = Path(step_dir) / f"{i:02d}.mp4"
        rate = int(getattr(vaes.vocoder.config, "output_sampling_rate", 16000)) if vaes.vocoder is not None else 0
        if frames is None:  # an audio-only run: a black frame per video frame carries the sound
            frames = torch.zeros(max(1, v.num_frames), 32, 32, 3, dtype=torch.uint8)
        write_mp4(path, frames.numpy(), fps=cfg.data.fps, audio=None if wave is None else wave.numpy(),
                  audio_rate=rate)  # fmt: skip
        sidecar = {
            "prompt": prompt,
            "negative_prompt": job.negative_prompt,
            "workflow": "t2v",
            "resolution": v.resolution,
            "num_frames": v.num_frames,
            "num_inference_steps": v.num_inference_steps,
            "guidance": v.guidance,
            "seed": v.seed,
            "video": path.name,
        }
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
        written.append(path)
    return written


def write_mp4(path: Path, frames, *, fps: float, audio=None, audio_rate: int = 16000) -> None:
    """`frames` uint8 [F, H, W, 3] (+ float audio [C, samples] in [-1, 1]) -> an mp4 with H.264/MPEG-4 and AAC."""
    from fractions import Fraction

    import av
    import numpy as np

    from lowvram.fsutil import atomic_path

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        vs = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        astream = None
        if audio is not None and audio.size:
            layout = "stereo" if audio.shape[0] == 2 else "mono"
            astream = container.add_stream("aac", rate=audio_rate, layout=layout)
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if astream is not None:
            wave = np.ascontiguousarray(np.clip(audio, -1, 1).astype(np.float32))
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=astream.layout.name)
            frame.sample_rate, frame.pts = audio_rate, 0
            for packet in astream.encode(frame):
                container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
