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
                in_context=shape.in_context,
            )

            def predict(inp, *, inference: bool = False):
                return transformer_forward(
                    model, video_tokens=inp.video_noisy, audio_tokens=inp.audio_noisy, text=text,
                    video_sigma=inp.video_sigma, audio_sigma=inp.audio_sigma, video_token_sigma=inp.video_token_sigma,
                    latent_frames=inp.latent_frames, latent_height=inp.latent_height, latent_width=inp.latent_width,
                    fps=25.0, in_context=inp.in_context,
                )  # fmt: skip

            out = rollout(replace(inputs), predict, torch.ones(b, dtype=torch.bool), steps=1, sigma_step=0.025)
            del out
    return {"peak_bytes": live.peak_bytes}


def rollout_cost(cfg, configs, shape: TrainShape, lora: LoraSpec, dtype: str, attention: str, cache: MeasureCache):
    """`Rollout` for `cfg.scheduled_sampling` (None when it is off), its forward measured once and cached."""
    ss = cfg.scheduled_sampling
    if not ss.enabled:
        return None
    key = {"family": configs.family, "transformer": configs.transformer, "shape": shape.key(),
           "lora": lora.__dict__, "dtype": dtype, "attention": attention}  # fmt: skip
    raw = cache.get(
        "rollout-forward",
        key,
        lambda: measure_rollout_forward(configs.transformer, shape, lora, compute_dtype=dtype, attention=attention),
    )
    # Each micro-batch rolls out when any of its samples drew the rollout: `steps` forwards, with that probability.
    p_any = 1.0 - (1.0 - ss.probability) ** shape.batch
    return Rollout(peak_bytes=raw["peak_bytes"], forwards_per_step=ss.steps * p_any, steps=ss.steps)


# --------------------------------------------------------------------------------------------------------------------
# CREPA (method/modes/crepa.py): the projection head in the train phase, DINOv2 in the latent-cache phase, the cached
# features on disk and in each batch.

# The released DINOv2 checkpoints' architecture (facebook/dinov2-* config.json), so a plan needs no download; a local
# folder or a hub-cache entry is read instead when there is one.
DINOV2_CONFIGS = {
    "facebook/dinov2-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "facebook/dinov2-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "facebook/dinov2-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "facebook/dinov2-giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                              "use_swiglu_ffn": True},  # fmt: skip
}


def dinov2_config(encoder: str) -> dict:
    """The Dinov2Config of `crepa.encoder` as a dict: its config.json when present, else the released one."""
    from transformers import Dinov2Config

    from lowvram.errors import ConfigError

    try:
        from lowvram.data.crepa_features import _source

        return Dinov2Config.from_pretrained(_source(encoder)[0], local_files_only=True).to_dict()
    except (OSError, ValueError):
        pass
    if encoder in DINOV2_CONFIGS:
        return Dinov2Config(**DINOV2_CONFIGS[encoder]).to_dict()
    raise ConfigError(
        f"crepa.encoder '{encoder}': not a local DINOv2 folder, not in the hub cache and not a released DINOv2 "
        f"({', '.join(DINOV2_CONFIGS)}): give a folder with config.json + model.safetensors"
    )


def check_crepa_for_run(cfg) -> None:
    """`check_crepa` against the depth of the model version the run trains (from its shipped config, no weights)."""
    if not cfg.crepa.enabled:
        return
    from lowvram.method.modes.crepa import check_crepa
    from lowvram.models.ltx2.checkpoint import run_model_version
    from lowvram.plan.measure import model_configs

    configs = model_configs(cfg.model.family, run_model_version(cfg.model))
    check_crepa(cfg, configs.transformer.get("num_layers", 48), configs.version)
    dinov2_config(cfg.crepa.encoder)


def measure_crepa_head(hidden_size: int, feature_dim: int, shape: TrainShape, *, compute_dtype: str = "bf16",
                       head_dtype: str = "fp32", adjacent_distance: int = 1) -> dict:  # fmt: skip
    """Peak live bytes (parameters and the block's hidden states excluded) of the CREPA term's forward + backward on
    fake tensors: the batch's features on the device, the head's activations, the similarities, their grads and the
    grad it sends into the block's hidden states; and the head's FLOPs."""
    from lowvram.fakemem import LiveBytes, fake_mode, register_module_storages
    from lowvram.models.crepa import CrepaHead, crepa_term

    dtype, hdtype = _dtype(compute_dtype), _dtype(head_dtype)
    b, t = shape.batch, shape.latent_frames
    n = shape.latent_height * shape.latent_width
    with fake_mode():
        head = CrepaHead(hidden_size, feature_dim, dtype=hdtype)
        hidden = torch.empty(b, t * n, hidden_size, dtype=dtype, requires_grad=True)
        live = LiveBytes()
        register_module_storages(live, head)
        with live:
            live.enter_section("crepa")
            features = torch.empty(b, t, n, feature_dim, dtype=dtype)  # copied to the device with the batch
            out = head(hidden.to(hdtype)).view(b, t, n, feature_dim)
            crepa_term(out, features, adjacent_distance, 1.0).backward()
            del out, features
    return {"peak_bytes": live.peak_bytes, "flops": sum(live.flops.values())}


def measure_dinov2_forward(config: dict, frames: int, image_size: int, *, compute_dtype: str = "bf16") -> dict:
    """Parameters and no-grad forward peak (parameters excluded) of DINOv2 on `frames` frames, on fake tensors."""
    from transformers import Dinov2Config, Dinov2Model

    from lowvram.fakemem import LiveBytes, fake_mode, register_module_storages

    dtype = _dtype(compute_dtype)
    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**config)).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    with fake_mode():
        model = model.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, model)
        with live, torch.no_grad():
            live.enter_section("dinov2")
            x = torch.empty(frames, 3, image_size, image_size, dtype=dtype)
            out = model(pixel_values=x).last_hidden_state
            del out, x
    return {"params": params, "peak_bytes": live.peak_bytes}


def crepa_cost(cfg, configs, shape: TrainShape, dtype: str, cache: MeasureCache):
    """`budget.Crepa` for `cfg.crepa` (None when it is off), measured once per shape and cached."""
    from lowvram.data.crepa_features import feature_bytes_per_item
    from lowvram.method.modes.crepa import check_crepa
    from lowvram.models.crepa import head_params, hidden_size_of
    from lowvram.plan.budget import CACHE_ITEM_BYTES, Crepa

    c = cfg.crepa
    if not c.enabled:
        return None
    check_crepa(cfg, configs.transformer.get("num_layers", 48), configs.version)
    dino = dinov2_config(c.encoder)
    dim, hidden = int(dino["hidden_size"]), hidden_size_of(configs.transformer)
    head_dtype = "bf16" if cfg.optim.optimizer == "adamw_bf16" else "fp32"
    key = {"hidden": hidden, "dim": dim, "shape": shape.__dict__, "dtype": dtype, "head_dtype": head_dtype,
           "d": c.adjacent_distance}  # fmt: skip
    head = cache.get("crepa-head", key, lambda: measure_crepa_head(
        hidden, dim, shape, compute_dtype=dtype, head_dtype=head_dtype, adjacent_distance=c.adjacent_distance))
    enc_key = {"dinov2": dino, "frames": shape.latent_frames, "image_size": c.image_size, "dtype": dtype}
    enc = cache.get("crepa-dinov2", enc_key, lambda: measure_dinov2_forward(
        dino, shape.latent_frames, c.image_size, compute_dtype=dtype))  # fmt: skip
    return Crepa(
        head_params=head_params(hidden, dim),
        head_peak_bytes=head["peak_bytes"],
        head_flops=head["flops"],
        feature_item_bytes=feature_bytes_per_item(shape.latent_frames, shape.latent_height, shape.latent_width, dim,
                                                  CACHE_ITEM_BYTES),  # fmt: skip
        encoder_params=enc["params"],
        encoder_peak_bytes=enc["peak_bytes"],
    )
