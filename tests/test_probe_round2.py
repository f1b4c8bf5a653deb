"""Issue 13 item 8 (the second bad-input round): `probe` on a machine without a GPU counted the cpu profile's RAM
twice, `probe --write` wrote the built-in profile instead of what it measured, and `probe --write DIR` crashed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.bad_input

GIB = 2**30

# (name, argv, what the one stderr line must contain); each exits 2 before anything is probed or written.
CASES = [
    ("write-to-a-folder", ["probe", "--write", "{tmp}"], ["--write", "is a folder", "profile.toml"]),
    ("write-into-a-missing-folder", ["probe", "--write", "{tmp}/nope/p.toml"], ["--write", "does not exist"]),
    ("settings-to-a-folder", ["probe", "--settings", "{tmp}"], ["--settings", "is a folder"]),
    ("simulate-without-calibrate", ["probe", "--simulate"], ["--simulate", "--calibrate"]),
    ("bad-workload-frames", ["probe", "--frames", "61"], ["57", "65"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_probe_input_is_one_line_exit_2(case, cli, tmp_path):
    _, argv, expected = case
    before = sorted(tmp_path.iterdir())
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in expected:
        assert word in lines[0]
    assert sorted(tmp_path.iterdir()) == before  # nothing half-written


def _fake_ram(monkeypatch, total_bytes: int):
    import lowvram.hardware as hw

    class VM:
        total = total_bytes
        available = total_bytes // 2

    monkeypatch.setattr(hw.psutil, "virtual_memory", lambda: VM())


def test_probe_write_without_gpu_writes_the_measured_ram(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import lowvram.hardware as hw
    from lowvram.cli import app
    from lowvram.profiles import load_profile

    _fake_ram(monkeypatch, 11 * GIB)
    monkeypatch.setattr(hw, "_nvidia_gpus", lambda: [])
    monkeypatch.setattr(hw, "_torch_gpus", lambda: [])
    out = tmp_path / "here.toml"
    r = CliRunner().invoke(app, ["probe", "--json", "--write", str(out)])
    assert r.exit_code == 0, r.output
    written = load_profile(str(out))
    assert written.host_ram_bytes == 11 * GIB and "host_ram_bytes" in written.measured
    assert written.vram_bytes <= 11 * GIB  # the device share of a cpu machine is at most its RAM
    assert written.vendor == "cpu"


def test_probe_write_on_a_matched_gpu_writes_its_measurements_not_the_builtin(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import lowvram.device as device
    import lowvram.hardware as hw
    from lowvram.cli import app
    from lowvram.profiles import load_profile

    _fake_ram(monkeypatch, 40 * GIB)
    gpu = hw.GpuInfo(0, "NVIDIA GeForce RTX 3090", "nvidia", 24 * GIB)
    monkeypatch.setattr(hw, "_nvidia_gpus", lambda: [gpu])
    monkeypatch.setattr(device, "accelerator_available", lambda: True)
    real_get_backend = device.get_backend
    # the link is timed on the simulated accelerator's clock: 13 GB/s pinned and pageable
    monkeypatch.setattr(device, "get_backend", lambda name="auto", **kw: real_get_backend("sim", h2d_gbps=13.0))
    out = tmp_path / "3090.toml"
    r = CliRunner().invoke(app, ["probe", "--json", "--write", str(out)])
    assert r.exit_code == 0, r.output
    builtin, written = load_profile("3090"), load_profile(str(out))
    assert written.h2d_pinned_gbps == pytest.approx(13.0) != builtin.h2d_pinned_gbps
    assert written.h2d_pageable_gbps == pytest.approx(13.0)
    assert written.host_ram_bytes == 40 * GIB != builtin.host_ram_bytes
    assert set(written.measured) == {"vram_bytes", "host_ram_bytes", "h2d_pinned_gbps", "h2d_pageable_gbps"}
    assert written.bf16_tflops == builtin.bf16_tflops and written.train_tflops is None  # not measured: kept


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("lowvram-plan-measurements")


def _ltx2():
    from lowvram.config import load_config

    cfg, _ = load_config(None, {"model.family": "ltx2", "data.resolution": "832x480", "data.frames": 17})
    return cfg


def test_cpu_profile_counts_device_and_host_ram_once_together(cache_dir):
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    # 18 GiB of RAM: every phase's device part (<= 14.6 GiB usable) and host part (<= 16.2 GiB) fit separately, so
    # the old accounting said "fits 'cpu' with nf4-bnb"; together they do not.
    small = load_profile("cpu").model_copy(update={"host_ram_bytes": 18 * GIB})
    plan = plan_run(_ltx2(), small, choose=True, cache_dir=cache_dir)
    assert not plan.fits
    assert "device memory is host RAM here" in plan.reason and "more host RAM" in plan.reason
    for phase in plan.phases.values():  # a single phase never counts more than the RAM there is
        assert phase.vram_peak_bytes - phase.vram["reserve"] <= small.vram_bytes


def test_cpu_plan_holds_device_plus_host_within_the_ram(cache_dir):
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    plan = plan_run(_ltx2(), load_profile("cpu"), choose=True, cache_dir=cache_dir)
    together = {
        name: p.ram_peak_bytes + p.vram_peak_bytes - p.vram["reserve"] for name, p in plan.phases.items()
    }
    if plan.fits:
        assert max(together.values()) <= plan.ram_usable_bytes, together
    else:
        assert "host RAM" in plan.reason


def test_probe_settings_name_a_profile_train_can_load(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import lowvram.hardware as hw
    from lowvram.cli import app
    from lowvram.config import load_config
    from lowvram.profiles import load_profile

    _fake_ram(monkeypatch, 30 * GIB)
    monkeypatch.setattr(hw, "_nvidia_gpus", lambda: [])
    monkeypatch.setattr(hw, "_torch_gpus", lambda: [])
    for write in (None, tmp_path / "measured.toml"):
        run = tmp_path / "run.toml"
        argv = ["probe", "--settings", str(run)] + (["--write", str(write)] if write else [])
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0, r.output
        cfg, _ = load_config(run)
        profile = load_profile(cfg.memory.profile)  # the measured file, else the built-in it started from
        assert profile.host_ram_bytes == (30 * GIB if write else load_profile("cpu").host_ram_bytes)
