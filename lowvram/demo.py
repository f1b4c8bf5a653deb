"""The embedded default run: `lowvram train` with no config trains the tiny LTX-2 on synthetic clips on CPU.

Moving coloured shapes with captions and a tone each, written into the run folder, cached, trained for ~100 steps;
it shows the whole pipeline working in about a minute. It proves nothing about the real 19B model's memory.
"""

from __future__ import annotations

from pathlib import Path

from lowvram.config import RunConfig

DEMO_CLIPS = 8
DEMO_SIZE = 64  # pixels: 2x2 latent tokens per frame with the real 32x VAE compression
DEMO_FRAMES = 17  # 3 latent frames


def default_demo_config(output_dir: str | Path) -> RunConfig:
    """The demo's settings: tiny model, synthetic dataset inside the run folder, 100 fp32 CPU steps."""
    output_dir = Path(output_dir)
    return RunConfig.model_validate(
        {
            "model": {"family": "tiny", "precision": "fp32"},
            "data": {
                "dataset_dir": str(output_dir / "dataset"),
                "resolution": f"{DEMO_SIZE}x{DEMO_SIZE}",
                "frames": DEMO_FRAMES,
                "fps": 25.0,
                "audio": True,
                "max_text_tokens": 32,
            },
            "lora": {"rank": 8, "alpha": 8.0},
            # A high LR: the demo should show the loss falling within 100 steps of a 2-layer model.
            "optim": {"optimizer": "adamw", "learning_rate": 2e-3, "lr_warmup_steps": 5, "max_grad_norm": 1.0},
            "train": {
                "batch_size": 2,
                "max_train_steps": 100,
                "seed": 42,
                "mixed_precision": "fp32",
                # Fixed first-frame conditioning keeps the per-step loss comparable; σ stays random.
                "first_frame_conditioning_p": 0.5,
            },
            "checkpoint": {"every_n_steps": 50, "keep_last": 1},
            "output": {"output_dir": str(output_dir)},
        }
    )


def prepare_demo_dataset(cfg: RunConfig) -> Path:
    """Write the synthetic clips into `data.dataset_dir` unless they are already there (a re-run reuses them)."""
    from lowvram.data.synthetic import make_synthetic_dataset

    folder = Path(cfg.data.dataset_dir)
    if len(list(folder.glob("*.mp4"))) < DEMO_CLIPS:
        width, height = cfg.data.width_height
        make_synthetic_dataset(
            folder,
            n_clips=DEMO_CLIPS,
            width=width,
            height=height,
            frames=cfg.data.frames,
            fps=int(cfg.data.fps),
            seed=0,
            audio=cfg.data.audio,
        )
    return folder


def is_demo(cfg: RunConfig) -> bool:
    return (
        cfg.model.family == "tiny"
        and cfg.model.checkpoint is None
        and cfg.data.dataset_dir is not None
        and Path(cfg.data.dataset_dir) == Path(cfg.output.output_dir) / "dataset"
    )
