"""Tiny LTX-2 transformer and Gemma3 inputs for quantization tests and the exclude-list error report (CPU, fp32).

Uses the models helper's tiny configs and training forward; holds no test assertions and no real weights.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_transformer(seed: int = 0) -> nn.Module:
    """The real diffusers LTX2VideoTransformer3DModel at tiny size, random init drawn from `seed`, fp32, eval."""
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_component("transformer", tiny_configs()["transformer"]).eval()


def tiny_transformer_factory():
    """A zero-argument constructor of the tiny transformer, for `build_empty`."""
    from lowvram.models.ltx2 import build_component, tiny_configs

    config = tiny_configs()["transformer"]
    return lambda: build_component("transformer", config)


def tiny_text_encoder(seed: int = 0) -> nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_component("text_encoder", tiny_configs()["text_encoder"]).eval()


def tiny_text_encoder_factory():
    from lowvram.models.ltx2 import build_component, tiny_configs

    config = tiny_configs()["text_encoder"]
    return lambda: build_component("text_encoder", config)


def transformer_inputs(seed: int = 0, batch: int = 2) -> dict:
    """Keyword arguments of `lowvram.models.ltx2.transformer_forward` for the tiny transformer (2x2x2 latents)."""
    from lowvram.models.ltx2 import TextEmbeddings

    g = torch.Generator().manual_seed(seed)
    frames, height, width, text_len = 2, 2, 2, 8
    return dict(
        video_tokens=torch.randn(batch, frames * height * width, 8, generator=g),
        audio_tokens=torch.randn(batch, 4, 4, generator=g),
        text=TextEmbeddings(
            video=torch.randn(batch, text_len, 16, generator=g),
            audio=torch.randn(batch, text_len, 16, generator=g),
            mask=torch.ones(batch, text_len),
        ),
        video_sigma=torch.rand(batch, generator=g),
        audio_sigma=torch.rand(batch, generator=g),
        latent_frames=frames,
        latent_height=height,
        latent_width=width,
        fps=24.0,
    )


def run_transformer(transformer: nn.Module, inputs: dict) -> torch.Tensor:
    """Video and audio predictions of one call, flattened and concatenated (one tensor to compare)."""
    from lowvram.models.ltx2 import transformer_forward

    video, audio = transformer_forward(transformer, **inputs)
    return torch.cat([video.flatten(), audio.flatten()])


def text_encoder_hidden_states(text_encoder: nn.Module, seed: int = 0) -> torch.Tensor:
    """All hidden states of the tiny Gemma3 on random token ids, stacked (what the connectors read)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 256, (2, 12), generator=g)
    out = text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return torch.stack(out.hidden_states, dim=-1)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))
