"""The disk tier and pageable staging (offload/disk_tier.py) on the simulated device: exact LoRA gradients, host RAM
as the planner's tiers predict it, reads ahead of use, and one-line refusals of a changed file or a full disk."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lowvram.device import get_backend
from lowvram.errors import UsageError
from lowvram.offload import apply_memory_plan, disk_tier, memory_plan_refusal
from lowvram.offload import lowram_harness as H
from lowvram.offload.block_swap import choose_swapped_blocks
from lowvram.offload.disk_tier import DiskTierError, FileIdentity, StagedBlockSwap, WeightFile

L, D, HID = 6, 256, 1024


@pytest.fixture(scope="module")
def x():
    return torch.randn(32, D, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def baseline(x):
    model = H.build(L, D, HID, materialize=True)
    sim = get_backend("sim")
    sim.place_module(model)
    return H.train_steps(model, sim, x, 2)


def _checkpointed(tmp_path: Path, on_disk: set[int]):
    """The model with every weight loaded except those the disk tier reads from the checkpoint (left on meta)."""
    path = tmp_path / "weights.safetensors"
    if not path.exists():
        H.write_checkpoint(path, L, D, HID)
    model = H.build(L, D, HID, materialize=False)
    for i in range(L):
        if i not in on_disk:
            for key, value in H.block_weights(i, D, HID).items():
                owner, _, name = key.rpartition(".")
                model.get_submodule(owner)._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return model, path


def _assert_equal(grads, expected):
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        assert torch.equal(grads[name], expected[name]), name


@pytest.mark.parametrize(
    "tier, on_disk, source",
    [("pageable", 0, None), ("pinned", 4, "file"), ("pageable", 2, "file"), ("pinned", 4, "checkpoint")],
)
def test_each_tier_gives_the_all_in_ram_lora_grads_exactly(tier, on_disk, source, x, baseline, tmp_path):
    sim = get_backend("sim", disk_gbps=3.5)
    if source == "checkpoint":
        swapped = choose_swapped_blocks(L, 4)
        model, path = _checkpointed(tmp_path, {swapped[i] for i in choose_swapped_blocks(4, on_disk)})
        swap = disk_tier.apply_staged_block_swap(
            model, sim, blocks_to_swap=4, blocks_on_disk=on_disk, tier=tier, checkpoint=path
        )
    else:
        model = H.build(L, D, HID, materialize=True)
        swap = disk_tier.apply_staged_block_swap(
            model, sim, blocks_to_swap=4, blocks_on_disk=on_disk, tier=tier, disk_dir=tmp_path
        )
    sim.place_module(model)
    try:
        _assert_equal(H.train_steps(model, sim, x, 2), baseline)
        assert sim.stats().d2h_bytes == 0  # frozen weights only ever travel host -> device
        if on_disk:
            assert swap.disk_file.read_bytes > 0 and swap.disk_bytes == on_disk * 2 * D * HID * 4
    finally:
        swap.close()


def test_disk_blocks_written_by_the_tier_leave_ram(tmp_path):
    model = H.build(L, D, HID, materialize=True)
    swap = disk_tier.apply_staged_block_swap(
        model, get_backend("sim"), blocks_to_swap=4, blocks_on_disk=4, disk_dir=tmp_path
    )
    try:
        for index in swap.swapped:  # the module holds stand-ins, the tier no RAM-side master
            assert swap._blocks[index].host.numel() == 0
            for p in model.transformer_blocks[index].parameters():
                if not p.requires_grad:
                    assert p.untyped_storage().nbytes() == p.element_size()
        assert swap.host_bytes == 2 * 2 * D * HID * 4  # the pinned staging ring only
        assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    finally:
        swap.close()


def test_disk_tier_reads_ahead_of_use_from_the_second_step(x, tmp_path):
    model = H.build(L, D, HID, materialize=True)
    sim = get_backend("sim", disk_gbps=3.5)
    swap = disk_tier.apply_staged_block_swap(model, sim, blocks_to_swap=4, blocks_on_disk=4, disk_dir=tmp_path)
    sim.place_module(model)
    try:
        # The first step has no order to follow; the second starts with blocks the first left in the ring
        H.train_steps(model, sim, x, 2)
        first = swap.staged_misses
        assert first > 0
        H.train_steps(model, sim, x, 2)
        assert swap.staged_misses == first  # from then on every load finds its block already read
    finally:
        swap.close()


def test_the_simulated_clock_sees_the_disk_as_a_copy_engine(x, tmp_path):
    def step_s(disk_gbps, on_disk):
        model = H.build(L, D, HID, materialize=True)
        sim = get_backend("sim", disk_gbps=disk_gbps, tflops=1.0)
        swap = disk_tier.apply_staged_block_swap(
            model, sim, blocks_to_swap=4, blocks_on_disk=on_disk, disk_dir=tmp_path / f"{disk_gbps}-{on_disk}"
        )
        sim.place_module(model)
        H.train_steps(model, sim, x, 2)
        sim.reset_counters()
        before = swap.staged_reads
        H.train_steps(model, sim, x, 1)
        reads = swap.staged_reads - before
        swap.close()
        return sim.stats().compute_s, reads

    pinned, _ = step_s(0.5, 0)
    slow, reads = step_s(0.5, 4)
    fast, _ = step_s(1000.0, 4)
    block = 2 * D * HID * 4
    # the blocks read in one step cannot arrive faster than a 0.5 GB/s disk delivers them (up to the staging ring's
    # two reads may have started in the step before)
    assert reads > 2 and slow >= (reads - 2) * block / 0.5e9
    assert slow > fast >= pinned * (1 - 1e-9)  # an instant disk costs what pinned masters cost


def test_disk_tier_refuses_a_weight_file_changed_under_it(x, tmp_path):
    model, path = _checkpointed(tmp_path, set(choose_swapped_blocks(L, 4)))
    sim = get_backend("sim")
    swap = disk_tier.apply_staged_block_swap(model, sim, blocks_to_swap=4, blocks_on_disk=4, checkpoint=path)
    sim.place_module(model)
    try:
        H.train_steps(model, sim, x, 1)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place: same size, new mtime
        with pytest.raises(DiskTierError) as err:
            H.train_steps(model, sim, x, 2)
        assert "changed under the run (mtime)" in str(err.value) and "\n" not in str(err.value)
    finally:
        swap.close()
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DiskTierError, match=r"changed under the run \(size\)"):
        WeightFile.open(path, {}, FileIdentity(st.st_size, st.st_mtime_ns, "x"))


def test_disk_tier_refuses_a_file_whose_contents_differ_from_the_one_adopted(tmp_path):
    path = tmp_path / "w.safetensors"
    H.write_checkpoint(path, 2, 64, 128)
    ident = FileIdentity.of(path)
    st = path.stat()
    with open(path, "r+b") as f:  # same size, same mtime, different bytes
        f.seek(200)
        f.write(b"\x01\x02\x03")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DiskTierError) as err:
        WeightFile.open(path, {}, ident)
    assert "(fingerprint)" in str(err.value) and "\n" not in str(err.value)


def test_disk_tier_refuses_a_folder_without_room_before_touching_the_model(tmp_path, monkeypatch):
    model = H.build(L, D, HID, materialize=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(disk_tier.shutil, "disk_usage", lambda p: SimpleNamespace(total=2**30, used=0, free=2**20))
    with pytest.raises(DiskTierError) as err:
        disk_tier.apply_staged_block_swap(
            model, get_backend("sim"), blocks_to_swap=4, blocks_on_disk=4, disk_dir=tmp_path
        )
    message = str(err.value)
    assert "filesystem has 0.00 GiB free" in message and "memory.disk_tier_dir" in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing half-written
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_apply_memory_plan_routes_tiers_and_refuses_more_disk_blocks_than_swapped(tmp_path):
    memory = SimpleNamespace(
        blocks_to_swap=3, swap_tier="pageable", blocks_on_disk=2, disk_tier_dir=str(tmp_path),
        gradient_checkpointing=True, activation_offload=False, ramtorch=None, group_offload=False,
    )  # fmt: skip
    model = H.build(L, D, HID, materialize=True)
    applied = apply_memory_plan(model, memory, get_backend("sim"))
    swap = applied.strategies[0]
    assert isinstance(swap, StagedBlockSwap) and len(swap.sources) == 3 and swap.disk_file is not None
    swap.close()
    memory.blocks_on_disk = 5
    assert "only swapped blocks can live on disk" in memory_plan_refusal(memory)
    with pytest.raises(UsageError):
        apply_memory_plan(H.build(L, D, HID, materialize=True), memory, get_backend("sim"))


@pytest.mark.parametrize("tier, on_disk", [("pinned", 0), ("pageable", 0), ("pinned", 6), ("pageable", 3)], ids=str)
def test_predicted_anonymous_ram_matches_measured_within_10_percent_per_tier(tier, on_disk, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lowram")
    shared = tmp_path_factory.getbasetemp() / "lowram-shared"
    shared.mkdir(exist_ok=True)
    kw = {"layers": 8, "dim": 512, "hidden": 2048, "blocks_to_swap": 6, "steps": 2}
    r = H.measure_in_subprocess(str(shared), tier=tier, blocks_on_disk=on_disk, grads_out=str(folder / "g"), **kw)
    measured, predicted = r["train_peak_anon_bytes"], r["predicted_train_anon_bytes"]
    assert abs(measured - predicted) <= 0.10 * predicted, (measured, predicted)
    base_grads = shared / "baseline-grads"
    if not base_grads.exists():  # all weights in RAM, no offload, in its own process
        H.measure_in_subprocess(str(shared), grads_out=str(base_grads), **{**kw, "blocks_to_swap": 0})
    _assert_equal(load_file(folder / "g"), load_file(base_grads))


def test_bench_lowram_prints_its_two_figures_last(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "tools/bench_lowram.py", "--layers", "8", "--dim", "256", "--hidden", "1024",
         "--budget-mib", "40", "--steps", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("anon_rss_over_budget=") and lines[-1].startswith("disk_tier_step_ratio=")
    assert "equal the all-in-RAM baseline exactly: True" in done.stdout


@pytest.mark.parametrize("precision", ["fp32", "int8-quanto"])
def test_the_loader_writes_disk_tier_blocks_as_it_reads_them(precision, x, tmp_path):
    from lowvram.quant.stream import load_quantized

    def state():  # what a checkpoint holds: every frozen weight and the (here pre-trained) LoRA
        out = {k: v for i in range(L) for k, v in H.block_weights(i, D, HID).items()}
        lora = H.build(L, D, HID, materialize=False)
        out.update({n: p.detach() for n, p in lora.named_parameters() if "lora_" in n})
        return out

    def loaded(loader_for=None):
        model = H.build(L, D, HID, materialize=False)
        loader = loader_for(model) if loader_for else None
        load_quantized(model, state(), precision, dtype=torch.float32, progress=loader.progress if loader else None)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model, loader

    base, _ = loaded()
    sim = get_backend("sim")
    sim.place_module(base)
    expected = H.train_steps(base, sim, x, 2)

    blocks = disk_tier.disk_block_indices(L, 4, 3)
    model, loader = loaded(lambda m: disk_tier.DiskTierLoader(m, tmp_path, blocks, "transformer_blocks"))
    prewritten = loader.finish()
    for index in blocks:  # never held: placeholders from the moment the loader moved past them
        for p in model.transformer_blocks[index].parameters():
            if not p.requires_grad:
                assert all(leaf.untyped_storage().nbytes() <= 8 for leaf in disk_tier.leaf_tensors(p))
    sim = get_backend("sim", disk_gbps=3.5)
    swap = disk_tier.apply_staged_block_swap(model, sim, blocks_to_swap=4, blocks_on_disk=3, prewritten=prewritten)
    sim.place_module(model)
    try:
        _assert_equal(H.train_steps(model, sim, x, 2), expected)
    finally:
        swap.close()
    with pytest.raises(DiskTierError, match="the plan puts"):
        disk_tier.apply_staged_block_swap(
            model, get_backend("sim"), blocks_to_swap=4, blocks_on_disk=2, prewritten=prewritten
        )
