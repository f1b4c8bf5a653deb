import time

import torch

from lowvram.telemetry import MEMORY_FILE, MemoryMonitor, read_memory_file, render_timeline

MB = 2**20


def test_allocation_peaks_in_its_own_phase_not_the_next(tmp_path):
    monitor = MemoryMonitor(tmp_path, interval_s=0.02)
    with monitor.phase("load"):
        time.sleep(0.05)
    with monitor.phase("text_cache"):
        block = torch.ones(512 * MB, dtype=torch.uint8)  # touched: resident, not just reserved
        time.sleep(0.1)
    del block
    with monitor.phase("train"):
        time.sleep(0.1)
    monitor.set_prediction("train", vram_bytes=123, ram_bytes=456)
    phases = {p.name: p for p in monitor.finish()}
    assert phases["text_cache"].rss_increase_bytes >= 512 * MB
    assert phases["train"].rss_increase_bytes < 64 * MB
    assert phases["load"].rss_increase_bytes < 64 * MB
    on_disk, samples = read_memory_file(tmp_path / MEMORY_FILE)
    assert [p["name"] for p in on_disk] == ["load", "text_cache", "train"]
    assert on_disk[2]["predicted_ram_bytes"] == 456 and len(samples) >= 3
    text_cache_samples = [s["rss_bytes"] for s in samples if s["phase"] == "text_cache"]
    assert max(text_cache_samples) >= on_disk[1]["rss_baseline_bytes"] + 512 * MB


def test_report_renders_png_with_phases(tmp_path):
    monitor = MemoryMonitor(tmp_path, interval_s=0.02)
    with monitor.phase("train"):
        time.sleep(0.05)
    monitor.set_prediction("train", ram_bytes=2**30)
    monitor.finish()
    png = render_timeline(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
