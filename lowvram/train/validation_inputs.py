"""Validation conditioning inputs: the I2V first frame and the S2V audio, read at startup and encoded while caching.

I2V (`validation.reference_image`, or `validation.reference_from_dataset`: the first frame of that dataset's first
clip) is decoded and resized / centre-cropped to the validation resolution by the data pipeline's own decoder
(`data.media.decode_video`, the cover-crop every training clip gets), then encoded by the video VAE in the
`latent_cache` phase, where the encoder is on the device anyway: validation never brings the encoder back. S2V
(`validation.reference_audio`, a file decoded with PyAV and encoded by the audio VAE as training audio is, or
`validation.reference_audio_from_dataset`: the cached audio latents of that dataset's first clip with audio) is held
at sigma 0 by the sampler while the video is generated. Every input is checked in `read_inputs` before any caching
or loading; a dataset's clip is picked right after discovery, before any model loads. This module does not sample
or decode (train/validation.py, models/sampling.py do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowvram.errors import ConfigError, LowvramError


@dataclass
class ValidationInputs:
    """What the validation clips are conditioned on; tokens are filled while caching (`encode_inputs`)."""

    image_key: str | None = None  # "reference_image" | "reference_from_dataset"
    image_ref: str | None = None  # the file, or "dataset NAME: CLIP" once picked
    image_dataset: str | None = None
    pixels: torch.Tensor | None = None  # [3, 1, H, W] in [-1, 1] at the validation resolution
    audio_key: str | None = None  # "reference_audio" | "reference_audio_from_dataset"
    audio_ref: str | None = None
    audio_dataset: str | None = None
    audio_path: Path | None = None  # reference_audio: the file
    audio_item: object | None = None  # reference_audio_from_dataset: the dataset Item whose cached latents are held
    first_frame: torch.Tensor | None = None  # [1, latent_h * latent_w, C] normalized video tokens of latent frame 0
    image_crf: int | None = None  # the H.264 CRF the frame was re-compressed with before encoding
    audio_tokens: torch.Tensor | None = None  # [1, S_a, C_a] normalized packed audio tokens

    @property
    def workflow(self) -> str:
        i2v, s2v = self.image_key is not None, self.audio_key is not None
        return "i2v+s2v" if i2v and s2v else "i2v" if i2v else "s2v" if s2v else "t2v"

    def sidecar(self) -> dict:
        out = {}
        if self.image_key is not None:
            out["reference_image"] = self.image_ref
            out["reference_image_crf"] = self.image_crf
        if self.audio_key is not None:
            out["reference_audio"] = self.audio_ref
        return out


def audio_latent_frames_for(cfg, sample_rate: int = 16000, hop: int = 160) -> int:
    """Audio tokens of the validation clip (sample_shape_for's count: 25 latent frames a second for LTX-2)."""
    return math.ceil(cfg.validation.num_frames / cfg.data.fps * sample_rate / hop / 4)


def read_inputs(cfg) -> ValidationInputs | None:
    """Check and read the stated inputs before caching or loading (one-line ConfigError, exit 2). None: T2V only.

    The mode checks (I2V on an audio-only run, S2V without audio, both sources at once) are the config's own
    (config.py); here: files that cannot be read, dataset names the data config does not define.
    """
    v = cfg.validation
    if not v.enabled:
        return None
    keys = ("reference_image", "reference_from_dataset", "reference_audio", "reference_audio_from_dataset")
    if all(getattr(v, k) is None for k in keys):
        return None
    from lowvram.config import parse_resolution
    from lowvram.data import media

    inputs = ValidationInputs()
    width, height = parse_resolution(v.resolution)
    if v.reference_image is not None:
        path = Path(v.reference_image).expanduser()
        inputs.image_key, inputs.image_ref = "reference_image", str(path)
        try:
            # The training clips' decoder: resized to cover WxH, centre-cropped (a still image is a one-frame clip).
            inputs.pixels = media.decode_video(path, fps=cfg.data.fps, frames=1, width=width, height=height)
        except media.BadItem as err:
            raise ConfigError(f"validation.reference_image: {path}: {err}: give a readable image (or video) file") \
                from None  # fmt: skip
    if v.reference_audio is not None:
        path = Path(v.reference_audio).expanduser()
        inputs.audio_key, inputs.audio_ref, inputs.audio_path = "reference_audio", str(path), path
        try:
            wave, has_audio = media.decode_audio(path, duration_s=0.1, channels=1)
        except media.BadItem as err:
            raise ConfigError(f"validation.reference_audio: {path}: {err}: give a readable audio file") from None
        if not has_audio:
            raise ConfigError(f"validation.reference_audio: {path} holds no audio stream: give an audio file")
    named = [(k, getattr(v, k)) for k in ("reference_from_dataset", "reference_audio_from_dataset")]
    named = [(k, name) for k, name in named if name is not None]
    if named:
        from lowvram.data.dataset import data_config_from_run

        specs = {d.id: d for d in data_config_from_run(cfg).datasets}
        for key, name in named:
            spec = specs.get(name)
            if spec is None:
                known = ", ".join(sorted(specs)) or "none"
                raise ConfigError(f"validation.{key}: no dataset named '{name}' (datasets: {known}): use one of them")
            if key == "reference_from_dataset":
                if spec.audio_only:
                    raise ConfigError(f"validation.reference_from_dataset: dataset '{name}' is audio-only and has no "
                                      "frame to condition on: name a video or image dataset")  # fmt: skip
                inputs.image_key, inputs.image_dataset = key, name
            else:
                linked = spec.audio_only and any(name in d.s2v_datasets for d in specs.values())
                if not (spec.audio.auto_split or spec.s2v_datasets or linked):
                    raise ConfigError(f"validation.reference_audio_from_dataset: dataset '{name}' caches no audio "
                                      "(audio.auto_split is off and it links no s2v dataset): name a dataset with "
                                      "audio, or give validation.reference_audio")  # fmt: skip
                if spec.audio_only and not linked:
                    raise ConfigError(f"validation.reference_audio_from_dataset: '{name}' is an audio-only dataset "
                                      "(its latents carry no video clip): name a video dataset with audio, or give "
                                      "validation.reference_audio")  # fmt: skip
                inputs.audio_key, inputs.audio_dataset = key, name
    return inputs


def pick_from_dataset(inputs: ValidationInputs | None, items, data, cfg) -> None:
    """Right after discovery (no model loaded yet): the clip each `*_from_dataset` input takes, in discovery order.

    I2V: the first video or image item of the dataset, its first frame decoded at the validation resolution now.
    S2V: the first item with audio whose cached audio covers the validation clip (else one line, before loading).
    """
    if inputs is None:
        return
    if inputs.image_dataset is not None:
        from lowvram.config import parse_resolution
        from lowvram.data import media

        name = inputs.image_dataset
        clips = [it for it in items if it.dataset_id == name and it.kind in ("video", "image")]
        if not clips:
            raise LowvramError(f"validation.reference_from_dataset: dataset '{name}' has no usable clip (see the "
                               "skipped items above): fix its files, or give validation.reference_image",
                               exit_code=2)  # fmt: skip
        item = clips[0]
        width, height = parse_resolution(cfg.validation.resolution)
        try:
            inputs.pixels = media.decode_video(item.path, fps=item.fps if item.kind == "video" else 1.0, frames=1,
                                               width=width, height=height)  # fmt: skip
        except media.BadItem as err:
            raise LowvramError(f"validation.reference_from_dataset: {item.path}: {err}: fix the clip, or give "
                               "validation.reference_image", exit_code=2) from None  # fmt: skip
        inputs.image_ref = f"dataset {name}: {item.path}"
    if inputs.audio_dataset is not None:
        from lowvram.data.latent_cache import audio_latent_frames

        name = inputs.audio_dataset
        folders = {d.instance_data_dir for d in data.datasets if d.id == name}
        with_audio = [it for it in items if it.audio_path is not None and it.kind != "audio"
                      and (it.dataset_id == name or it.audio_path.parent in folders)]  # fmt: skip
        need = audio_latent_frames_for(cfg)
        if not with_audio:
            raise LowvramError(f"validation.reference_audio_from_dataset: dataset '{name}' has no clip with audio: "
                               "give validation.reference_audio instead", exit_code=2)  # fmt: skip
        long_enough = [it for it in with_audio if audio_latent_frames(it) >= need]
        if not long_enough:
            longest = max(audio_latent_frames(it) for it in with_audio)
            raise LowvramError(
                f"validation.reference_audio_from_dataset: the clips of '{name}' cache at most {longest} audio latent "
                f"frames, the validation clip needs {need} ({cfg.validation.num_frames} frames at {cfg.data.fps:g} "
                "fps): lower validation.num_frames, or give validation.reference_audio", exit_code=2
            )  # fmt: skip
        inputs.audio_item = long_enough[0]
        inputs.audio_ref = f"dataset {name}: {inputs.audio_item.audio_path}"


def image_crf(version: str) -> int:
    """The H.264 CRF the official pipelines re-compress a conditioning image with (diffusers' ltx2 utils)."""
    from diffusers.pipelines.ltx2.utils import DEFAULT_IMAGE_CRF, LTX2_5_IMAGE_CRF

    return LTX2_5_IMAGE_CRF if str(version) == "2.5" else DEFAULT_IMAGE_CRF


def conditioning_frame(pixels: torch.Tensor, version: str) -> torch.Tensor:
    """`[3, 1, H, W]` in [-1, 1] through diffusers' `apply_image_conditioning_crf` (uint8 RGB in and out)."""
    from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

    rgb = ((pixels[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    out = apply_image_conditioning_crf(rgb, image_crf(version))
    return (torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)[:, None]


@torch.no_grad()
def encode_inputs(inputs: ValidationInputs | None, video_vae, audio_vae, cache_dir: Path, cfg, vae_options) -> None:
    """In the `latent_cache` phase (the VAEs on the device for the clips): the reference frame encoded by the video
    VAE, the reference audio by the audio VAE (a dataset's audio read from its latent cache entry); host tensors."""
    if inputs is None:
        return
    from lowvram.models.ltx2.forward import normalize_video_latents, pack_audio_latents, pack_video_latents
    from lowvram.vae import encode_video

    if inputs.pixels is not None:
        # As diffusers 0.42.1's LTX2ImageToVideoPipeline: the frame re-compressed with H.264 at the release's image
        # CRF (33; 18 for LTX-2.5, ltx-pipelines' `load_image_and_preprocess`) so it carries training's compression,
        # then encoded alone as a one-frame video (`vae.encode(image.unsqueeze(2))`, the posterior's mode) and
        # normalized with the VAE's latents mean / std; the sampler keeps these tokens as the clean first latent
        # frame at timestep 0 (models/sampling.denoise). The resize differs on purpose: the pipeline stretches the
        # image to the output size, we cover-crop it as every training clip is cropped.
        pixels = conditioning_frame(inputs.pixels, cfg.model.version)
        inputs.image_crf = image_crf(cfg.model.version)
        param = next(video_vae.parameters())
        latents = encode_video(video_vae, pixels[None].to(param.device, param.dtype), vae_options)
        latents = normalize_video_latents(latents, video_vae)  # [1, C, 1, h, w]
        inputs.first_frame = pack_video_latents(latents).to("cpu", torch.float32)
    if inputs.audio_key is None:
        return
    c = audio_vae.config
    need = audio_latent_frames_for(cfg, c.sample_rate, c.mel_hop_length)
    if inputs.audio_path is not None:
        from lowvram.data.latent_cache import encode_audio_file
        from lowvram.data.media import BadItem

        try:
            latents, has_audio = encode_audio_file(audio_vae, inputs.audio_path, need)
        except BadItem as err:
            raise LowvramError(f"validation.reference_audio: {inputs.audio_path}: {err}", exit_code=2) from None
    else:
        from safetensors.torch import load_file

        from lowvram.data.latent_cache import latent_path

        path = latent_path(Path(cache_dir), inputs.audio_item)
        try:
            entry = load_file(str(path))
        except (OSError, RuntimeError):
            raise LowvramError(f"validation.reference_audio_from_dataset: {inputs.audio_item.path} was not cached "
                               "(skipped, see above): name another dataset, or give validation.reference_audio",
                               exit_code=2) from None  # fmt: skip
        latents, has_audio = entry["audio_latents"][:, :need], bool(entry["audio_mask"].item())
    if not has_audio:
        raise LowvramError(f"validation.{inputs.audio_key}: {inputs.audio_ref} decodes to no audio: give a clip or "
                           "file with sound", exit_code=2)  # fmt: skip
    inputs.audio_tokens = pack_audio_latents(latents[None]).to("cpu", torch.float32)  # [1, T, C * M]
