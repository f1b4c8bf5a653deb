"""A tiny LTX-2 LoRA training step for proving offload strategies: model, batch, one step, the LoRA gradients.

Used by the offload tests, tools/bench_offload.py and tools/gpu_check.py. It is not the training loop (train/loop.py
is); it only makes every strategy run the same real forward/backward that training runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowvram.device import Backend

PRECISIONS = ("fp32", "int8-quanto", "int8-torchao")


def tiny_lora_transformer(
    precision: str = "fp32",
    *,
    num_layers: int = 4,
    seed: int = 0,
    rank: int = 4,
    config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The tiny LTX-2 transformer (real diffusers class) quantized as asked, with LoRA on the attention projections.

    LoRA B starts random (not zero) so every LoRA weight gets a non-zero gradient to compare.
    """
    from lowvram.models.ltx2 import build_component, tiny_configs

    cfg = {**tiny_configs()["transformer"], **(config or {}), "num_layers": num_layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_component("transformer", cfg).eval().requires_grad_(False)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
        if precision != "fp32":
            from lowvram.quant.backends import quantize_model
            from lowvram.quant.exclude import LTX2_TRANSFORMER_EXCLUDE

            quantize_model(transformer, precision, LTX2_TRANSFORMER_EXCLUDE)
        from lowvram.method.lora import inject_lora

        inject_lora(transformer, rank=rank)
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.data.normal_(0.0, 0.05)
    return transformer


@dataclass(frozen=True)
class TinyBatch:
    video: torch.Tensor  # [B, S_v, C]
    audio: torch.Tensor  # [B, S_a, C_a]
    text_video: torch.Tensor
    text_audio: torch.Tensor
    mask: torch.Tensor
    sigma: torch.Tensor
    target_video: torch.Tensor
    target_audio: torch.Tensor
    frames: int
    height: int
    width: int


def tiny_batch(
    transformer: nn.Module,
    *,
    batch: int = 1,
    frames: int = 2,
    height: int = 2,
    width: int = 2,
    audio_tokens: int = 4,
    text_tokens: int = 8,
    seed: int = 1,
) -> TinyBatch:
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    s_v = frames * height * width

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return TinyBatch(
        video=rand(batch, s_v, cfg.in_channels),
        audio=rand(batch, audio_tokens, cfg.audio_in_channels),
        text_video=rand(batch, text_tokens, cfg.caption_channels),
        text_audio=rand(batch, text_tokens, cfg.caption_channels),
        mask=torch.ones(batch, text_tokens),
        sigma=torch.rand(batch, generator=g),
        target_video=rand(batch, s_v, cfg.out_channels),
        target_audio=rand(batch, audio_tokens, cfg.audio_out_channels),
        frames=frames,
        height=height,
        width=width,
    )


def lora_step(transformer: nn.Module, batch: TinyBatch, backend: Backend) -> torch.Tensor:
    """Forward + flow-matching-style MSE + backward on the device; returns the loss. Gradients land in `.grad`."""
    from lowvram.models.ltx2 import TextEmbeddings, transformer_forward

    def dev(t: torch.Tensor) -> torch.Tensor:
        return backend.to_device(t)

    text = TextEmbeddings(video=dev(batch.text_video), audio=dev(batch.text_audio), mask=dev(batch.mask))
    sigma = dev(batch.sigma)
    video_pred, audio_pred = transformer_forward(
        transformer,
        video_tokens=dev(batch.video),
        audio_tokens=dev(batch.audio),
        text=text,
        video_sigma=sigma,
        audio_sigma=sigma,
        latent_frames=batch.frames,
        latent_height=batch.height,
        latent_width=batch.width,
        fps=25.0,
    )
    loss = (video_pred - dev(batch.target_video)).pow(2).mean() + (audio_pred - dev(batch.target_audio)).pow(2).mean()
    loss.backward()
    return loss.detach()


def lora_grads(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every LoRA gradient, by parameter name (host side)."""
    return {
        name: p.grad.detach().clone()
        for name, p in transformer.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def zero_grads(transformer: nn.Module) -> None:
    for p in transformer.parameters():
        p.grad = None


STRATEGIES = (
    "none",
    "streaming",
    "block_swap_1",
    "block_swap_all_but_one",
    "group_block_level",
    "group_leaf_level",
    "activation_offload",
)


def apply_named_strategy(name: str, transformer: nn.Module, backend: Backend, *, checkpointing: bool, **options):
    """Apply one strategy by its matrix name (checkpointing first, as apply_memory_plan does); returns it or None."""
    from lowvram import offload

    if name == "activation_offload":
        return offload.apply_activation_offload(transformer, backend)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    num_blocks = len(transformer.transformer_blocks)
    if name == "none":
        return None
    if name == "streaming":
        # what `ramtorch: true` streams (apply_memory_plan): the blocks' frozen Linears, as the planner budgets it
        options = {"share": 1.0, "patterns": offload.BLOCK_LINEARS, **options}
        return offload.apply_weight_streaming(transformer, backend, **options)
    if name == "block_swap_1":
        return offload.apply_block_swap(transformer, backend, blocks_to_swap=1, **options)
    if name == "block_swap_all_but_one":
        return offload.apply_block_swap(transformer, backend, blocks_to_swap=num_blocks - 1, **options)
    if name == "group_block_level":
        return offload.apply_group_offload(transformer, backend, offload_type="block_level", **options)
    if name == "group_leaf_level":
        return offload.apply_group_offload(transformer, backend, offload_type="leaf_level", **options)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


# --------------------------------------------------------------------------------------------------------------------
# The planner's side: the same tiny run described as a run config + planner Settings, so the planner's prediction can
# be compared with what the simulated device measures.


def tiny_plan_config(
    precision: str = "fp32", *, rank: int = 4, resolution: str = "64x64", frames: int = 9, text_tokens: int = 8
):
    """A tiny-family run config whose training shape is what `plan_batch` feeds the tiny transformer."""
    from lowvram.config import load_config

    cfg, _ = load_config(
        None,
        {
            "model.family": "tiny",
            "model.precision": precision,
            "train.mixed_precision": "fp32",
            "data.resolution": resolution,
            "data.frames": frames,
            "data.max_text_tokens": text_tokens,
            "lora.rank": rank,
        },
    )
    return cfg


def plan_batch(transformer: nn.Module, cfg, *, seed: int = 1) -> TinyBatch:
    """A batch of the token counts the planner derives from `cfg` (latent frames x height x width, audio, text)."""
    from lowvram.plan.measure import model_configs
    from lowvram.plan.plan import run_shape

    shape = run_shape(cfg, model_configs(cfg.model.family))
    return tiny_batch(
        transformer,
        batch=shape.batch,
        frames=shape.latent_frames,
        height=shape.latent_height,
        width=shape.latent_width,
        audio_tokens=shape.audio_tokens,
        text_tokens=shape.text_tokens,
        seed=seed,
    )


def planned_model_on(backend: Backend, cfg, settings, *, num_layers: int):
    """The tiny LoRA transformer of `num_layers` blocks under `settings`' memory strategy on `backend`, and a batch
    at the shape the planner derives from `cfg` (what the modes' plan-vs-simulated-device checks run)."""
    from types import SimpleNamespace

    from lowvram.offload import apply_memory_plan

    transformer = tiny_lora_transformer("fp32", num_layers=num_layers, rank=cfg.lora.rank)
    memory = {k.split(".", 1)[1]: v for k, v in settings.dotted().items() if k.startswith("memory.")}
    apply_memory_plan(transformer, SimpleNamespace(**memory), backend)
    return transformer, plan_batch(transformer, cfg)


def flow_inputs_on(backend: Backend, batch: TinyBatch, **extra):
    """`batch` on the device as the objective hands it to a mode: (TextEmbeddings, FlowInputs), every token noised
    at the batch's sigma and in the loss; `extra` sets further FlowInputs fields (e.g. IC-LoRA's reference)."""
    from lowvram.method.objective import FlowInputs
    from lowvram.models.ltx2.forward import TextEmbeddings

    d = backend.to_device
    b, s_v, s_a = batch.video.shape[0], batch.video.shape[1], batch.audio.shape[1]
    text = TextEmbeddings(video=d(batch.text_video), audio=d(batch.text_audio), mask=d(batch.mask))
    inputs = FlowInputs(
        video_noisy=d(batch.video), audio_noisy=d(batch.audio), video_target=d(batch.target_video),
        audio_target=d(batch.target_audio), video_sigma=d(batch.sigma), audio_sigma=d(batch.sigma),
        video_token_sigma=d(batch.sigma.view(b, 1).expand(b, s_v).contiguous()),
        video_loss_mask=d(torch.ones(b, s_v)), audio_loss_mask=d(torch.ones(b, s_a)),
        latent_frames=batch.frames, latent_height=batch.height, latent_width=batch.width,
        isolate_modalities=False, train_video=True, train_audio=True, **extra,
    )  # fmt: skip
    return text, inputs


def plan_settings(name: str, precision: str, *, checkpointing: bool, num_blocks: int, share: float = 1.0):
    """The planner's `Settings` for a strategy named as in STRATEGIES (plus `streaming` with a partial `share`)."""
    from lowvram.plan.budget import Settings

    base = {"precision": precision, "gradient_checkpointing": checkpointing}
    if name == "none":
        return Settings(**base)
    if name == "streaming":
        return Settings(**base, offload="ramtorch", ramtorch_share=share)
    if name == "block_swap_1":
        return Settings(**base, offload="block_swap", blocks_to_swap=1)
    if name == "block_swap_all_but_one":
        return Settings(**base, offload="block_swap", blocks_to_swap=num_blocks - 1)
    if name in ("group_block_level", "group_leaf_level"):
        return Settings(**base, offload="group", group_type=name.removeprefix("group_"))
    if name == "activation_offload":
        return Settings(**{**base, "gradient_checkpointing": True}, activation_offload=True)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


def planner_step_peak_bytes(cfg, settings, *, num_layers: int, cache_dir=None) -> int:
    """The planner's predicted device peak of one forward + backward (no optimizer state, no reserve)."""
    from lowvram.plan import predict_peak
    from lowvram.profiles import load_profile

    return predict_peak(cfg, load_profile("cpu"), settings, num_layers=num_layers, cache_dir=cache_dir).step_bytes


def predicted_peak_bytes(baseline_peak_bytes: int, strategy) -> int:
    """The offload side's rough bound (tools/gpu_check.py prints it): the no-offload peak, less what the strategy
    keeps off the device, plus its `working_set_bytes` (an upper bound: it over-counts streaming and group offload
    by 15-45% on the tiny model). The reference prediction is the planner's: `planner_step_peak_bytes`.
    """
    if strategy is None:
        return baseline_peak_bytes
    return baseline_peak_bytes - strategy.offloaded_bytes + strategy.working_set_bytes
