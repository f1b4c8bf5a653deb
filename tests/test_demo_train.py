"""The embedded default run: synthetic clips -> caches -> tiny model trained on CPU -> LoRA, metrics, memory files."""

import json

import pytest
import torch
from safetensors import safe_open

from lowvram.config import apply_overrides
from lowvram.demo import default_demo_config, is_demo
from lowvram.train.loop import read_metrics
from lowvram.train.run import run_train


def _check_run_folder(out, steps: int) -> None:
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all({"loss", "lr", "s_per_step"} <= m.keys() for m in metrics)
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    phases = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    names = {p["name"] for p in phases if p["type"] == "phase"}
    assert {"text_cache", "latent_cache", "load_transformer", "train"} <= names


def test_demo_config_is_the_tiny_model_on_a_dataset_inside_the_run_folder(tmp_path):
    cfg = default_demo_config(tmp_path / "out")
    assert is_demo(cfg) and cfg.model.family == "tiny"
    assert cfg.data.dataset_dir == str(tmp_path / "out" / "dataset")
    assert cfg.train.max_train_steps == 100


def test_demo_trains_with_falling_loss_and_writes_lora_metrics_memory_and_a_validation_clip(tmp_path):
    import av

    threads = torch.get_num_threads()
    out = tmp_path / "out"
    # Fewer steps than the real demo keep the test short; the loss must still visibly fall.
    cfg = apply_overrides(
        default_demo_config(out),
        {
            "train.max_train_steps": 40,
            "validation.enabled": True,
            "validation.resolution": "64x64",
            "validation.num_frames": 9,
            "validation.num_inference_steps": 2,
            "validation.guidance": 1.0,
            "validation.every_n_steps": 20,
        },
    )
    try:
        assert run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(list((out / "dataset").glob("*.mp4"))) == 8
    _check_run_folder(out, 40)
    # A folder of clips + prompt sidecars per validation (issue 19); the last step is not rendered twice.
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-20", "step-40"]
    assert sorted(p.name for p in (out / "validation" / "step-40").iterdir()) == ["00.json", "00.mp4"]
    assert json.loads((out / "validation" / "step-40" / "00.json").read_text())["prompt"] == cfg.validation.prompt
    with av.open(str(out / "validation" / "step-40" / "00.mp4")) as clip:
        assert clip.streams.video and clip.streams.audio
        frames = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


@pytest.mark.slow
def test_lowvram_train_without_config_runs_the_full_demo(tmp_path, cli):
    out = tmp_path / "OUT"
    result = cli("train", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    _check_run_folder(out, 100)


@pytest.mark.slow
def test_training_from_an_official_layout_checkpoint_with_an_int8_base(tmp_path):
    from lowvram.demo import prepare_demo_dataset
    from lowvram.models.ltx2 import save_tiny_checkpoint

    threads = torch.get_num_threads()
    checkpoint = save_tiny_checkpoint(tmp_path / "model")
    cfg = apply_overrides(
        default_demo_config(tmp_path / "out"),
        {
            "model.checkpoint": str(checkpoint),
            "model.text_encoder_path": str(tmp_path / "model" / "gemma"),
            "model.precision": "int8-quanto",
            "data.dataset_dir": str(tmp_path / "clips"),
            "train.max_train_steps": 3,
        },
    )
    prepare_demo_dataset(cfg)
    try:
        assert run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]
