"""Resume is bit-identical: N steps straight == N/2 steps, a checkpoint, a fresh process state, N/2 more."""

import torch

from lowvram.config import RunConfig
from lowvram.train.batches import CachedBatches, CachedSample
from lowvram.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from lowvram.train.loop import fit, read_metrics


def tiny_transformer(seed: int = 0) -> torch.nn.Module:
    from lowvram.models.ltx2 import build_component, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_component("transformer", tiny_configs()["transformer"]).eval().requires_grad_(False)


def tiny_samples(n: int = 4) -> list[CachedSample]:
    g = torch.Generator().manual_seed(123)
    return [
        CachedSample(
            video=torch.randn(12, 8, generator=g),
            audio=torch.randn(5, 4, generator=g),
            text_video=torch.randn(8, 16, generator=g),
            text_audio=torch.randn(8, 16, generator=g),
            text_mask=torch.ones(8, dtype=torch.long),
            latent_frames=3,
            latent_height=2,
            latent_width=2,
            fps=25.0,
        )
        for _ in range(n)
    ]


def batches(samples: list[CachedSample]) -> CachedBatches:
    return CachedBatches(samples, batch_size=2, seed=7)


def tiny_config(run_dir, steps: int, resume: str | None = None, optimizer: str = "adamw") -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny"},
            "lora": {"rank": 4, "dropout": 0.1},  # dropout draws from the global RNG: resume must restore it
            "optim": {"optimizer": optimizer, "learning_rate": 1e-3, "lr_warmup_steps": 2, "lr_scheduler": "cosine"},
            "train": {"batch_size": 2, "max_train_steps": steps, "seed": 7, "mixed_precision": "fp32"},
            "checkpoint": {"every_n_steps": 2, "keep_last": 2, "resume": resume},
            "output": {"output_dir": str(run_dir)},
        }
    )


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _straight_and_resumed(tmp_path, optimizer: str):
    samples = tiny_samples(3)  # 3 samples, batch 2: epochs roll over mid-run, exercising the data position
    straight = tiny_transformer()
    fit(tiny_config(tmp_path / "a", 6, optimizer=optimizer), straight, batches(samples), run_dir=tmp_path / "a")

    first = tiny_transformer()
    fit(
        tiny_config(tmp_path / "b", 6, optimizer=optimizer),
        first,
        batches(samples),
        run_dir=tmp_path / "b",
        stop_after=3,
    )
    torch.manual_seed(999)  # a resumed process starts from different global RNG state
    resumed = tiny_transformer()
    fit(
        tiny_config(tmp_path / "b", 6, resume="latest", optimizer=optimizer),
        resumed,
        batches(samples),
        run_dir=tmp_path / "b",
    )
    return straight, resumed


def test_resume_continues_bit_identically(tmp_path):
    straight, resumed = _straight_and_resumed(tmp_path, "adamw")
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


def test_resume_with_bf16_adamw_is_bit_identical_too(tmp_path):
    straight, resumed = _straight_and_resumed(tmp_path, "adamw_bf16")
    for name, t in lora_tensors(straight).items():
        assert torch.equal(t, lora_tensors(resumed)[name]), name


def test_training_leaves_verified_checkpoints_pruned_to_keep_last(tmp_path):
    fit(tiny_config(tmp_path, 5), tiny_transformer(), batches(tiny_samples()), run_dir=tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000004", "step-00000005"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-00000005"
