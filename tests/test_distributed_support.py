"""What `--nproc N` accepts and refuses (one line, before any weight loads), and how a global batch is split."""

import pytest
import torch

from lowvram.config import RunConfig
from lowvram.errors import UsageError
from lowvram.multi_gpu import check_distributed_supported
from lowvram.train import distributed
from lowvram.train.distributed import DistEnv, rank_rows


def cfg(**sections) -> RunConfig:
    base = {"model": {"family": "ltx2", "precision": "bf16"}, "train": {"batch_size": 4}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.model_validate(base)


def test_bf16_and_fp32_bases_with_checkpointing_or_activation_offload_and_adamw_are_accepted():
    check_distributed_supported(cfg(memory={"gradient_checkpointing": True}), 2)
    check_distributed_supported(cfg(memory={"activation_offload": True}), 2)
    check_distributed_supported(cfg(model={"precision": "fp32"}), 4)


@pytest.mark.parametrize(
    "sections, says",
    [
        ({"model": {"precision": "int8-torchao"}}, "int8-torchao cannot be sharded by FSDP2"),
        ({"model": {"precision": "int8-quanto"}}, "silently dequantized"),
        ({"model": {"precision": "nf4-bnb"}}, "bitsandbytes"),
        ({"memory": {"blocks_to_swap": 8}}, "memory.blocks_to_swap moves the weights FSDP2 shards"),
        ({"memory": {"ramtorch": True}}, "memory.ramtorch"),
        ({"memory": {"group_offload": True}}, "memory.group_offload"),
        ({"optim": {"optimizer": "adamw8bit"}}, "use 'adamw'"),
        ({"optim": {"optimizer": "adamw_bf16"}}, "use 'adamw'"),
        ({"validation": {"enabled": True}}, "validation.enabled = false"),
        ({"train": {"batch_size": 1}}, "batch of at least 2"),
    ],
)
def test_combinations_fsdp2_cannot_run_are_refused_in_one_line(sections, says):
    with pytest.raises(UsageError) as err:
        check_distributed_supported(cfg(**sections), 2)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_one_process_accepts_everything_the_single_device_loop_does():
    check_distributed_supported(cfg(model={"precision": "nf4-bnb"}, memory={"blocks_to_swap": 8}), 1)


def test_torchrun_environment_is_detected(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.current() == DistEnv(rank=1, world_size=2, local_rank=1)
    assert not distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current() is None and distributed.is_main()


@pytest.mark.parametrize("batch, world", [(4, 2), (3, 2), (5, 3), (1, 2), (2, 4)])
def test_rows_of_a_batch_are_split_once_each_and_an_empty_rank_borrows_a_weightless_row(batch, world):
    shares = [rank_rows(batch, r, world) for r in range(world)]
    real_rows = [i for rows, real in shares if real for i in rows]
    assert real_rows == list(range(batch))
    assert all(rows == [0] for rows, real in shares if not real)
    assert max(len(r) for r, _ in shares) - min(len(r) for r, real in shares if real) <= 1


def test_each_rank_reads_only_its_rows_of_the_cached_batch(monkeypatch):
    """Rows of other ranks are never loaded; the loaded ones sit at their global positions, zeros elsewhere."""
    from types import SimpleNamespace

    import lowvram.data.batches as batches_mod
    from lowvram.data.batches import epoch_plan

    items = [SimpleNamespace(bucket="64x64@17", repeats=1, index=i) for i in range(5)]
    loaded: list[int] = []

    def fake_load_batch(members, position=0, epoch=0, text_memo=None):
        ids = torch.tensor([float(m.index + 1) for m in members])
        loaded.extend(m.index for m in members)
        n = len(members)
        return batches_mod.Batch(
            position=position,
            epoch=epoch,
            bucket=members[0].bucket,
            captions=[""] * n,
            video_latents=ids.view(n, 1, 1, 1, 1).expand(n, 2, 1, 1, 1).clone(),
            audio_latents=ids.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
            audio_mask=torch.ones(n),
            text_video=torch.zeros(n, 3, 4),
            text_audio=torch.zeros(n, 3, 4),
            text_mask=torch.ones(n, 3),
            latent_paths=[],
        )

    monkeypatch.setattr(batches_mod, "load_batch", fake_load_batch)
    plan = epoch_plan(items, 3, 0, 0)
    for rank in range(2):
        loaded.clear()
        source = distributed.RankDiskBatches(items, 3, seed=0, fps=25.0, env=DistEnv(rank, 2, rank))
        for members in plan:
            batch = next(source)
            rows, real = rank_rows(len(members), rank, 2)
            want = torch.zeros(len(members))
            if real:
                want[rows] = torch.tensor([float(members[i] + 1) for i in rows])
            assert torch.equal(batch.video[:, 0, 0], want) or not real
            assert batch.video.shape[0] == len(members)
        assert sorted(loaded) == sorted(members[i] for members in plan for i in rank_rows(len(members), rank, 2)[0])


def test_cli_refuses_a_quantized_base_with_nproc_in_one_line_before_launching(cli, tmp_path):
    from lowvram.config import config_to_toml

    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(
        config_to_toml(
            RunConfig.model_validate(
                {
                    "model": {"family": "tiny", "precision": "int8-quanto"},
                    "train": {"batch_size": 2},
                    "output": {"output_dir": str(out)},
                }
            )
        )
    )
    result = cli("train", "--config", str(config), "--nproc", "2", "--profile", "4090")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot be sharded by FSDP2" in result.stderr
    assert not (out / distributed.LAUNCH_FILE).exists()
