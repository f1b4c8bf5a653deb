"""Shared fixtures: tests run on CPU in fp32 with tiny models; subprocesses only where processes are the subject."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run `python -m lowvram ARGS` in a fresh process; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lowvram", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models are thousands of microsecond ops: intra-op threads only contend on a shared 2-core machine
    (measured 0.07 s/step on one thread vs 2.5 s on two). Subprocesses started by tests choose their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    return run_cli
