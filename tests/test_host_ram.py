"""Host RAM as a budget (plan/host.py): tiers, usable RAM, --host-ram, the smallest RAM that trains a run."""

from __future__ import annotations

import json

import pytest

from lowvram.config import load_config
from lowvram.errors import UsageError
from lowvram.plan import host as host_ram
from lowvram.plan import plan_run
from lowvram.plan.host import GIB, HostMemory
from lowvram.profiles import load_profile


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")


def ltx2(**overrides):
    values = {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17, "train.batch_size": 1}
    values.update(overrides)
    cfg, _ = load_config(None, values)
    return cfg


@pytest.mark.parametrize(
    "text, expected",
    [("16GiB", 16 * GIB), ("16G", 16 * GIB), ("16", 16 * GIB), ("32GB", 32 * 10**9), ("16384MiB", 16 * GIB)],
)
def test_host_ram_sizes_parse(text, expected):
    assert host_ram.parse_host_ram(text) == expected


@pytest.mark.parametrize("text", ["sixteen", "16 parsecs", "-4GiB", "0", ""])
def test_host_ram_nonsense_is_one_line(text):
    with pytest.raises(UsageError) as err:
        host_ram.parse_host_ram(text)
    assert "--host-ram" in str(err.value) and "16GiB" in str(err.value) and "\n" not in str(err.value)


def test_smallest_host_ram_is_the_least_whole_gib_whose_usable_part_holds_the_need():
    for need in (1 * GIB, 5 * GIB + 1, 13 * GIB, 40 * GIB, 100 * GIB + 7):
        ram = host_ram.smallest_host_ram_bytes(need)
        assert ram % GIB == 0
        assert host_ram.usable_host_bytes(ram) >= need > host_ram.usable_host_bytes(ram - GIB)


def test_components_name_their_tier():
    ram, disk = host_ram.swap_host_components("pinned", 10, 4, 100)
    assert {host_ram.component_tier(k) for k in ram} == {"pinned"}
    assert ram == {"swapped blocks (pinned)": 600, "staging ring (2 blocks, pinned)": 200}
    assert disk == {"swapped blocks (disk)": 400}
    ram, disk = host_ram.swap_host_components("pageable", 10, 0, 100)
    assert host_ram.component_tier("swapped blocks (pageable)") == "pageable" and disk == {}
    assert host_ram.tier_totals(ram, disk) == {"pinned": 200, "pageable": 1000, "page cache": 0, "disk": 0}


def test_4070_with_16_gib_of_host_ram_fits_the_19b_model(cache_dir):
    plan = plan_run(
        ltx2(), load_profile("4070"), choose=True, cache_dir=cache_dir, host=HostMemory(16 * GIB, "--host-ram")
    )
    assert plan.fits, plan.reason
    for phase in plan.phases.values():
        assert phase.ram_peak_bytes <= host_ram.usable_host_bytes(16 * GIB)
    assert plan.host["smallest_ram_bytes"] <= 16 * GIB
    assert set(plan.phases) == {"text_cache", "latent_cache", "load", "train", "export"}


def test_a_config_can_put_swapped_blocks_on_disk_and_the_plan_budgets_it(cache_dir):
    fixed = {"model.precision": "fp8-torchao", "memory.blocks_to_swap": 30}
    pinned = plan_run(ltx2(**fixed), load_profile("4070"), choose=False, cache_dir=cache_dir)
    disk = plan_run(
        ltx2(**fixed, **{"memory.blocks_on_disk": 20}), load_profile("4070"), choose=False, cache_dir=cache_dir
    )
    assert disk.settings["memory.blocks_on_disk"] == 20 and pinned.settings["memory.blocks_on_disk"] == 0
    block = pinned.phases["train"].ram["swapped blocks (pinned)"] // 30
    assert disk.phases["train"].disk == {"swapped blocks (disk)": 20 * block}
    assert disk.phases["train"].ram["swapped blocks (pinned)"] == 10 * block
    assert disk.phases["train"].ram["staging ring (2 blocks, pinned)"] == 2 * block
    # 3.5 GB/s of disk is slower than the 24 GB/s host link: the step-time model says so
    assert disk.step_seconds_estimate > pinned.step_seconds_estimate
    assert disk.host["tiers"]["swapped blocks (disk)"] == "disk"


@pytest.mark.parametrize("precision", ["fp8-torchao", "int8-torchao"])
def test_4070_with_16_gib_trains_at_8_bits_from_the_disk_tier(precision, cache_dir):
    # The transformer at 8 bits, as the config states; the text caches with a 4-bit Gemma (or built elsewhere)
    cfg = ltx2(**{"model.precision": precision, "model.text_encoder_precision": "nf4-bnb"})
    plan = plan_run(cfg, load_profile("4070"), choose=False, cache_dir=cache_dir, host=HostMemory(16 * GIB, "x"))
    assert plan.fits, plan.reason
    assert plan.settings["model.precision"] == precision
    on_disk = plan.settings["memory.blocks_on_disk"]
    assert on_disk > 0 and plan.phases["train"].disk["swapped blocks (disk)"] > 0
    # loading writes the disk tier's blocks as they are quantized: they are never held with the rest
    block = plan.phases["train"].disk["swapped blocks (disk)"] // on_disk
    roomy = plan_run(cfg, load_profile("4070"), choose=False, cache_dir=cache_dir, host=HostMemory(32 * GIB, "x"))
    assert roomy.fits and roomy.settings["memory.blocks_on_disk"] == 0
    held = plan.phases["load"].ram["transformer being loaded (anonymous)"]
    assert held == roomy.phases["load"].ram["transformer being loaded (anonymous)"] - on_disk * block
    # on 32 GiB every master stays in RAM: the disk tier is chosen only when RAM requires it, and is slower
    assert roomy.step_seconds_estimate < plan.step_seconds_estimate


def test_a_plan_that_fits_only_by_swapping_says_so_and_is_refused(cache_dir):
    cfg = ltx2(**{"model.precision": "fp8-torchao", "memory.blocks_on_disk": 0, "memory.swap_tier": "pinned"})
    plan = plan_run(
        cfg, load_profile("4070"), choose=False, cache_dir=cache_dir, host=HostMemory(12 * GIB, "x", 64 * GIB)
    )
    assert not plan.fits
    assert plan.host["fits_only_by_swapping"] and "only by swapping" in plan.reason and "\n" not in plan.reason


def test_each_candidate_and_the_plan_state_their_host_ram(cache_dir):
    plan = plan_run(ltx2(), load_profile("4070"), choose=True, cache_dir=cache_dir)
    assert plan.host["source"] == "profile '4070'" and plan.host["ram_bytes"] == 32 * GIB
    assert all(r["host_ram_bytes"] > 0 for r in plan.runners_up)
    assert plan.host["need_bytes"] == max(p.ram_peak_bytes for p in plan.phases.values())
    assert set(plan.host["tiers"].values()) <= set(host_ram.TIERS)


def test_cli_plan_host_ram_prints_the_smallest_ram_and_tiers(cli):
    r = cli("plan", "--profile", "4070", "--host-ram", "16GiB", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["host"]["source"] == "--host-ram" and data["host"]["ram_bytes"] == 16 * GIB
    r = cli("plan", "--profile", "4070", "--host-ram", "16GiB")
    assert "smallest host RAM that trains this:" in r.stdout and "tier pinned:" in r.stdout
    bad = cli("plan", "--profile", "4070", "--host-ram", "lots")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_probe_measures_the_cache_disk_and_reports_swap(cli, tmp_path):
    from lowvram.hardware import measure_disk_read_gbps

    assert measure_disk_read_gbps(tmp_path, nbytes=16 * 2**20) > 0
    assert not list(tmp_path.iterdir())  # the probe file is removed
    r = cli("probe", "--json", "--no-bandwidth", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["disk_read_gbps"] > 0 and data["swap_total_bytes"] >= 0
    assert not list(tmp_path.iterdir())


def test_every_profile_states_its_disk_read_speed_with_a_source():
    from lowvram.profiles import PROFILES_DIR, builtin_profile_names

    for name in builtin_profile_names():
        line = next(x for x in (PROFILES_DIR / f"{name}.toml").read_text().splitlines() if x.startswith("disk_read"))
        assert "#" in line, name
        assert load_profile(name).disk_read_gbps > 0
