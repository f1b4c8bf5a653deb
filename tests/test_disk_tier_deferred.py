"""Issue 16: a staged block whose read is still in flight when its prefetch is issued is copied in its own
pre-hook, so the host thread queueing the block before it never waits on the disk."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lowvram.device import get_backend
from lowvram.offload import disk_tier
from lowvram.offload import lowram_harness as H

L, D, HID = 4, 128, 512


@pytest.fixture(scope="module")
def x():
    return torch.randn(16, D, generator=torch.Generator().manual_seed(3))


def _gated(swap, gates: dict[int, threading.Event]):
    """Reads of the blocks in `gates` wait until their event is set (a slow disk)."""
    source = next(iter(swap.sources.values()))
    read = source.read_block

    def slow(index, out):
        if index in gates:
            gates[index].wait()
        read(index, out)

    source.read_block = slow


def test_the_prefetch_of_a_block_still_being_read_does_not_wait_for_the_read(x, tmp_path):
    model = H.build(L, D, HID, materialize=True)
    swap = disk_tier.apply_staged_block_swap(model, get_backend("cpu"), blocks_to_swap=L, tier="pageable")
    gate = threading.Event()
    _gated(swap, {1: gate})
    try:
        swap._recording = [0, 1, 2, 3]  # as if a step had run: reads go ahead in this order
        swap._prefetch_first()  # block 0 is read and copied; block 1's read is now in flight, held by the gate
        hook = threading.Thread(target=swap._before_block, args=(0,))
        hook.start()
        hook.join(timeout=60)
        done = not hook.is_alive()
        gate.set()
        hook.join()
        assert done, "block 0's pre-hook waited for block 1's read"
        assert swap.deferred_copies == 1 and swap._deferred == {swap._slot_of(1): 1}
        swap._after_block(0)
        swap._before_block(1)  # the deferred copy happens here, after its read
        assert 1 not in swap._deferred.values() and 1 in swap._bound
    finally:
        gate.set()
        swap.close()


def test_deferred_copies_give_the_all_in_ram_lora_grads_exactly(x, tmp_path):
    base = H.build(L, D, HID, materialize=True)
    sim = get_backend("sim")
    sim.place_module(base)
    expected = H.train_steps(base, sim, x, 2)

    model = H.build(L, D, HID, materialize=True)
    sim = get_backend("sim", disk_gbps=3.5)
    swap = disk_tier.apply_staged_block_swap(model, sim, blocks_to_swap=L, blocks_on_disk=L, disk_dir=tmp_path)
    sim.place_module(model)
    # a slow disk: every read takes far longer than a tiny block's compute, so prefetches find reads in flight
    source = next(iter(swap.sources.values()))
    read = source.read_block
    source.read_block = lambda index, out: (time.sleep(0.05), read(index, out))
    try:
        grads = H.train_steps(model, sim, x, 2)
    finally:
        swap.close()
    assert swap.deferred_copies > 0
    assert grads.keys() == expected.keys()
    assert all(torch.equal(grads[k], expected[k]) for k in expected)
