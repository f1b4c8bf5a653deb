"""tools/gpu_check.py runs here with --simulate, so its GPU path's code is exercised end to end on every test run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"lowvram_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"lowvram_tools_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_check_simulate_prints_measured_beside_predicted(capsys):
    gpu_check = _load("gpu_check")
    code = gpu_check.main(["--simulate", "--layers", "3", "--steps", "1", "--strategies", "streaming,block_swap"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    for name in ("none", "streaming", "block_swap"):
        peak, predicted = float(lines[name][1]), float(lines[name][2])
        assert 0 < peak <= 1.05 * predicted
    assert float(lines["streaming"][6]) > 0  # MB moved per step
    assert out.strip().endswith("peaks_over_prediction=none")


def test_gpu_check_without_a_gpu_says_to_simulate():
    gpu_check = _load("gpu_check")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="--simulate"):
        gpu_check.main(["--strategies", "none"])
