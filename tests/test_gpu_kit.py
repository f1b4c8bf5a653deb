"""The GPU acceptance kit runs here: `bash tools/gpu_acceptance.sh --simulate` (the whole logic on the simulated
accelerator, with PyAV and bitsandbytes unimportable as on the GPU machine), and gpu_wheels.sh's size guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ABSENT_ON_GPU_MACHINE = ("av", "bitsandbytes")


def test_acceptance_kit_simulated_runs_every_section_without_av_or_bitsandbytes(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    # As if not installed: `import av` fails and importlib.util.find_spec (what diffusers and peft ask) says None.
    (blocked / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_GPU_MACHINE)
    )
    out = tmp_path / "acceptance.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocked)}
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_acceptance.sh"), "--simulate", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bitsandbytes is not installed: nf4 cases are skipped" in r.stdout
    lines = r.stdout.strip().splitlines()
    assert lines[-2] == "acceptance_failed=none" and lines[-1].startswith("worst_peak_error=")
    data = json.loads(out.read_text())
    cases = {c["case"]: c for c in data["cases"]}
    assert {"a no offload", "b 3090 plan", "b 4070 plan"} <= set(cases)
    for c in cases.values():  # measured beside predicted, uncalibrated and calibrated
        assert c["ok"] and c["peak_bytes"] > 0 and c["step_s"] > 0
        assert abs(c["peak_bytes"] / c["predicted"]["peak_bytes"] - 1) < 0.05
        assert abs(c["step_s"] / c["calibrated"]["step_s"] - 1) < 0.15
    assert "block swap" in cases["b 3090 plan"]["settings"] and cases["b 3090 plan"]["h2d_bytes_per_step"] > 0
    assert cases["b 4070 plan"]["cap_bytes"] < cases["b 3090 plan"]["cap_bytes"]
    assert data["calibration"]["train_tflops"] > 0 and Path(data["calibrated_profile"]).is_file()
    strategies = {row["strategy"] for row in data["gpu_check"]["rows"]}
    assert {"none", "streaming", "block_swap", "group_block_level", "activation_offload"} <= strategies
    assert data["sanitizer"]["ok"] and data["skipped"] == []
    assert abs(data["worst_peak_error"]) < 0.05 and abs(data["worst_calibrated_step_error"]) < 0.15


def test_gpu_wheels_refuses_over_its_limit_and_leaves_no_folder(tmp_path):
    # a fake pip that "downloads" 2 MiB; with a 1 MiB limit the script refuses and .whl/ is not created
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    (repo / "tools" / "gpu_wheels.sh").write_text((REPO / "tools" / "gpu_wheels.sh").read_text())
    pip = tmp_path / "fakepip"
    pip.write_text('#!/usr/bin/env bash\nwhile [[ $# -gt 0 ]]; do [[ "$1" == --dest ]] && dest=$2; shift; done\n'
                   'head -c 2097152 /dev/zero > "$dest/big-1.0-py3-none-any.whl"\n')
    pip.chmod(0o755)
    r = subprocess.run(["bash", str(repo / "tools" / "gpu_wheels.sh")], env={**os.environ, "PIP": str(pip),
                       "LIMIT_MIB": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "over the 1 MiB limit" in r.stderr
    assert not (repo / ".whl").exists() and not (repo / ".whl.partial").exists()
    r = subprocess.run(["bash", str(repo / "tools" / "gpu_wheels.sh")], env={**os.environ, "PIP": str(pip)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "wheel_mib=2" in r.stdout and (repo / ".whl" / "big-1.0-py3-none-any.whl").is_file()
