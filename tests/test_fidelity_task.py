"""Issue 12, item 3: the training task is explicit. Text-to-video (the default) has no first-frame conditioning, as
the official t2v_lora.yaml; image-to-video conditions half the samples, as the official i2v_lora.yaml. A stated
probability is honoured; SimpleTuner's `ltx_train_mode` / `ltx_i2v_prob` map to them.
"""

import json

import pytest
import torch

from lowvram.config import RunConfig, config_to_toml, load_config
from lowvram.errors import ConfigError
from lowvram.method.objective import ObjectiveConfig, prepare_inputs


def _p(train: dict) -> float:
    cfg = RunConfig.model_validate({"train": train})
    return ObjectiveConfig.from_train_section(cfg.train).first_frame_conditioning_p


def test_default_task_is_text_to_video_without_first_frame_conditioning():
    cfg = RunConfig()
    assert cfg.train.task == "t2v"
    assert ObjectiveConfig.from_train_section(cfg.train).first_frame_conditioning_p == 0.0
    x = prepare_inputs(
        torch.randn(64, 4, 2),
        torch.randn(64, 3, 2),
        latent_frames=2,
        latent_height=1,
        latent_width=2,
        cfg=ObjectiveConfig.from_train_section(cfg.train),
        generator=torch.Generator().manual_seed(0),
    )
    assert x.video_loss_mask.eq(1).all() and x.video_token_sigma.gt(0).all()  # no sample conditioned


def test_image_to_video_conditions_half_the_samples_by_default():
    assert _p({"task": "i2v"}) == 0.5


@pytest.mark.parametrize(
    ("train", "p"),
    [
        ({"first_frame_conditioning_p": 0.2}, 0.2),
        ({"task": "i2v", "first_frame_conditioning_p": 0.9}, 0.9),
        ({"task": "t2v", "first_frame_conditioning_p": 0.0}, 0.0),
    ],
)
def test_a_stated_probability_is_honoured(train, p):
    assert _p(train) == p


def test_image_to_video_without_conditioning_is_refused_in_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\ntask = "i2v"\nfirst_frame_conditioning_p = 0\n')
    with pytest.raises(ConfigError, match=r"run.toml: .*task = 'i2v' with first_frame_conditioning_p = 0") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.task"):
        load_config(None, {"train.task": "v2v"})


@pytest.mark.parametrize(
    ("keys", "task", "p"),
    [
        ({"ltx_train_mode": "i2v"}, "i2v", 0.5),
        ({"ltx_train_mode": "i2v", "ltx_i2v_prob": 0.1}, "i2v", 0.1),
        ({"ltx_train_mode": "t2v"}, "t2v", 0.0),
    ],
)
def test_simpletuner_keys_map_to_the_task(tmp_path, keys, task, p):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "ltxvideo2", **keys}))
    cfg, _ = load_config(path)
    assert cfg.train.task == task and cfg.train.conditioning_p == p


def test_the_task_round_trips_through_toml_and_an_unstated_probability_stays_unstated(tmp_path):
    cfg = RunConfig.model_validate({"train": {"task": "i2v"}})
    text = config_to_toml(cfg)
    assert 'task = "i2v"' in text and "first_frame_conditioning_p" not in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    again, _ = load_config(path)
    assert again == cfg and again.train.conditioning_p == 0.5
