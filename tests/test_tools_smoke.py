"""The benchmarks in tools/ stay runnable: each runs end to end at a toy size and prints its ratio line.

Figures come from full-size runs (README); these only keep the scripts from rotting between releases.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_bench_train_prints_throughput_ratio():
    out = run_tool("tools/bench_train.py", "--steps", "2", "--rounds", "1")
    assert re.search(r"^throughput_ratio=\d+\.\d+$", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_offload_prints_worst_ratio():
    out = run_tool("tools/bench_offload.py", "--steps", "1", "--layers", "2", "--height", "2", "--width", "2",
                   "--cases", "none,block_swap_spread")  # fmt: skip
    assert re.search(r"^worst_step_time_ratio=\d+\.\d+$", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_quant_load_prints_rss_ratio(tmp_path):
    out = run_tool("tools/bench_quant_load.py", "--gb", "0.05", "--dir", str(tmp_path))
    assert re.search(r"^peak_rss_over_quantized=\d+\.\d+$", out.strip().splitlines()[-1])
