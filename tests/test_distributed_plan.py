"""`lowvram plan --gpus N`: per-GPU budget of FSDP2 (sharded weights, gathered blocks), its host RAM and traffic."""

import json

import pytest

from lowvram.config import load_config
from lowvram.errors import UsageError
from lowvram.plan import plan_run
from lowvram.profiles import load_profile


@pytest.fixture(scope="module")
def cache_dir(request):
    # The same measurement cache as the planner's tests: keyed by config, shapes and library versions.
    return request.config.cache.mkdir("lowvram-plan-measurements")


def ltx2(batch: int, **overrides):
    values = {
        "model.family": "ltx2",
        "data.resolution": "832x480",
        "data.frames": 17,
        "train.batch_size": batch,
        "model.precision": "bf16",
        "memory.blocks_to_swap": 0,
        "memory.ramtorch": False,
        "memory.group_offload": False,
        "memory.activation_offload": False,
        "memory.gradient_checkpointing": True,
    }
    values.update(overrides)
    cfg, _ = load_config(None, values)
    return cfg


def test_two_gpus_hold_half_the_weights_plus_gathered_blocks_and_one_gpus_activations(cache_dir):
    profile = load_profile("a100-80g")
    one = plan_run(ltx2(1), profile, choose=False, cache_dir=cache_dir)
    two = plan_run(ltx2(2), profile, choose=False, gpus=2, cache_dir=cache_dir)
    v1, v2 = one.phases["train"].vram, two.phases["train"].vram
    blocks = v1["transformer blocks"]
    assert v2["transformer blocks (1/2 shard)"] == pytest.approx(blocks / 2, abs=1)
    assert v2["gathered blocks (current + prefetch)"] == pytest.approx(2 * blocks / 48, rel=1e-6)
    # Each GPU trains one clip of the batch of 2: the activations of a one-clip, one-GPU step.
    assert v2["activations + LoRA grads (peak)"] == v1["activations + LoRA grads (peak)"]
    assert v2["optimizer state"] == pytest.approx(v1["optimizer state"] / 2, abs=1)
    # Host RAM: the processes load the whole transformer in turn, so one copy at a time.
    assert two.phases["train"].ram["whole transformer while loading (processes in turn)"] == pytest.approx(
        blocks + v1["transformer outside blocks"], rel=1e-6
    )
    # Block all-gathers are in the step: (N-1)/N of every block, forward and backward.
    assert two.step.streamed_bytes == pytest.approx(2 * 48 * (blocks / 48) / 2, rel=1e-3)
    assert one.step.streamed_bytes == 0


def test_what_fsdp2_cannot_shard_is_refused_by_the_planner_in_one_line(cache_dir):
    with pytest.raises(UsageError) as err:
        plan_run(
            ltx2(2, **{"model.precision": "int8-torchao"}),
            load_profile("4090"),
            choose=False,
            gpus=2,
            cache_dir=cache_dir,
        )
    assert "cannot be sharded by FSDP2" in str(err.value) and "\n" not in str(err.value)


def test_cli_plan_gpus_prints_the_per_gpu_budget(cli):
    result = cli("plan", "--profile", "a100-80g", "--gpus", "2", "--batch", "2", "--json")
    assert result.returncode in (0, 1), result.stderr
    plan = json.loads(result.stdout)
    assert "transformer blocks (1/2 shard)" in plan["phases"]["train"]["components"]["vram"]
    assert any("FSDP2 over 2 GPUs" in a for a in plan["assumptions"])
