"""`lowvram report RUN_DIR`: the run folder as a dashboard, also while the run is still writing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.telemetry import load_run, phases_with_live_train, read_jsonl, render_timeline, run_summary, smoothed

GIB = 2**30


def write_run(run: Path, steps: int, *, total: int, partial: bool, train_done: bool, plan: dict | None = None):
    run.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "s_per_step": 2.0, "rss_bytes": s * GIB,
                    "peak_vram_bytes": 3 * GIB}) + "\n"
        for s in range(1, steps + 1)
    )  # fmt: skip
    (run / "metrics.jsonl").write_text(lines + ('{"step": 99, "lo' if partial else ""))
    phases = [{"type": "phase", "name": "latent_cache", "start_s": 0.0, "end_s": 5.0, "rss_baseline_bytes": GIB,
               "rss_peak_bytes": 2 * GIB}]  # fmt: skip
    if train_done:
        phases.append({"type": "phase", "name": "train", "start_s": 5.0, "end_s": 50.0, "rss_baseline_bytes": GIB,
                       "rss_peak_bytes": 4 * GIB, "predicted_ram_bytes": 5 * GIB})  # fmt: skip
    samples = [{"type": "sample", "t_s": t, "phase": "latent_cache", "rss_bytes": GIB, "ram_available_bytes": GIB}
               for t in (0.0, 1.0, 2.0)]  # fmt: skip
    (run / "memory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in phases + samples))
    (run / "run.json").write_text(json.dumps({"total_steps": total, "plan": plan, "config": {
        "model": {"family": "ltx2", "precision": "int8-torchao"}, "data": {"resolution": "832x480", "frames": 17},
        "train": {"batch_size": 1}, "lora": {"rank": 16}}}))  # fmt: skip
    return run


PLAN = {"fits": True, "profile": "3090", "step_seconds_estimate": 1.5,
        "settings": {"memory.blocks_to_swap": 8, "memory.gradient_checkpointing": True, "memory.group_offload": False},
        "phases": {"train": {"vram_peak_bytes": 20 * GIB, "ram_peak_bytes": 30 * GIB}}}  # fmt: skip


def test_a_partial_last_line_is_left_for_later_and_a_broken_middle_line_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_summary_of_a_live_run_shows_progress_speed_eta_and_the_plan(tmp_path):
    view = load_run(write_run(tmp_path / "run", 4, total=10, partial=True, train_done=False, plan=PLAN))
    text = "\n".join(run_summary(view))
    assert "in progress (or stopped): step 4/10 (40%)" in text
    assert "speed: 2.00 s/step = 0.50 steps/s over the last 4 steps (plan predicted 1.50 s/step)" in text
    assert "ETA: 0m12s for 6 steps left" in text
    assert "plan: fits profile '3090'; memory: blocks_to_swap=8, gradient_checkpointing=True" in text
    assert "settings: ltx2 int8-torchao, 832x480 x 17 frames, batch 1, LoRA rank 16" in text
    assert "loss: 1.0000 at step 1 -> 0.2500 now" in text
    live = phases_with_live_train(view)[-1]  # the train phase is not in memory.jsonl until it ends
    assert live["name"] == "train (so far)" and live["rss_peak_bytes"] == 4 * GIB
    assert live["device_max_allocated_bytes"] == 3 * GIB and live["predicted_vram_bytes"] == 20 * GIB


def test_summary_of_a_finished_run_has_no_eta(tmp_path):
    view = load_run(write_run(tmp_path / "run", 4, total=4, partial=False, train_done=True))
    lines = run_summary(view)
    assert lines[0].endswith("finished at step 4/4") and not any(line.startswith("ETA") for line in lines)
    assert [p["name"] for p in phases_with_live_train(view)] == ["latent_cache", "train"]


def test_smoothing_is_debiased_and_follows_a_step():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    curve = smoothed([1.0] * 5 + [0.0] * 50)
    assert curve[0] == pytest.approx(1.0) and 0 < curve[10] < 1 and curve[-1] < 0.01


def test_dashboard_png_has_memory_and_training_panels(tmp_path):
    from PIL import Image

    run = write_run(tmp_path / "run", 4, total=10, partial=True, train_done=False)
    png = render_timeline(run)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (2000, 450)  # two 10x4.5 in panels at 100 dpi
    (run / "metrics.jsonl").unlink()
    with Image.open(render_timeline(run, tmp_path / "memory-only.png")) as img:
        assert img.size == (1000, 450)


def test_report_cli_on_a_live_run(tmp_path, cli):
    run = write_run(tmp_path / "run", 3, total=6, partial=True, train_done=False, plan=PLAN)
    out = tmp_path / "dash" / "live.png"
    result = cli("report", str(run), "--png", str(out))
    assert result.returncode == 0, result.stderr
    assert "step 3/6 (50%)" in result.stdout and "ETA: 0m06s" in result.stdout
    assert "train (so far)" in result.stdout and f"dashboard written to {out}" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_damaged_metrics_file_is_one_line(tmp_path, cli):
    run = write_run(tmp_path / "run", 3, total=6, partial=False, train_done=False)
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    result = cli("report", str(run))
    assert result.returncode == 1
    assert result.stderr.strip() == f"lowvram: error: {run / 'metrics.jsonl'} is not a lowvram metrics file: line 2 " \
        "is not JSON"
