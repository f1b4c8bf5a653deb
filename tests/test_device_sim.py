"""The simulated accelerator catches what a CPU run hides: use of an offloaded weight, and allocation past budget."""

import pytest
import torch

from lowvram.device import get_backend
from lowvram.device_sim import SimBackend, UseAfterOffloadError


@pytest.fixture
def sim() -> SimBackend:
    return get_backend("sim", budget_bytes=1_000_000)


def test_get_backend_knows_the_simulated_device(sim):
    assert sim.name == "sim" and sim.is_accelerator and sim.supports_streams
    assert sim.mem_get_info() == (1_000_000, 1_000_000)


def test_sim_catches_use_after_offload_in_forward(sim):
    linear = torch.nn.Linear(8, 8).requires_grad_(False)
    linear.weight.data = sim.stand_in(linear.weight, "linear.weight")
    with sim.session(), pytest.raises(UseAfterOffloadError, match="linear.weight"):
        linear(torch.randn(2, 8))


def test_sim_catches_use_after_offload_in_backward(sim):
    # The group-offload trap: autograd saved the Parameter itself, and backward reads it after it was offloaded.
    weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    x = torch.randn(2, 8, requires_grad=True)
    with sim.session():
        y = (x @ weight).sum()  # mm saves the weight (a leaf) to compute x's gradient
        weight.data = sim.stand_in(weight, "w")
        with pytest.raises(UseAfterOffloadError, match="'w'"):
            y.backward()


def test_stand_in_of_the_cpu_backend_poisons_results():
    cpu = get_backend("cpu")
    linear = torch.nn.Linear(4, 4).requires_grad_(False)
    linear.weight.data = cpu.stand_in(linear.weight, "w")
    assert torch.isnan(linear(torch.randn(1, 4))).all()
    assert linear.weight.untyped_storage().nbytes() == 4  # one element, whatever the shape


def test_sim_raises_out_of_memory_past_budget(sim):
    with sim.session():
        keep = torch.empty(200_000)  # 800 kB fits
        with pytest.raises(torch.OutOfMemoryError, match="simulated device out of memory"):
            torch.empty(100_000)  # 400 kB more does not
        assert sim.stats().live_bytes == keep.numel() * 4


def test_sim_counts_activations_and_grads_and_sees_them_freed(sim):
    linear = torch.nn.Linear(16, 16)
    sim.place_module(linear)
    weights = sim.stats().live_bytes
    assert weights == (16 * 16 + 16) * 4
    with sim.session():
        x = sim.to_device(torch.randn(4, 16))
        linear(x).sum().backward()
        assert sim.stats().live_bytes >= weights + x.numel() * 4 + weights  # input + grads
        del x
        linear.weight.grad = linear.bias.grad = None
    assert sim.stats().live_bytes == weights
    assert sim.stats().peak_bytes > 2 * weights


def test_sim_budget_can_be_lowered_mid_run(sim):
    with sim.session():
        a = torch.empty(1000)
        sim.set_budget(sim.stats().live_bytes + 100)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1000)
        sim.set_budget(None)
        b = torch.empty(1000)
    assert a.numel() == b.numel()


def test_sim_records_bytes_moved_both_ways_and_host_memory_is_not_device_memory(sim):
    host = sim.pin(torch.randn(1000))
    assert sim.stats().live_bytes == 0 and sim.stats().host_bytes == 4000
    dev = sim.to_device(host)
    assert dev.data_ptr() != host.data_ptr()  # a fresh copy, never an alias of the host tensor
    back = sim.to_host(dev)
    slot = sim.empty((1000,), torch.float32)
    sim.copy_(slot, host)
    stats = sim.stats()
    assert (stats.h2d_bytes, stats.d2h_bytes) == (8000, 4000)
    assert stats.live_bytes == 8000 and stats.host_bytes == 8000
    assert torch.equal(back, host)


def test_sim_clock_hides_a_copy_behind_compute_only_on_a_side_stream():
    sim = get_backend("sim", h2d_gbps=1.0, tflops=1e-3)  # 1 GB/s, 1 GFLOP/s: both visible on the clock
    a, b = sim.to_device(torch.randn(256, 256)), sim.to_device(torch.randn(256, 256))
    sim.reset_counters()
    host = sim.pin(torch.randn(250_000))  # 1 MB: 1 ms to copy
    stream = sim.new_stream()
    with sim.session():
        with sim.use_stream(stream):
            w = sim.to_device(host)
            ready = sim.new_event()
            ready.record(stream)
        a @ b  # 33.5 MFLOP: 33 ms of compute, the copy finishes underneath
        sim.current_stream().wait_event(ready)
    assert sim.stats().stall_s == 0.0
    sim.reset_counters()
    with sim.session():
        sim.to_device(host)  # on the compute stream: fully exposed
    assert sim.stats().stall_s == pytest.approx(1e-3)
    assert w.shape == host.shape
