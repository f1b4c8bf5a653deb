"""`lowvram probe --calibrate` on the simulated accelerator: it measures the rates the device has, the calibrated
profile replaces the assumed figures, and the planner's step times then rest on (and say they rest on) them."""

from __future__ import annotations

import json

import pytest

from lowvram.calibrate import calibrate, calibrated_profile
from lowvram.config import load_config
from lowvram.device import get_backend
from lowvram.hardware import profile_to_toml
from lowvram.plan import budget_settings, plan_run
from lowvram.plan.budget import Settings
from lowvram.profiles import load_profile, load_profile_file

SIM_TFLOPS = 0.5
SIM_GBPS = 7.0


def tiny_run(**overrides):
    values = {"model.family": "tiny", "data.resolution": "64x64", "data.frames": 9, "train.batch_size": 1,
              "lora.rank": 4, "data.max_text_tokens": 8}
    values.update(overrides)
    cfg, _ = load_config(None, values)
    return cfg


@pytest.fixture(scope="module")
def sim_calibration():
    backend = get_backend("sim", h2d_gbps=SIM_GBPS, tflops=SIM_TFLOPS)
    return calibrate(backend, tiny_run())


def test_calibration_measures_the_simulated_devices_own_rates(sim_calibration):
    cal = sim_calibration
    assert cal.matmul_tflops == pytest.approx(SIM_TFLOPS, rel=1e-6)
    assert cal.attention_tflops == pytest.approx(SIM_TFLOPS, rel=1e-6)
    assert cal.h2d_pinned_gbps == pytest.approx(SIM_GBPS, rel=1e-6)
    assert cal.h2d_pageable_gbps == pytest.approx(SIM_GBPS, rel=1e-6)
    # one block's FLOPs, counted as the planner counts them, over its time on the device's clock
    assert cal.block_seconds > 0 and cal.block_tflop > 0
    assert cal.train_tflops == pytest.approx(SIM_TFLOPS, rel=1e-3)
    assert "64x64x9 batch 1" in cal.shape and cal.notes == ()


def test_a_block_twice_as_wide_costs_more_flops_and_time():
    backend = get_backend("sim", h2d_gbps=SIM_GBPS, tflops=SIM_TFLOPS)
    small = calibrate(backend, tiny_run())
    big = calibrate(backend, tiny_run(**{"data.resolution": "128x64"}))
    assert big.block_tflop > 1.5 * small.block_tflop and big.block_seconds > 1.5 * small.block_seconds


def test_calibration_past_its_budget_skips_sections_with_a_note():
    backend = get_backend("sim", h2d_gbps=SIM_GBPS, tflops=SIM_TFLOPS)
    cal = calibrate(backend, tiny_run(), budget_s=-1.0)
    assert cal.train_tflops is None and cal.matmul_tflops is None and len(cal.notes) == 5
    assert all("skipped" in n for n in cal.notes)
    base = load_profile("3090")
    assert calibrated_profile(base, cal).measured == base.measured  # nothing measured: nothing claimed


def test_calibrated_profile_replaces_assumed_figures_and_round_trips(sim_calibration, tmp_path):
    base = load_profile("3090")
    prof = calibrated_profile(base, sim_calibration)
    assert prof.train_tflops == pytest.approx(SIM_TFLOPS, rel=1e-2)
    assert prof.bf16_tflops == pytest.approx(SIM_TFLOPS, rel=1e-2) != base.bf16_tflops
    assert prof.h2d_pinned_gbps == pytest.approx(SIM_GBPS) and prof.h2d_pageable_gbps == pytest.approx(SIM_GBPS)
    assert set(prof.measured) == {"bf16_tflops", "attention_tflops", "h2d_pinned_gbps", "h2d_pageable_gbps",
                                  "train_tflops"}
    assert prof.vram_bytes == base.vram_bytes and "simulated" in prof.calibration
    path = tmp_path / "cal.toml"
    path.write_text(profile_to_toml(prof, "test"))
    assert load_profile_file(path) == prof


def test_step_time_follows_the_measured_rate_and_says_so():
    cfg = tiny_run()
    base = load_profile("3090")
    calibrated = base.model_copy(update={"train_tflops": 10.0, "measured": ("train_tflops",)})
    settings = Settings(precision="fp32")
    assumed = budget_settings(cfg, base, settings)
    measured = budget_settings(cfg, calibrated, settings)
    assert not assumed.step_time_measured and measured.step_time_measured
    # compute time scales with the rate: 40% of 71 TFLOP/s assumed vs 10 measured
    ratio = measured.step.compute_seconds / assumed.step.compute_seconds
    assert ratio == pytest.approx(base.bf16_tflops * 0.4 / 10.0, rel=1e-6)


def test_plan_output_labels_each_figure_measured_or_assumed():
    cfg = tiny_run()
    base = load_profile("3090")
    plain = plan_run(cfg, base, choose=False)
    assert plain.to_json()["step_time_basis"] == "estimate"
    assert "estimate, uncalibrated" in plain.summary_line()
    assert any(a.startswith("compute") and "assumed" in a for a in plain.assumptions)
    assert any(a.startswith("host->device") and "assumed" in a for a in plain.assumptions)
    assert any("GiB VRAM: assumed" in a for a in plain.assumptions)
    calibrated = base.model_copy(
        update={"train_tflops": 30.0, "h2d_pinned_gbps": 12.0, "measured": ("train_tflops", "h2d_pinned_gbps"),
                "calibration": "test GPU, 64x64x9"}
    )
    plan = plan_run(cfg, calibrated, choose=False)
    assert plan.to_json()["step_time_basis"] == "measured"
    assert "from measured throughput" in plan.summary_line()
    assert any(a.startswith("compute 30 TFLOP/s: measured") and "test GPU" in a for a in plan.assumptions)
    assert any(a.startswith("host->device 12 GB/s pinned: measured") for a in plan.assumptions)
    probed = calibrated.model_copy(update={"measured": (*calibrated.measured, "vram_bytes", "host_ram_bytes")})
    lines = plan_run(cfg, probed, choose=False).assumptions
    assert any("GiB VRAM: measured" in a and "GiB host RAM: measured" in a for a in lines)


def test_probe_calibrate_simulate_writes_a_profile_plan_reads_as_measured(cli, tmp_path):
    out = tmp_path / "mine.toml"
    r = cli("probe", "--calibrate", "--simulate", "--json", "--write", str(out),
            "--resolution", "64x64", "--frames", "9")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["calibration"]["train_tflops"] > 0 and "train_tflops" in data["measured_fields"]
    written = load_profile(str(out))
    assert written.train_tflops == pytest.approx(data["calibration"]["train_tflops"], rel=1e-2)
    assert "host_ram_bytes" in written.measured and "train_tflops" in written.measured


def test_calibrate_without_a_gpu_is_one_line(cli):
    r = cli("probe", "--calibrate")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA or ROCm GPU" in lines[0] and "Traceback" not in r.stderr
