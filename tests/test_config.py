import json
from pathlib import Path

import pytest

from lowvram.config import (
    SIMPLETUNER_IGNORED,
    SIMPLETUNER_KEYS,
    RunConfig,
    apply_overrides,
    config_to_toml,
    from_simpletuner,
    load_config,
)
from lowvram.errors import ConfigError

SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds"

# The 7900XTX config from the SimpleTuner LTX-2 quickstart (shared/seeds), verbatim, plus the other keys it names.
SEED_7900XTX = {
    "base_model_precision": "int8-quanto", "checkpoint_step_interval": 100,
    "data_backend_config": "config/ltx2/multidatabackend.json", "disable_benchmark": True, "dynamo_mode": "",
    "evaluation_type": "none", "hub_model_id": "simpletuner-ltxvideo2-19b-t2v-lora-test", "learning_rate": 0.00006,
    "lr_warmup_steps": 50, "lycoris_config": "config/lycoris_config.json", "max_grad_norm": 0.1,
    "max_train_steps": 200, "minimum_image_size": 0, "model_family": "ltxvideo2", "model_flavour": "dev",
    "model_type": "lora", "num_train_epochs": 0, "offload_during_startup": True, "optimizer": "adamw_bf16",
    "output_dir": "output/examples/ltxvideo2-19b-t2v.peft-lora", "override_dataset_config": True, "ramtorch": True,
    "ramtorch_text_encoder": True, "report_to": "none", "resolution": 480, "scheduled_sampling_reflexflow": False,
    "seed": 42, "skip_file_discovery": "", "tracker_project_name": "lora-training",
    "tracker_run_name": "example-training-run", "train_batch_size": 2, "vae_batch_size": 1,
    "vae_enable_patch_conv": True, "vae_enable_slicing": True, "vae_enable_temporal_roll": True,
    "vae_enable_tiling": True, "validation_disable": True, "validation_disable_unconditional": True,
    "validation_guidance": 5, "validation_num_inference_steps": 40, "validation_num_video_frames": 81,
    "validation_prompt": "a sign that says hello world", "validation_resolution": "768x512", "validation_seed": 42,
    "validation_using_datasets": False,
}
SEED_EXTRA = {
    "enable_group_offload": True, "group_offload_type": "block_level", "group_offload_blocks_per_group": 1,
    "group_offload_use_stream": True, "musubi_blocks_to_swap": 4, "musubi_block_swap_device": "cpu",
    "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_simpletuner_seed_config_maps_every_key(tmp_path):
    both = {**SEED_7900XTX, **SEED_EXTRA}
    nested, _ = from_simpletuner(both)
    assert nested["memory"]["blocks_to_swap"] == 4 and nested["memory"]["group_offload"] is True
    # lowvram runs one weight offload at a time (three at once are refused: tests/test_bad_input_round2_plans.py)
    one = {**both, "musubi_blocks_to_swap": 0, "enable_group_offload": False}
    path = write(tmp_path, "config.json", json.dumps(one))
    cfg, notes = load_config(path)
    assert cfg.model.family == "ltx2" and cfg.model.precision == "int8-quanto"
    assert cfg.memory.ramtorch is True and cfg.memory.ramtorch_text_encoder is True
    assert cfg.memory.vae_patch_conv and cfg.memory.vae_tiling and not cfg.memory.vae_temporal_roll  # see the note
    assert cfg.memory.offload_during_startup is True
    assert cfg.train.batch_size == 2 and cfg.optim.optimizer == "adamw_bf16"
    assert cfg.optim.learning_rate == pytest.approx(6e-5) and cfg.optim.max_grad_norm == pytest.approx(0.1)
    assert cfg.checkpoint.every_n_steps == 100 and cfg.train.seed == 42
    assert cfg.data.resolution == "832x480"
    assert cfg.validation.enabled is False and cfg.validation.num_frames == 81
    assert cfg.train.tread_routes[0].selection_ratio == 0.5
    ignored = {n.split("'")[1] for n in notes if n.startswith("ignored")}
    assert {"hub_model_id", "lycoris_config"} <= ignored
    # Trackers are mapped (issue 20): "none" is no tracker, the project and run names are kept.
    assert cfg.output.report_to == [] and cfg.output.tracker_project_name == "lora-training"
    assert cfg.output.tracker_run_name == "example-training-run"
    assert all(k in SIMPLETUNER_KEYS or k in SIMPLETUNER_IGNORED for k in SEED_7900XTX)


def test_seed_quickstart_keys_are_all_known():
    seeds = sorted(SEED.glob("*.txt"))
    if not seeds:
        pytest.skip(f"the SimpleTuner quickstart seed is not beside this checkout ({SEED})")
    text = seeds[0].read_text(encoding="utf-8", errors="replace")
    quoted = set()
    import re

    for m in re.finditer(r'"([a-z_0-9]+)":', text):
        quoted.add(m.group(1))
    dataset_keys = {"id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "video", "audio",
                    "num_frames", "min_frames", "frame_rate", "bucket_strategy", "auto_split", "sample_rate",
                    "channels", "duration_interval", "repeats", "cache_dir", "disabled", "default", "audio_only",
                    "min_duration_seconds", "max_duration_seconds", "routes", "selection_ratio", "start_layer_idx",
                    "end_layer_idx", "validation_adapter_config", "label", "path"}
    unknown = quoted - dataset_keys - set(SIMPLETUNER_KEYS) - set(SIMPLETUNER_IGNORED)
    assert unknown == set()


def test_toml_roundtrip_and_cli_override(tmp_path):
    path = write(tmp_path, "run.toml", '[optim]\nlearning_rate = 3e-4\n[data]\nframes = 33\n')
    cfg, notes = load_config(path, {"train.batch_size": 2})
    assert cfg.optim.learning_rate == 3e-4 and cfg.data.frames == 33 and cfg.train.batch_size == 2 and notes == []
    again, _ = load_config(write(tmp_path, "again.toml", config_to_toml(cfg)))
    assert again == cfg
    assert apply_overrides(cfg, {"optim.learning_rate": 1e-3}).optim.learning_rate == 1e-3


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[optim]\nlerning_rate = 1e-4\n", "unknown key 'optim.lerning_rate' (did you mean 'optim.learning_rate'?)"),
        ("[memory]\nramtroch = true\n", "unknown key 'memory.ramtroch' (did you mean 'memory.ramtorch'?)"),
        ("[optim]\nlearning_rate = -1.0\n", "'optim.learning_rate': Input should be greater than 0 (got -1.0)"),
        ("[data]\nframes = 61\n", "'data.frames': LTX-2 needs 8k+1 frames: use 57 or 65 (got 61)"),
        ("[train]\nbatch_size = \"two\"\n", "'train.batch_size': Input should be a valid integer"),
        ("[model]\nprecision = \"int8-torchoa\"\n", "unknown precision 'int8-torchoa' (did you mean 'int8-torchao'?)"),
        ("[data]\nresolution = \"500x480\"\n", "each side must be a multiple of 32"),
        ("[optim\nx=1", "malformed TOML"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, toml, expected):
    path = write(tmp_path, "run.toml", toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expected in msg
    assert e.value.exit_code == 2


def test_unknown_simpletuner_key_gets_suggestion(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"musubi_block_to_swap": 4}))
    with pytest.raises(ConfigError, match="did you mean 'musubi_blocks_to_swap'"):
        load_config(path)


def test_simpletuner_full_finetune_refused(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"model_type": "full"}))
    with pytest.raises(ConfigError, match="trains LoRA only"):
        load_config(path)


def test_defaults_leave_memory_settings_to_the_planner():
    cfg = RunConfig()
    assert cfg.memory.ramtorch is None and cfg.memory.blocks_to_swap is None
    assert cfg.memory.gradient_checkpointing is None and cfg.memory.vram_safety_margin == 0.10
    assert cfg.data.width_height == (832, 480)


def test_tiling_and_temporal_roll_together_keep_tiling_and_say_so(tmp_path):
    path = write(tmp_path, "run.toml", "[memory]\nvae_tiling = true\nvae_temporal_roll = true\n")
    cfg, notes = load_config(path)
    assert cfg.memory.vae_tiling is True and cfg.memory.vae_temporal_roll is False
    assert notes == [
        "memory.vae_temporal_roll is off: it cannot be combined with memory.vae_tiling, which keeps the smaller VAE "
        "encode peak (set vae_tiling = false to use the exact temporal roll instead)"
    ]


def test_the_readme_example_config_is_valid(tmp_path):
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    cfg, notes = load_config(write(tmp_path, "run.toml", block))
    assert cfg.model.family == "ltx2" and cfg.data.frames == 49 and cfg.memory.profile == "3090" and notes == []
