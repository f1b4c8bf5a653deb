"""The loop's behaviour on the tiny transformer: what trains, accumulation, modes, metrics, TREAD routing."""

import pytest
import torch

from lowvram.config import RunConfig, TreadRoute
from lowvram.method.objective import ObjectiveConfig
from lowvram.method.tread import TreadRouter
from lowvram.train.batches import CachedBatches, CachedSample
from lowvram.train.loop import TrainContext, fit, forward_loss, read_metrics


def tiny_transformer(seed: int = 0, lora: bool = True) -> torch.nn.Module:
    from lowvram.method.lora import inject_lora
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_component("transformer", tiny_configs()["transformer"]).requires_grad_(False)
        if lora:
            inject_lora(model, rank=4)
            for name, p in model.named_parameters():
                if "lora_B" in name:  # non-zero B so LoRA A gets gradients from the first step
                    p.data.normal_(0, 0.1)
    return model.train()


def tiny_samples(n=4, audio=True, frames=3, h=2, w=2):
    g = torch.Generator().manual_seed(1)
    return [
        CachedSample(
            video=torch.randn(frames * h * w, 8, generator=g),
            audio=torch.randn(5, 4, generator=g) if audio else None,
            text_video=torch.randn(8, 16, generator=g),
            text_audio=torch.randn(8, 16, generator=g),
            text_mask=torch.ones(8, dtype=torch.long),
            latent_frames=frames,
            latent_height=h,
            latent_width=w,
        )
        for _ in range(n)
    ]


def context(model, samples, batch_size=2, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainContext(
        transformer=model,
        params=params,
        optimizer=torch.optim.SGD(params, lr=0.0),
        scheduler=None,
        batches=CachedBatches(samples, batch_size, seed=0),
        objective=kw.pop("objective", ObjectiveConfig()),
        generator=torch.Generator().manual_seed(0),
        audio_channels=4,
        video_channels=8,
        **kw,
    )


def config(run_dir, **train):
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "lora": {"rank": 4},
            "optim": {"learning_rate": 1e-3},
            "train": {"batch_size": 2, "max_train_steps": 3, "seed": 0, **train},
            "checkpoint": {"every_n_steps": 0},
            "output": {"output_dir": str(run_dir)},
        }
    )


def test_only_lora_parameters_train_and_metrics_has_one_record_per_step(tmp_path):
    model = tiny_transformer(lora=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(config(tmp_path), model, CachedBatches(tiny_samples(), 2, seed=0), run_dir=tmp_path)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad
        else:
            original = base[name.replace(".base_layer", "")]  # peft moves the wrapped weight under base_layer
            assert not p.requires_grad and p.grad is None and torch.equal(p, original), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] == pytest.approx(1e-3) and r["s_per_step"] > 0 for r in records)


def test_gradient_accumulation_averages_micro_batch_gradients():
    samples = tiny_samples(2)
    model = tiny_transformer()
    ctx = context(model, samples, batch_size=1, accumulation_steps=2)
    # Reference: the two micro-batches' losses, averaged, with the same noise draws.
    ref_ctx = context(model, samples, batch_size=1)
    loss = sum(forward_loss(ref_ctx, next(ref_ctx.batches)).total for _ in range(2)) / 2
    loss.backward()
    expected = [p.grad.clone() for p in ctx.params]
    model.zero_grad()
    for _ in range(2):
        (forward_loss(ctx, next(ctx.batches)).total / 2).backward()
    for got, want in zip([p.grad for p in ctx.params], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_video_mode_trains_without_audio_latents(tmp_path):
    model = tiny_transformer(lora=False)
    fit(config(tmp_path, mode="video"), model, CachedBatches(tiny_samples(audio=False), 2, seed=0), run_dir=tmp_path)
    records = read_metrics(tmp_path)
    assert all(r["loss_audio"] == 0.0 and r["loss_video"] > 0 for r in records)
    # Video mode leaves the audio-only attention modules without LoRA.
    assert not any("audio_attn1" in n and ".lora_" in n for n, _ in model.named_parameters())


def test_audio_mode_masks_the_video_loss(tmp_path):
    fit(
        config(tmp_path, mode="audio"),
        tiny_transformer(lora=False),
        CachedBatches(tiny_samples(), 2, seed=0),
        run_dir=tmp_path,
    )
    assert all(r["loss_video"] == 0.0 and r["loss_audio"] > 0 for r in read_metrics(tmp_path))


def _block_token_counts(model):
    seen = []

    def hook(module, args, kwargs):
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append(hs.shape[1])

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.transformer_blocks]
    return seen, handles


def test_tread_routes_a_share_of_video_tokens_around_the_chosen_blocks():
    model = tiny_transformer()
    router = TreadRouter(model, [TreadRoute(selection_ratio=0.5, start_layer_idx=1, end_layer_idx=-1)])
    seen, handles = _block_token_counts(model)  # registered after the router: sees the routed inputs
    ctx = context(model, tiny_samples(frames=3, h=2, w=4))  # 24 video tokens
    parts = forward_loss(ctx, next(ctx.batches))
    parts.total.backward()
    assert seen == [24, 12]
    assert torch.isfinite(parts.total)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.params)
    seen.clear()
    model.eval()
    with torch.no_grad():
        forward_loss(ctx, next(ctx.batches))
    assert seen == [24, 24]  # inference is never routed
    router.remove()
    for h in handles:
        h.remove()


def test_tread_gives_the_same_gradients_with_and_without_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer()
        if checkpointing:
            model.enable_gradient_checkpointing()
        TreadRouter(model, [TreadRoute(selection_ratio=0.5, start_layer_idx=0, end_layer_idx=0)])
        ctx = context(model, tiny_samples(frames=3, h=2, w=4))
        torch.manual_seed(3)
        forward_loss(ctx, next(ctx.batches)).total.backward()
        grads.append([p.grad.clone() for p in ctx.params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_tread_route_outside_the_model_is_refused():
    from lowvram.errors import LowvramError

    with pytest.raises(LowvramError, match="outside the model"):
        TreadRouter(tiny_transformer(), [TreadRoute(selection_ratio=0.5, start_layer_idx=0, end_layer_idx=5)])


def test_the_same_loop_trains_under_block_swap_on_the_simulated_device(tmp_path):
    from lowvram.device_sim import SimBackend
    from lowvram.train.loop import MemoryDecision

    results = {}
    for name, memory in (("plain", {}), ("swap", {"blocks_to_swap": 1, "gradient_checkpointing": True})):
        cfg = config(tmp_path / name, mixed_precision="fp32")
        cfg = RunConfig.model_validate({**cfg.model_dump(), "memory": {**cfg.memory.model_dump(), **memory}})
        model = tiny_transformer(lora=False)
        sim = SimBackend()
        with sim.session():
            fit(
                cfg,
                model,
                CachedBatches(tiny_samples(), 2, seed=0),
                run_dir=tmp_path / name,
                backend=sim,
                decision=MemoryDecision(cfg=cfg, fits=True),
            )
        results[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(r["peak_vram_bytes"] > 0 for r in read_metrics(tmp_path / name))
        assert (sim.stats().h2d_bytes > 0) == (name == "swap")  # the swapped block really streamed in
    for n, p in results["plain"].items():
        torch.testing.assert_close(results["swap"][n], p)
