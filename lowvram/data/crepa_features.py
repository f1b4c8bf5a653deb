"""CREPA's frozen DINOv2 frame features, computed while the latent cache is built and stored in the same entry.

DINOv2 is transformers' `Dinov2Model`, loaded from `crepa.encoder` (a local folder, or a hub id already in the hub
cache: nothing is downloaded, safetensors only). Each latent frame k is represented by pixel frame
linspace(0, F-1, F')[k] (SimpleTuner's temporal alignment: 0, 8, 16 for 17 frames, the last frame each causal latent
frame covers). The frame is resized to image_size x image_size and normalized with ImageNet statistics (what DINOv2
was trained on); its patch tokens (final LayerNorm, class token dropped) are resampled bilinearly from DINOv2's patch
grid onto the latent grid H' x W', so the cache holds exactly [F', H'*W', D] per clip, token-aligned with the packed
video latents. (SimpleTuner resamples the flattened token sequence 1-D when the two counts differ and the grids are
not square; a 2-D resample keeps each latent token on the image region it covers.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES_KEY = "crepa_features"


def _source(encoder: str) -> tuple[str, bool]:
    """(what from_pretrained is given, whether it is a local folder)."""
    path = Path(encoder).expanduser()
    return (str(path), True) if path.is_dir() else (encoder, False)


def _missing(encoder: str, err: Exception) -> ConfigError:
    first = (str(err).splitlines() or [""])[0][:200]
    return ConfigError(
        f"crepa.encoder '{encoder}': no DINOv2 safetensors found as a local folder or in the hub cache ({first}); "
        f"give a folder with config.json + model.safetensors, or fetch it: hf download {encoder}"
    )


def feature_dim(encoder: str) -> int:
    """The DINOv2 width (the CREPA head's output size), from the encoder's config.json only."""
    from transformers import Dinov2Config

    source, _ = _source(encoder)
    try:
        return int(Dinov2Config.from_pretrained(source, local_files_only=True).hidden_size)
    except (OSError, ValueError) as err:
        raise _missing(encoder, err) from None


def load_encoder(encoder: str, dtype: torch.dtype = torch.float32):
    """The frozen Dinov2Model (eval, no grad), from safetensors only, never downloaded here."""
    from transformers import Dinov2Model

    source, _ = _source(encoder)
    try:
        model = Dinov2Model.from_pretrained(source, local_files_only=True, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _missing(encoder, err) from None
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class CrepaFeatureEncoder:
    """What the latent cache runs for CREPA: the DINOv2 model and the frame size it sees."""

    model: torch.nn.Module
    image_size: int
    fingerprint: str

    @classmethod
    def build(cls, model: torch.nn.Module, image_size: int) -> CrepaFeatureEncoder:
        from lowvram.data.fingerprint import module_fingerprint

        return cls(model, image_size, f"{module_fingerprint(model)}:{image_size}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, latent_frames: int, latent_height: int, latent_width: int) -> torch.Tensor:
        """Features [B, F', H'*W', D] (float32, on the host) of clips `video` [B, 3, F, H, W] in [-1, 1]."""
        param = next(self.model.parameters())
        b, _, frames = video.shape[:3]
        index = torch.linspace(0, frames - 1, latent_frames).long()
        picked = video[:, :, index].transpose(1, 2).flatten(0, 1)  # [B*F', 3, H, W]
        x = (picked.float() + 1.0) * 0.5
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((x - mean.to(x.device)) / std.to(x.device)).to(param.device, param.dtype)
        tokens = self.model(pixel_values=x).last_hidden_state[:, 1:]  # patch tokens after the final LayerNorm
        patch = self.model.config.patch_size
        grid = self.image_size // patch
        d = tokens.shape[-1]
        tokens = tokens.float().transpose(1, 2).reshape(b * latent_frames, d, grid, grid)
        tokens = F.interpolate(tokens, size=(latent_height, latent_width), mode="bilinear", align_corners=False)
        return tokens.flatten(2).transpose(1, 2).reshape(b, latent_frames, latent_height * latent_width, d).cpu()


def feature_bytes_per_item(latent_frames: int, latent_height: int, latent_width: int, dim: int,
                           dtype_bytes: int = 2) -> int:  # fmt: skip
    """Disk (and host) bytes of one clip's cached features: [F', H'*W', D] in the cache dtype."""
    return latent_frames * latent_height * latent_width * dim * dtype_bytes
