"""What the training modes (method/modes/) cost the plan: scheduled sampling's no-grad rollout forwards.

Measured like the training step (measure.py): the real transformer on fake tensors at the run's shapes, running the
trainer's own rollout. It only measures; budget.py adds the bytes and seconds.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowvram.plan.budget import Rollout
from lowvram.plan.measure import LoraSpec, MeasureCache, TrainShape, _dtype, build_lora_transformer


def measure_rollout_forward(
    transformer_config: dict,
    shape: TrainShape,
    lora: LoraSpec,
    *,
    compute_dtype: str = "bf16",
    attention: str = "flash",
) -> dict:
    """Peak live bytes (parameters excluded) of one rollout step: the step's inputs, the rolled-out latents and one
    no-grad transformer forward. Its peak does not depend on depth (each block's activations die with it), so one
    block is measured."""
    from lowvram.fakemem import LiveBytes, attention_backend, fake_mode, register_module_storages
    from lowvram.method.modes.scheduled_sampling import rollout
    from lowvram.method.objective import FlowInputs
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward

    dtype = _dtype(compute_dtype)
    model = build_lora_transformer(transformer_config, 1, lora, dtype)
    cfg = model.config
    b, s_v, s_a, length = shape.batch, shape.video_tokens, shape.audio_tokens, shape.text_tokens
    with fake_mode():
        model = model.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, model)
        with live, attention_backend(attention), torch.no_grad():
            live.enter_section("rollout")
            text = TextEmbeddings(
                video=torch.empty(b, length, cfg.caption_channels, dtype=dtype),
                audio=torch.empty(b, length, cfg.caption_channels, dtype=dtype),
                mask=torch.ones(b, length, dtype=torch.int64),
            )
            sigma = torch.empty(b)
            inputs = FlowInputs(
                video_noisy=torch.empty(b, s_v, cfg.in_channels, dtype=dtype),
                audio_noisy=torch.empty(b, s_a, cfg.audio_in_channels, dtype=dtype),
                video_target=torch.empty(b, s_v, cfg.in_channels, dtype=dtype),
                audio_target=torch.empty(b, s_a, cfg.audio_in_channels, dtype=dtype),
                video_sigma=sigma,
                audio_sigma=sigma,
                video_token_sigma=torch.empty(b, s_v),
                video_loss_mask=torch.ones(b, s_v),
                audio_loss_mask=torch.ones(b, s_a),
                latent_frames=shape.latent_frames,
                latent_height=shape.latent_height,
                latent_width=shape.latent_width,
                isolate_modalities=False,
                train_video=True,
                train_audio=True,
            )

            def predict(inp, *, inference: bool = False):
                return transformer_forward(
                    model, video_tokens=inp.video_noisy, audio_tokens=inp.audio_noisy, text=text,
                    video_sigma=inp.video_sigma, audio_sigma=inp.audio_sigma, video_token_sigma=inp.video_token_sigma,
                    latent_frames=inp.latent_frames, latent_height=inp.latent_height, latent_width=inp.latent_width,
                    fps=25.0,
                )  # fmt: skip

            out = rollout(replace(inputs), predict, torch.ones(b, dtype=torch.bool), steps=1, sigma_step=0.025)
            del out
    return {"peak_bytes": live.peak_bytes}


def rollout_cost(cfg, configs, shape: TrainShape, lora: LoraSpec, dtype: str, attention: str, cache: MeasureCache):
    """`Rollout` for `cfg.scheduled_sampling` (None when it is off), its forward measured once and cached."""
    ss = cfg.scheduled_sampling
    if not ss.enabled:
        return None
    key = {"family": configs.family, "transformer": configs.transformer, "shape": shape.__dict__,
           "lora": lora.__dict__, "dtype": dtype, "attention": attention}  # fmt: skip
    raw = cache.get(
        "rollout-forward",
        key,
        lambda: measure_rollout_forward(configs.transformer, shape, lora, compute_dtype=dtype, attention=attention),
    )
    # Each micro-batch rolls out when any of its samples drew the rollout: `steps` forwards, with that probability.
    p_any = 1.0 - (1.0 - ss.probability) ** shape.batch
    return Rollout(peak_bytes=raw["peak_bytes"], forwards_per_step=ss.steps * p_any, steps=ss.steps)
