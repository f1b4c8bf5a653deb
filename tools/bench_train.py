"""Throughput of lowvram's training step against a plain diffusers + peft loop on the same tiny model and data.

Both loops train the same LoRA (same targets, rank, seed, optimizer, grad clipping) on the same cached batches.
Rounds alternate between the two so machine load hits both alike; the best round of each is compared.
Last line: `throughput_ratio=X` (ours / plain steps per second; >= 0.95 is the goal).

    python tools/bench_train.py [--steps 30] [--rounds 5] [--batch 2] [--checkpointing] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build(seed: int, rank: int):
    from lowvram.method.lora import inject_lora
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_component("transformer", tiny_configs()["transformer"]).requires_grad_(False)
        inject_lora(model, rank=rank)
    return model.train()


def samples(n: int, frames: int, h: int, w: int):
    from lowvram.train.batches import CachedSample

    g = torch.Generator().manual_seed(0)
    return [
        CachedSample(
            video=torch.randn(frames * h * w, 8, generator=g),
            audio=torch.randn(frames * 8 + 1, 4, generator=g),
            text_video=torch.randn(32, 16, generator=g),
            text_audio=torch.randn(32, 16, generator=g),
            text_mask=torch.ones(32, dtype=torch.long),
            latent_frames=frames,
            latent_height=h,
            latent_width=w,
        )
        for _ in range(n)
    ]


def ours(model, data, args):
    """lowvram's loop: objective (logit-normal σ, first-frame conditioning, masked loss), clip, AdamW, schedule."""
    from lowvram.config import OptimSection
    from lowvram.method.objective import ObjectiveConfig
    from lowvram.train.batches import CachedBatches
    from lowvram.train.loop import TrainContext, train
    from lowvram.train.optim import build_lr_scheduler, build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimSection(learning_rate=1e-4)
    opt = build_optimizer(params, optim)
    ctx = TrainContext(
        transformer=model,
        params=params,
        optimizer=opt,
        scheduler=build_lr_scheduler(opt, optim, 10**6),
        batches=CachedBatches(data, args.batch, seed=0),
        objective=ObjectiveConfig(),
        generator=torch.Generator().manual_seed(0),
        audio_channels=4,
        video_channels=8,
        max_grad_norm=1.0,
    )
    losses = []

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        train(ctx, start_step=0, total_steps=steps, on_step=lambda step, r, s: losses.append(r.loss))
        return time.perf_counter() - t0

    return run


def plain(model, data, args):
    """What a diffusers + peft training script does: uniform σ, per-sample timestep, MSE on velocity, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    batches = [data[i : i + b] for i in range(0, len(data) - b + 1, b)]
    state = {"i": 0}

    def step() -> float:
        items = batches[state["i"] % len(batches)]
        state["i"] += 1
        video = torch.stack([s.video for s in items])
        audio = torch.stack([s.audio for s in items])
        sigma = torch.rand(b, generator=g)
        a_sigma = torch.rand(b, generator=g)
        noise, a_noise = torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)
        x = (1 - sigma.view(-1, 1, 1)) * video + sigma.view(-1, 1, 1) * noise
        xa = (1 - a_sigma.view(-1, 1, 1)) * audio + a_sigma.view(-1, 1, 1) * a_noise
        first = items[0]
        pred, a_pred = model(
            hidden_states=x,
            audio_hidden_states=xa,
            encoder_hidden_states=torch.stack([s.text_video for s in items]),
            audio_encoder_hidden_states=torch.stack([s.text_audio for s in items]),
            encoder_attention_mask=torch.stack([s.text_mask for s in items]),
            audio_encoder_attention_mask=torch.stack([s.text_mask for s in items]),
            timestep=sigma * 1000,
            audio_timestep=a_sigma * 1000,
            sigma=sigma * 1000,
            audio_sigma=a_sigma * 1000,
            num_frames=first.latent_frames,
            height=first.latent_height,
            width=first.latent_width,
            fps=25.0,
            audio_num_frames=audio.shape[1],
            use_cross_timestep=False,
            return_dict=False,
        )
        loss = torch.nn.functional.mse_loss(pred, noise - video) + torch.nn.functional.mse_loss(a_pred, a_noise - audio)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--frames", type=int, default=3, help="latent frames")
    ap.add_argument("--size", type=int, default=4, help="latent height and width")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both loops")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = samples(8, args.frames, args.size, args.size)
    models = {name: build(0, args.rank) for name in ("ours", "plain")}
    if args.checkpointing:
        for m in models.values():
            m.enable_gradient_checkpointing()
    runners = {"ours": ours(models["ours"], data, args), "plain": plain(models["plain"], data, args)}
    for run in runners.values():
        run(3)  # warm-up: first calls allocate and initialise optimizer state
    best = {name: float("inf") for name in runners}
    for r in range(args.rounds):
        for name in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            best[name] = min(best[name], runners[name](args.steps))
    sps = {name: args.steps / best[name] for name in runners}
    tokens = args.frames * args.size * args.size
    print(
        f"tiny LTX-2 transformer, {tokens} video tokens, batch {args.batch}, LoRA r{args.rank}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, {args.threads} thread(s), "
        f"best of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"ours:  {sps['ours']:.2f} steps/s")
    print(f"plain: {sps['plain']:.2f} steps/s (diffusers + peft loop)")
    print(f"throughput_ratio={sps['ours'] / sps['plain']:.3f}")


if __name__ == "__main__":
    main()
