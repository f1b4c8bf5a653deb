"""Issue 16: the Gemma text encoder streams layer by layer from the disk tier while captions are cached."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lowvram.device import get_backend, leaf_tensors
from lowvram.errors import UsageError
from lowvram.offload import lowram_harness as H
from lowvram.offload.text_disk_tier import TextDiskTier, apply_text_disk_tier, release_text_disk_tier

GIB = 2**30


def _encode(te, ids, mask) -> torch.Tensor:
    return torch.stack(te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, -1)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from lowvram.models import ltx2
    from lowvram.models.ltx2.checkpoint import save_text_encoder

    folder = tmp_path_factory.mktemp("gemma")
    save_text_encoder(ltx2.build_tiny_components(seed=0), folder)
    return folder / "text_encoder"


@pytest.fixture
def ids():
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@pytest.mark.parametrize("precision", ["fp32", "int8-quanto"])
def test_disk_streamed_gemma_encodes_exactly_like_the_all_in_ram_one(precision, tiny_gemma, ids, tmp_path):
    from lowvram.data.fingerprint import module_fingerprint
    from lowvram.models.ltx2.checkpoint import load_text_encoder, load_text_encoder_quantized

    def load(progress_for=None):
        if precision == "fp32":  # unquantized: transformers loads it whole, the tier writes the layers after
            return load_text_encoder(tiny_gemma, torch.float32)
        return load_text_encoder_quantized(tiny_gemma, precision, dtype=torch.float32, progress_for=progress_for)[0]

    base = load()
    expected, expected_key = _encode(base, *ids), module_fingerprint(base)

    tier = TextDiskTier(tmp_path / "tier")
    te = load(tier.progress_for)
    if precision != "fp32":  # the loader wrote each layer as it read it: none is held in RAM
        layers = te.model.language_model.layers
        assert all(leaf.untyped_storage().nbytes() <= 8 for p in layers.parameters() for leaf in leaf_tensors(p))
    sim = get_backend("sim", disk_gbps=3.5)
    swap = tier.apply(te, sim)
    sim.place_module(te)
    assert swap.disk_bytes > 0 and set(swap.sources) == set(range(len(te.model.language_model.layers)))
    first, second = _encode(te, *ids), _encode(te, *ids)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert swap.staged_misses == len(swap.sources)  # the first pass reads on demand; the second reads ahead
    # the text cache's key depends on the weights, not on the placeholders they left behind
    assert module_fingerprint(te) == expected_key
    tier.release()
    assert list((tmp_path / "tier").iterdir()) == []  # the layers' file is deleted with the phase


@pytest.mark.bad_input
def test_the_text_tier_refuses_an_encoder_without_decoder_layers_and_trainable_layers(tmp_path):
    from torch import nn

    with pytest.raises(UsageError, match="no decoder `layers` list"):
        apply_text_disk_tier(nn.Sequential(nn.Linear(2, 2)), get_backend("cpu"), tmp_path)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(UsageError, match="frozen weights"):
        apply_text_disk_tier(Encoder(), get_backend("cpu"), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_release_leaves_a_quiet_worker_and_no_file(tmp_path):
    from lowvram.models import ltx2

    te = ltx2.build_tiny_components(seed=0).text_encoder.eval().requires_grad_(False)
    swap = apply_text_disk_tier(te, get_backend("cpu"), tmp_path)
    path = swap.disk_file.path
    assert path.is_file()
    release_text_disk_tier(swap)
    assert not path.exists() and swap._worker is None and not swap._handles


def test_peak_anonymous_ram_stays_within_the_planners_text_cache_prediction(tmp_path):
    """A Gemma whose layers dominate, loaded at int8 and encoded on the simulated device, each run in its own
    process: streamed from the disk tier it stays within the planner's text_cache figure and encodes exactly as
    all in RAM, which does not fit that figure (so the bound can fail)."""
    config = H.gemma_config(layers=12, hidden=512, intermediate=2048)
    H.write_gemma(tmp_path / "gemma", config)
    predicted = H.predicted_text_anon_bytes(config, "int8-quanto", tokens=32)
    disk = H.measure_in_subprocess(str(tmp_path), fn="measure_text_run", on_disk=True, out=str(tmp_path / "d"))
    ram = H.measure_in_subprocess(str(tmp_path), fn="measure_text_run", on_disk=False, out=str(tmp_path / "r"))
    assert disk["peak_anon_bytes"] <= predicted < ram["peak_anon_bytes"], (disk, ram, predicted)
    assert disk["staged_reads"] > disk["staged_misses"] and disk["disk_tier_files_left"] == 0
    assert torch.equal(load_file(tmp_path / "d")["hidden_states"], load_file(tmp_path / "r")["hidden_states"])


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")


def _plan(cache_dir, ram_gib: int, **overrides):
    from lowvram.config import load_config
    from lowvram.plan import plan_run
    from lowvram.plan.host import HostMemory
    from lowvram.profiles import load_profile

    values = {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17, "train.batch_size": 1,
              "model.precision": "int8-torchao", "model.text_encoder_precision": "int8-torchao"}  # fmt: skip
    values.update(overrides)
    cfg, _ = load_config(None, values)
    host = HostMemory(ram_gib * GIB, "--host-ram")
    return plan_run(cfg, load_profile("4070"), choose=False, cache_dir=cache_dir, host=host)


def test_4070_with_16_gib_caches_text_with_int8_gemma_streamed_from_disk(cache_dir):
    plan = _plan(cache_dir, 16)
    assert plan.fits, plan.reason
    s = plan.settings
    assert s["model.text_encoder_precision"] == "int8-torchao" and s["memory.text_encoder_on_disk"] is True
    assert s["memory.ramtorch_text_encoder"] is False
    text = plan.phases["text_cache"]
    assert sum(text.disk.values()) > 9 * GIB  # Gemma's int8 layers live in the file, not in RAM
    assert text.ram_peak_bytes <= plan.host["usable_bytes"] and text.vram_peak_bytes <= 12 * GIB
    assert plan.host["tiers"]["text encoder layers (48, disk)"] == "disk"
    assert plan.host["smallest_ram_bytes"] <= 12 * GIB  # was 15 GiB, bound by caching text with nf4 from pinned RAM
    # Gemma's int8 Linears streamed from pinned RAM instead do not fit 16 GiB: the refusal says by how much
    pinned = _plan(cache_dir, 16, **{"memory.text_encoder_on_disk": False})
    assert not pinned.fits and "text_cache" in (pinned.reason or "")
    # with RAM to spare the disk tier is not used: it is the last resort, after pinned streaming
    roomy = _plan(cache_dir, 64)
    assert roomy.settings["memory.text_encoder_on_disk"] is False


@pytest.mark.bad_input
def test_a_config_that_puts_gemma_on_disk_and_streams_it_from_ram_is_refused_in_one_line():
    from lowvram.config import RunConfig
    from lowvram.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="set one of them to false") as err:
        RunConfig.model_validate({"memory": {"text_encoder_on_disk": True, "ramtorch_text_encoder": True}})
    assert "\n" not in str(err.value).strip().splitlines()[-1]


def test_a_tiny_run_caches_text_from_the_disk_tier_and_telemetry_compares_every_phase(tmp_path, monkeypatch):
    """The run assembly honours memory.text_encoder_on_disk (the layers' file is gone after the phase), and
    memory.jsonl carries the plan's predicted peaks for the load and export phases like the others."""
    import json

    from lowvram.config import apply_overrides
    from lowvram.demo import default_demo_config
    from lowvram.profiles import load_profile
    from lowvram.train.run import run_train

    applied = []
    original = TextDiskTier.apply
    monkeypatch.setattr(TextDiskTier, "apply", lambda self, *a: applied.append(1) or original(self, *a))
    out = tmp_path / "out"
    cfg = apply_overrides(default_demo_config(out), {"train.max_train_steps": 2, "memory.text_encoder_on_disk": True})
    threads = torch.get_num_threads()
    try:
        assert run_train(cfg, profile=load_profile("cpu")) == 0  # planned: the phases get predictions
    finally:
        torch.set_num_threads(threads)
    assert applied == [1] and list((out / "cache" / "text").glob("*.safetensors"))
    assert not list(out.rglob("disk-tier-text_encoder*"))
    phases = {p["name"]: p for p in map(json.loads, (out / "memory.jsonl").read_text().splitlines())
              if p["type"] == "phase"}  # fmt: skip
    for name in ("text_cache", "latent_cache", "load_transformer", "train", "export"):
        assert phases[name]["predicted_ram_bytes"], name


def test_rollout_copies_of_disk_tier_blocks_are_timed_at_the_disk_rate(cache_dir):
    """Scheduled sampling's no-grad forwards read the swapped blocks again: the ones on disk at the disk's rate, in
    the step's copy time as in its wall time."""
    from lowvram.plan.budget import GB

    def plan(on_disk: int):
        fixed = {"model.precision": "fp8-torchao", "memory.blocks_to_swap": 30, "memory.blocks_on_disk": on_disk}
        return _plan(cache_dir, 32, **fixed, **{"scheduled_sampling.enabled": True})

    pinned, disk = plan(0), plan(20)
    block = pinned.phases["train"].ram["swapped blocks (pinned)"] // 30
    k = disk.measured["rollout_forwards_per_step"]
    assert k > 0
    from lowvram.profiles import load_profile

    p = load_profile("4070")
    per_byte = 1 / (min(p.h2d_pinned_gbps, p.disk_read_gbps) * GB) - 1 / (p.h2d_pinned_gbps * GB)
    # each disk block: its forward, its backward and k rollout forwards, each one block's bytes
    expected = 20 * block * (2 + k) * per_byte
    got = disk.step.transfer_seconds - pinned.step.transfer_seconds
    assert got == pytest.approx(expected, rel=1e-6)
    assert any("from the disk tier (20)" in note for note in disk.step.notes)


def test_ltx_2_5s_gemma_4_streams_from_the_disk_tier_exactly_too(ids, tmp_path):
    from lowvram.models import ltx2

    te = ltx2.build_tiny_components(seed=0, version="2.5").text_encoder.eval().requires_grad_(False)
    expected = _encode(te, *ids)
    swap = apply_text_disk_tier(te, get_backend("sim"), tmp_path)
    try:
        assert len(swap.sources) == len(te.model.language_model.layers) and swap.disk_bytes > 0
        assert torch.equal(_encode(te, *ids), expected) and torch.equal(_encode(te, *ids), expected)
    finally:
        release_text_disk_tier(swap)
