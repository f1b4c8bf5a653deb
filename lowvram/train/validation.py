"""Validation clips: a short generation through diffusers' LTX2Pipeline with the LoRA being trained, as mp4.

It renders and writes; it does not score anything.
"""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def render_validation(cfg, components, transformer: torch.nn.Module, path: Path) -> Path:
    """A short clip through diffusers' LTX2Pipeline with the LoRA being trained, written as mp4 (video + audio).

    The frozen components visit the transformer's device for the call and go back to the host afterwards.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx2 import LTX2Pipeline

    from lowvram.models.versions import forward_semantics

    v = cfg.validation
    width, height = _wh(v.resolution)
    device = next(p.device for p in transformer.parameters() if p.device.type != "meta")
    frozen = [
        components.video_vae,
        components.audio_vae,
        components.text_encoder,
        components.connectors,
        components.vocoder,
    ]
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=components.video_vae,
        audio_vae=components.audio_vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        connectors=components.connectors,
        transformer=transformer,
        vocoder=components.vocoder,
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    try:
        for m in frozen:
            m.to(device)
        out = pipe(
            prompt=v.prompt,
            height=height,
            width=width,
            num_frames=v.num_frames,
            frame_rate=cfg.data.fps,
            num_inference_steps=v.num_inference_steps,
            guidance_scale=v.guidance,
            generator=torch.Generator().manual_seed(v.seed),
            output_type="np",
            max_sequence_length=min(cfg.data.max_text_tokens, components.tokenizer.model_max_length),
            # The release's own a/v cross-attention timestep (False for 2.0; the pipeline's default True is 2.3/2.5's).
            use_cross_timestep=forward_semantics(transformer.config).use_cross_timestep,
        )
    finally:
        for m in frozen:
            m.to("cpu")
        transformer.train(was_training)
    frames = (out.frames[0] * 255).round().clip(0, 255).astype("uint8")
    audio = None if out.audio is None else out.audio[0].float().cpu().numpy()
    rate = int(getattr(components.vocoder.config, "output_sampling_rate", 16000))
    write_mp4(path, frames, fps=cfg.data.fps, audio=audio, audio_rate=rate)
    return path


def _wh(resolution: str) -> tuple[int, int]:
    from lowvram.config import parse_resolution

    return parse_resolution(resolution)


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
