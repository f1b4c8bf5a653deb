"""Stream races become test failures (`pytest -m races`): the simulated accelerator checks happens-before between its
streams like CUDA's stream sanitizer, and every offload strategy is shown to need each synchronization it has: remove
one (a wait, an event record, a keep-alive, a slot held one step longer) and the simulated run raises
`StreamRaceError` at the operation, instead of training on with plausible but wrong numbers."""

import pytest
import torch

from lowvram.device import get_backend
from lowvram.device_sim import SimBackend, SimStream, StreamRaceError, UseAfterOffloadError
from lowvram.errors import UsageError
from lowvram.offload import apply_block_swap, memory_plan_refusal
from lowvram.offload.block_swap import BlockSwap
from lowvram.offload.harness import apply_named_strategy, lora_step, tiny_batch, tiny_lora_transformer, zero_grads

pytestmark = pytest.mark.races


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@pytest.fixture
def sim() -> SimBackend:
    return get_backend("sim")


# -- the detector itself ------------------------------------------------------------------------------------------
def test_read_after_write_on_another_stream_without_a_wait_raises_naming_both_streams(sim):
    host = sim.label(sim.pin(torch.randn(16)), "blocks.0.weight")
    side = sim.new_stream()
    with sim.session():
        with sim.use_stream(side):
            weight = sim.to_device(host)
        with pytest.raises(StreamRaceError) as race:
            weight * 2
    err = race.value
    assert err.kind == "read-after-write" and err.phase == "forward"
    assert err.stream == "compute stream" and err.other_stream.startswith("side stream")
    assert "blocks.0.weight" in err.tensor and "aten.mul" in err.op and "to_device" in err.other_op
    assert "\n" not in str(err)


def test_an_event_recorded_after_the_copy_and_waited_on_orders_the_read(sim):
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        with sim.use_stream(side):
            weight = sim.to_device(host)
        early = sim.new_event()
        early.record(side)
        with sim.use_stream(side):
            late = sim.to_device(host)  # launched after the event: not covered by it
        sim.current_stream().wait_event(early)
        assert torch.equal(weight * 1, host)
        with pytest.raises(StreamRaceError, match="read-after-write"):
            late + 1


def test_wait_stream_orders_what_the_other_stream_launched_so_far_only(sim):
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        with sim.use_stream(side):
            a = sim.to_device(host)
        sim.current_stream().wait_stream(side)
        with sim.use_stream(side):
            b = sim.to_device(host)
        a.sum()
        with pytest.raises(StreamRaceError):
            b.sum()


@pytest.mark.parametrize("how", ["device", "stream", "event"])
def test_host_synchronize_orders_every_stream_after_the_work_it_waited_for(sim, how):
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        with sim.use_stream(side):
            weight = sim.to_device(host)
            done = sim.new_event()
            done.record(side)
        {"device": sim.synchronize, "stream": side.synchronize, "event": done.synchronize}[how]()
        assert torch.equal(weight.clone(), host)


def test_a_copy_into_a_slot_another_stream_still_reads_is_a_write_after_read(sim):
    slot = sim.label(sim.empty((16,), torch.float32), "ring slot 0")
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        sim.copy_(slot, host)
        slot.sum()  # compute reads the slot
        freed = sim.new_event()
        with sim.use_stream(side):
            side.wait_event(freed)  # never recorded: orders nothing
            with pytest.raises(StreamRaceError) as race:
                sim.copy_(slot, host)
        freed.record(sim.current_stream())
        with sim.use_stream(side):
            side.wait_event(freed)
            sim.copy_(slot, host)
    assert race.value.kind == "write-after-read" and "ring slot 0" in race.value.tensor
    assert race.value.stream.startswith("side stream") and race.value.other_stream == "compute stream"


def test_two_streams_writing_one_buffer_unordered_is_a_write_after_write(sim):
    slot = sim.empty((16,), torch.float32)
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        slot.zero_()  # compute writes
        with sim.use_stream(side), pytest.raises(StreamRaceError) as race:
            sim.copy_(slot, host)
    assert race.value.kind == "write-after-write" and "aten.zero_" in race.value.other_op


def test_freeing_memory_another_stream_still_uses_is_a_use_after_free_unless_record_stream(sim):
    host = sim.pin(torch.randn(16))
    side = sim.new_stream()
    with sim.session():
        for keep_alive in (True, False):
            with sim.use_stream(side):
                weight = sim.to_device(host)
                ready = sim.new_event()
                ready.record(side)
            sim.current_stream().wait_event(ready)
            weight.sum()
            if keep_alive:
                sim.record_stream(weight, sim.current_stream())
            del weight  # the allocator may now hand its block to the next allocation on the side stream
            if keep_alive:
                torch.ones(1) + 1
            else:
                with pytest.raises(StreamRaceError) as race:
                    torch.ones(1) + 1
    assert race.value.kind == "use-after-free" and "record_stream" in str(race.value)


def test_the_host_refilling_a_staging_buffer_before_its_copy_finished_is_a_race(sim):
    # A pageable -> pinned staging ring: the host may refill a staging buffer only once the host-to-device copy
    # reading it is known to be done (event.synchronize), whatever tier does the staging.
    staging = sim.empty_pinned((16,), torch.float32)
    pageable = torch.randn(16)
    side = sim.new_stream()
    with sim.session():
        sim.copy_(staging, pageable)  # host work: ordered before anything launched later
        with sim.use_stream(side):
            sim.to_device(staging)
            copied = sim.new_event()
            copied.record(side)
        with pytest.raises(StreamRaceError) as race:
            sim.copy_(staging, pageable)
        copied.synchronize()
        sim.copy_(staging, pageable)
    assert race.value.kind == "write-after-read" and race.value.stream == "host"


def test_autograd_still_refuses_a_saved_tensor_modified_in_place(sim):
    x = torch.randn(4, requires_grad=True)
    with sim.session():
        y = x.exp()
        loss = y.sum()
        y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_backward_reading_a_saved_view_of_a_refilled_buffer_raises(sim):
    slot = sim.empty((16,), torch.float32)
    host_a, host_b = sim.pin(torch.randn(16)), sim.pin(torch.randn(16))
    x = torch.randn(2, 4, requires_grad=True)
    with sim.session():
        sim.copy_(slot, host_a)
        loss = (x @ slot.view(4, 4)).sum()
        sim.copy_(slot, host_b)  # the buffer is recycled while autograd still holds a view of its old contents
        with pytest.raises(StreamRaceError) as race:
            loss.backward()
    assert race.value.kind == "stale-saved-tensor" and "checkpointing" in str(race.value)


def test_the_detector_can_be_switched_off(monkeypatch):
    quiet = get_backend("sim", check_races=False)
    host = quiet.pin(torch.randn(16))
    side = quiet.new_stream()
    with quiet.session():
        with quiet.use_stream(side):
            weight = quiet.to_device(host)
        weight * 2
    monkeypatch.setenv("LOWVRAM_SIM_RACES", "0")
    assert get_backend("sim").check_races is False
    monkeypatch.setenv("LOWVRAM_SIM_RACES", "maybe")
    with pytest.raises(ValueError, match="LOWVRAM_SIM_RACES='maybe' is not a switch"):
        get_backend("sim")


# -- every strategy needs each of its synchronizations ------------------------------------------------------------
def _train(
    strategy: str, *, steps: int = 2, num_layers: int = 2, checkpointing: bool = True, precision="fp32", **options
):
    transformer = tiny_lora_transformer(precision, num_layers=num_layers)
    sim = get_backend("sim")
    applied = apply_named_strategy(strategy, transformer, sim, checkpointing=checkpointing, **options)
    batch = tiny_batch(transformer)
    sim.place_module(transformer)
    for _ in range(steps):
        zero_grads(transformer)
        with sim.session():
            lora_step(transformer, batch, sim)
    return applied


def _no_wait_event(monkeypatch, when=lambda stream: True):
    """Make `wait_event` a no-op where `when(stream)` holds."""
    original = SimStream.wait_event
    monkeypatch.setattr(SimStream, "wait_event", lambda self, event: None if when(self) else original(self, event))


STRATEGIES = ["streaming", "block_swap_all_but_one", "group_block_level", "activation_offload"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains_clean_under_the_detector(strategy):
    _train(strategy, num_layers=3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_waiting_for_its_copies_each_strategy_raises_a_read_after_write(strategy, monkeypatch):
    _no_wait_event(monkeypatch)
    with pytest.raises(StreamRaceError) as race:
        _train(strategy, num_layers=3)
    assert race.value.kind == "read-after-write"
    assert race.value.stream == "compute stream" and race.value.other_stream.startswith("side stream")


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
@pytest.mark.parametrize("strategy", ["streaming", "block_swap_all_but_one"])
def test_quantized_weights_race_through_their_inner_tensors(strategy, precision, monkeypatch):
    _no_wait_event(monkeypatch)
    with pytest.raises(StreamRaceError) as race:
        _train(strategy, num_layers=3, precision=precision, steps=1)
    assert race.value.kind == "read-after-write"


def test_streaming_without_a_wait_in_backward_raises_there(monkeypatch):
    _no_wait_event(monkeypatch, when=lambda stream: _in_backward())
    with pytest.raises(StreamRaceError) as race:
        _train("streaming")
    assert race.value.kind == "read-after-write" and race.value.phase.startswith("backward")
    assert ".weight" in race.value.tensor and "transformer_blocks" in race.value.tensor


def test_block_swap_without_a_wait_in_checkpoint_recompute_raises_there(monkeypatch):
    _no_wait_event(monkeypatch, when=lambda stream: stream.is_compute and _in_backward())
    with pytest.raises(StreamRaceError) as race:
        _train("block_swap_all_but_one", num_layers=4)
    assert race.value.kind == "read-after-write"
    assert race.value.phase == "backward (checkpoint recompute)" and "ring slot" in race.value.tensor
    assert race.value.module.startswith("transformer_blocks.")


def test_activation_offload_without_the_wait_before_copying_back_raises_in_backward(monkeypatch):
    _no_wait_event(monkeypatch, when=lambda stream: _in_backward())
    with pytest.raises(StreamRaceError) as race:
        _train("activation_offload")
    assert race.value.kind == "read-after-write" and race.value.phase.startswith("backward")
    assert "activation boundary" in race.value.tensor


def test_activation_offload_copying_a_block_input_before_it_is_computed_raises(monkeypatch):
    monkeypatch.setattr(SimStream, "wait_stream", lambda self, other: None)
    with pytest.raises(StreamRaceError) as race:
        _train("activation_offload")
    assert race.value.kind == "read-after-write" and race.value.stream.startswith("side stream")
    assert race.value.other_stream == "compute stream" and "activation boundary" in race.value.tensor


@pytest.mark.parametrize("strategy", ["streaming", "group_block_level", "activation_offload"])
def test_dropping_the_keep_alive_of_a_buffer_in_use_on_another_stream_is_a_use_after_free(strategy, monkeypatch):
    monkeypatch.setattr(SimBackend, "record_stream", lambda self, tensor, stream: None)
    with pytest.raises(StreamRaceError) as race:
        _train(strategy, num_layers=3)
    assert race.value.kind == "use-after-free"


def test_block_swap_refilling_a_slot_before_compute_is_done_with_it_raises(monkeypatch):
    # The copy stream waits on the slot's "free" event; never recording it lets the copy overwrite a slot whose
    # block compute has not finished reading.
    monkeypatch.setattr(BlockSwap, "_record_compute", lambda self: self.backend.new_event())
    with pytest.raises(StreamRaceError) as race:
        _train("block_swap_all_but_one", num_layers=4)
    assert race.value.kind == "write-after-read" and "ring slot" in race.value.tensor
    assert race.value.stream.startswith("side stream") and race.value.other_stream == "compute stream"


def test_block_swap_reusing_a_slot_one_step_early_raises(monkeypatch):
    # Each "slot free" event is the one recorded a block earlier: the ring believes a slot free one step before
    # compute is done with it, and refills it under the block still reading it.
    record = BlockSwap._record_compute
    previous = {}

    def one_step_early(self):
        fresh = record(self)
        stale = previous.get("event", fresh)
        previous["event"] = fresh
        return stale

    monkeypatch.setattr(BlockSwap, "_record_compute", one_step_early)
    with pytest.raises(StreamRaceError) as race:
        _train("block_swap_all_but_one", num_layers=4)
    assert race.value.kind == "write-after-read" and "ring slot" in race.value.tensor


# -- the OneTrainer case: a ring recycling weight buffers without checkpointing ------------------------------------
def test_a_recycling_ring_without_checkpointing_is_refused_by_the_planner_and_the_strategy():
    from types import SimpleNamespace

    from lowvram.plan.budget import Settings
    from lowvram.plan.plan import _refusal

    settings = SimpleNamespace(blocks_to_swap=3, gradient_checkpointing=False, activation_offload=False)
    assert "needs gradient checkpointing" in memory_plan_refusal(settings)
    assert _refusal(Settings(offload="block_swap", blocks_to_swap=3, gradient_checkpointing=False)) is not None
    with pytest.raises(UsageError, match="needs gradient checkpointing"):
        apply_block_swap(tiny_lora_transformer("fp32", num_layers=4), get_backend("sim"), blocks_to_swap=3)


def test_a_recycling_ring_whose_checkpointing_is_turned_off_raises_instead_of_training():
    transformer = tiny_lora_transformer("fp32", num_layers=4)
    sim = get_backend("sim")
    apply_named_strategy("block_swap_all_but_one", transformer, sim, checkpointing=True)
    transformer.disable_gradient_checkpointing()
    sim.place_module(transformer)
    with sim.session(), pytest.raises(UsageError, match="needs gradient checkpointing"):
        lora_step(transformer, tiny_batch(transformer), sim)


def _ring_without_checkpointing():
    transformer = tiny_lora_transformer("fp32", num_layers=4)
    sim = get_backend("sim")
    apply_named_strategy("block_swap_all_but_one", transformer, sim, checkpointing=True)
    transformer.disable_gradient_checkpointing()
    sim.place_module(transformer)
    return transformer, sim


def test_a_recycling_ring_without_its_guard_still_raises_instead_of_training(monkeypatch):
    def unguarded_after_block(self, index):
        if not _in_backward():
            self._unbind(index)

    monkeypatch.setattr(BlockSwap, "_after_block", unguarded_after_block)
    transformer, sim = _ring_without_checkpointing()
    with sim.session(), pytest.raises((StreamRaceError, UseAfterOffloadError)):
        lora_step(transformer, tiny_batch(transformer), sim)


def test_a_ring_that_recycles_buffers_under_saved_weights_raises_a_stale_saved_tensor(monkeypatch):
    # OneTrainer #1306: no guard, and weights stay bound to their slots while the ring refills them. Backward
    # would read saved weights whose slots now hold other blocks' bytes; the detector stops it there.
    monkeypatch.setattr(BlockSwap, "_after_block", lambda self, index: None)
    monkeypatch.setattr(BlockSwap, "_unbind", lambda self, index: self._bound.pop(index, None))
    transformer, sim = _ring_without_checkpointing()
    with sim.session(), pytest.raises(StreamRaceError) as race:
        lora_step(transformer, tiny_batch(transformer), sim)
    assert race.value.kind == "stale-saved-tensor" and "ring slot" in race.value.tensor
    assert "checkpointing" in str(race.value)


# -- tools/gpu_check.py --sanitize -------------------------------------------------------------------------------
def _gpu_check():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("lowvram_tools_gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lowvram_tools_gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_check():
    threads = torch.get_num_threads()
    yield _gpu_check()
    torch.set_num_threads(threads)


def test_gpu_check_sanitize_without_a_gpu_is_refused_in_one_line(gpu_check, capsys):
    from lowvram.device import accelerator_available

    if accelerator_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--sanitize", "--strategies", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--simulate --sanitize" in err


def test_gpu_check_simulate_sanitize_reports_no_race_for_a_clean_run(gpu_check, capsys):
    # Every strategy's clean run is checked above and in the matrix; this keeps the tool's report path alive.
    code = gpu_check.main(["--simulate", "--sanitize", "--layers", "2", "--strategies", "none,activation_offload"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "races=none"
    assert any(line.startswith("activation_offload") for line in out.splitlines())


def test_gpu_check_sanitize_reports_a_race_per_strategy(gpu_check, capsys, monkeypatch):
    _no_wait_event(monkeypatch)
    code = gpu_check.main(["--simulate", "--sanitize", "--layers", "2", "--strategies", "none,streaming"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.strip().splitlines()[-1] == "races=streaming"
    rows = [line for line in out.splitlines() if line.startswith("streaming")]
    assert rows and "RACE: stream race (read-after-write)" in rows[0]


def test_a_blocking_copy_to_the_host_orders_what_the_host_does_next(sim):
    # Filling a pinned buffer from a device tensor with a plain (blocking) copy_ returns only once the copy is done;
    # a copy stream may then read the buffer (block swap built inside a running session does this).
    weight = sim.to_device(torch.randn(16))
    pinned = sim.empty_pinned((16,), torch.float32)
    side = sim.new_stream()
    with sim.session():
        (weight * 2).sum()
        pinned.copy_(weight)
        with sim.use_stream(side):
            sim.to_device(pinned)
            done = sim.new_event()
            done.record(side)
        done.synchronize()
        pinned.copy_(weight, non_blocking=True)  # not waited for: the next copy stream read races it
        with sim.use_stream(side), pytest.raises(StreamRaceError, match="read-after-write"):
            sim.to_device(pinned)
