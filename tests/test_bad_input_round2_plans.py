"""Bad input, second round, planner side (issue 13): each case ends in its one-line message, exit 2 for usage errors,
before any measurement or work; a stated setting is honoured or refused, and a mapping to another method is said.

The cases are module-level tables so they can be counted (`len(CONFIG_CASES) + len(PLAN_CASES) + ...`).
"""

from __future__ import annotations

import json

import pytest

from lowvram.config import load_config
from lowvram.errors import ConfigError, UsageError
from lowvram.profiles import load_profile

pytestmark = pytest.mark.bad_input


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------------------------
# Config files: refused where they enter (load_config), naming the keys as the user wrote them

CONFIG_CASES = {
    "ramtorch and musubi block swap at once (SimpleTuner)": (
        "config.json",
        json.dumps({"ramtorch": True, "musubi_blocks_to_swap": 8}),
        "{p}: ramtorch = true and musubi_blocks_to_swap = 8 each move the transformer's weights off the GPU and "
        "lowvram runs one of them: keep one (e.g. musubi_blocks_to_swap = 0)",
    ),
    "ramtorch and block swap at once (TOML)": (
        "run.toml",
        "[memory]\nramtorch = 0.5\nblocks_to_swap = 8\n",
        "{p}: memory.ramtorch = 0.5 and memory.blocks_to_swap = 8 each move the transformer's weights off the GPU "
        "and lowvram runs one of them: keep one (e.g. memory.blocks_to_swap = 0)",
    ),
    "block swap without gradient checkpointing": (
        "run.toml",
        "[memory]\nblocks_to_swap = 8\ngradient_checkpointing = false\n",
        "{p}: memory.blocks_to_swap = 8 needs gradient checkpointing, but memory.gradient_checkpointing = false: "
        "without it autograd keeps every swapped block's weights alive for backward; set "
        "memory.gradient_checkpointing = true",
    ),
    "group offload without gradient checkpointing (SimpleTuner)": (
        "config.json",
        json.dumps({"enable_group_offload": True, "gradient_checkpointing": False}),
        "{p}: enable_group_offload = true needs gradient checkpointing, but gradient_checkpointing = false: group "
        "offload frees no memory in training without it (diffusers has no backward hooks); set "
        "gradient_checkpointing = true",
    ),
    "activation offload without gradient checkpointing": (
        "run.toml",
        "[memory]\nactivation_offload = true\ngradient_checkpointing = false\n",
        "{p}: memory.activation_offload = true moves the checkpointed block inputs to the host, so it needs gradient "
        "checkpointing, but memory.gradient_checkpointing = false: set memory.gradient_checkpointing = true or "
        "memory.activation_offload = false",
    ),
    "group offload stream in a native config": (
        "run.toml",
        "[memory]\ngroup_offload = true\ngroup_offload_use_stream = true\n",
        "{p}: memory.group_offload_use_stream = true cannot train: its prefetch follows the forward order, which the "
        "gradient checkpoint recompute breaks; set memory.group_offload_use_stream = false",
    ),
    "int4-quanto in a native config": (
        "run.toml",
        '[model]\nprecision = "int4-quanto"\n',
        "{p}: 'model.precision': precision 'int4-quanto' is not supported: lowvram's 4-bit method is bitsandbytes "
        "nf4 (no quanto int4); use 'nf4-bnb' (got 'int4-quanto')",
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_case_is_refused_in_one_line_where_it_enters(name, tmp_path):
    filename, text, expected = CONFIG_CASES[name]
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert one_line(err.value) == expected.format(p=path)


# Settings lowvram runs with another method than the one named: mapped, and the mapping is printed as a note.
MAPPED_CASES = {
    "int4-quanto (SimpleTuner)": (
        {"base_model_precision": "int4-quanto"},
        ("model", "precision", "nf4-bnb"),
        "'base_model_precision': 'int4-quanto' is trained as 'nf4-bnb': lowvram's 4-bit method is bitsandbytes nf4 "
        "(no quanto int4)",
    ),
    "fp8-quanto (SimpleTuner)": (
        {"text_encoder_1_precision": "fp8-quanto"},
        ("model", "text_encoder_precision", "fp8-torchao"),
        "'text_encoder_1_precision': 'fp8-quanto' is trained as 'fp8-torchao': lowvram's fp8 weights are torchao's "
        "(same e4m3 format, another backend)",
    ),
    "the quickstart's group-offload snippet": (
        {"enable_group_offload": True, "group_offload_type": "block_level", "group_offload_blocks_per_group": 1,
         "group_offload_use_stream": True},  # fmt: skip
        ("memory", "group_offload_use_stream", False),
        "'group_offload_use_stream': true is trained as false, as SimpleTuner itself does under gradient "
        "checkpointing: the stream prefetches in forward order, which the checkpoint recompute breaks",
    ),
}


@pytest.mark.parametrize("name", list(MAPPED_CASES))
def test_a_setting_trained_with_another_method_is_said(name, tmp_path):
    raw, (section, key, value), note = MAPPED_CASES[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg, notes = load_config(path)
    assert getattr(getattr(cfg, section), key) == value
    assert note in notes


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")


def test_the_quickstart_group_offload_snippet_plans_group_offload_as_stated(tmp_path, cache_dir):
    from lowvram.plan import plan_run

    path = tmp_path / "config.json"
    path.write_text(json.dumps(MAPPED_CASES["the quickstart's group-offload snippet"][0]))
    cfg, _ = load_config(path)
    plan = plan_run(cfg, load_profile("3090"), choose=False, cache_dir=cache_dir)
    assert plan.settings["memory.group_offload"] is True and plan.settings["memory.group_offload_use_stream"] is False


# ---------------------------------------------------------------------------------------------------------------
# Planner requests: refused by plan_run before anything is measured

PLAN_CASES = {
    "no GPUs": ({}, 0, "gpus = 0: the number of GPUs the run is sharded over must be 1 or more"),
    "negative GPUs": ({}, -2, "gpus = -2: the number of GPUs the run is sharded over must be 1 or more"),
    "more swapped blocks than the model has": (
        {"memory.blocks_to_swap": 60},
        1,
        "memory.blocks_to_swap (SimpleTuner: musubi_blocks_to_swap) = 60 but the ltx2 transformer has 48 blocks: use "
        "at most 48 (or leave it out and the planner chooses)",
    ),
    "more swapped blocks than the tiny model has": (
        {"model.family": "tiny", "memory.blocks_to_swap": 3},
        1,
        "memory.blocks_to_swap (SimpleTuner: musubi_blocks_to_swap) = 3 but the tiny transformer has 2 blocks: use "
        "at most 2 (or leave it out and the planner chooses)",
    ),
    "2001 frames": (
        {"data.frames": 2001},
        1,
        "data.frames = 2001: lowvram plans clips of at most 497 frames (20 s at 25 fps, the longest LTX-2 clips); "
        "use fewer frames (8k+1, e.g. 121, 241 or 497)",
    ),
}


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_plan_request_is_refused_before_any_measurement(name, monkeypatch):
    import lowvram.plan.plan as planner
    from lowvram.plan import plan_run

    def no_work(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(planner, "collect_measurements", no_work)
    overrides, gpus, expected = PLAN_CASES[name]
    cfg, _ = load_config(None, overrides)
    with pytest.raises(UsageError) as err:
        plan_run(cfg, load_profile("3090"), choose=False, gpus=gpus)
    assert one_line(err.value) == expected


def test_a_multidatabackend_of_2001_frames_names_the_file(tmp_path, monkeypatch):
    import lowvram.plan.plan as planner
    from lowvram.plan import plan_run

    monkeypatch.setattr(planner, "collect_measurements", lambda *a, **k: pytest.fail("measured before refusing"))
    data = tmp_path / "multidatabackend.json"
    data.write_text(json.dumps([{"id": "v", "instance_data_dir": "clips", "resolution": "832x480",
                                 "video": {"num_frames": 2001}}]))  # fmt: skip
    cfg, _ = load_config(None, {"data.data_backend_config": str(data)})
    with pytest.raises(UsageError) as err:
        plan_run(cfg, load_profile("3090"), choose=False)
    assert one_line(err.value).startswith(f"video.num_frames in {data} = 2001: lowvram plans clips of at most 497")


# ---------------------------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit 2, no traceback, nothing written (real processes: exit codes matter)

CLI_CASES = {
    "plan --gpus 0": (["plan", "--profile", "3090", "--gpus", "0"], None,
                      "lowvram: error: --gpus 0: the number of GPUs the run is sharded over must be 1 or more"),
    "plan --gpus -2": (["plan", "--profile", "3090", "--gpus", "-2"], None,
                       "lowvram: error: --gpus -2: the number of GPUs the run is sharded over must be 1 or more"),
    "plan --frames 2001": (
        ["plan", "--profile", "3090", "--frames", "2001"], None,
        "lowvram: error: --frames 2001: lowvram plans clips of at most 497 frames (20 s at 25 fps, the longest LTX-2 "
        "clips); use fewer frames (8k+1, e.g. 121, 241 or 497)",
    ),
    "train with block swap and no checkpointing": (
        ["train", "--profile", "3090", "--config", "{cfg}"],
        "[memory]\nblocks_to_swap = 8\ngradient_checkpointing = false\n[output]\noutput_dir = \"{out}\"\n",
        "lowvram: error: {cfg}: memory.blocks_to_swap = 8 needs gradient checkpointing, but "
        "memory.gradient_checkpointing = false: without it autograd keeps every swapped block's weights alive for "
        "backward; set memory.gradient_checkpointing = true",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_case_is_one_line_exit_2_before_any_work(name, cli, tmp_path):
    args, config_text, expected = CLI_CASES[name]
    cfg, out = tmp_path / "run.toml", tmp_path / "run"
    if config_text is not None:
        cfg.write_text(config_text.format(out=out))
    r = cli(*(a.format(cfg=cfg) for a in args))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [expected.format(cfg=cfg)]
    assert not out.exists()

