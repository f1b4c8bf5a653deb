"""An interrupted caching run leaves no partial cache file, and the rerun completes reusing what was written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from lowvram.data.build import build_caches
from lowvram.data.spec import DataConfig, folder_dataset
from lowvram.data.synthetic import make_synthetic_dataset
from lowvram.fsutil import TMP_PREFIX
from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS, build_tiny_components

CHILD = textwrap.dedent(
    """
    import sys, time
    from lowvram.data.build import build_caches
    from lowvram.data.spec import DataConfig, folder_dataset
    from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS, build_tiny_components

    def progress(done, total, item, state):
        print("done", done, flush=True)
        time.sleep(0.2)  # keep the run alive long enough to be killed between and during writes

    data = DataConfig((folder_dataset(sys.argv[1], resolution=(64, 64), frames=17),))
    build_caches(data, build_tiny_components(), sys.argv[2], max_text_tokens=TINY_MAX_TEXT_TOKENS, progress=progress)
    print("finished", flush=True)
    """
)


@pytest.mark.faults  # a fresh process imports diffusers: ~20-40 s on a loaded machine
def test_killed_caching_leaves_no_partial_file_and_rerun_completes(tmp_path):
    clips, cache = tmp_path / "clips", tmp_path / "cache"
    make_synthetic_dataset(clips, n_clips=10)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(clips), str(cache)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:
            if line.startswith("done 3") or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL

    written = list((cache / "latents").rglob("*.safetensors"))
    assert 3 <= len(written) < 10  # killed mid-way
    for f in written + list((cache / "text").glob("*.safetensors")):
        load_file(str(f))  # every visible cache file is complete

    data = DataConfig((folder_dataset(clips, resolution=(64, 64), frames=17),))
    summary = build_caches(data, build_tiny_components(), cache, max_text_tokens=TINY_MAX_TEXT_TOKENS)
    assert summary.latents_reused == len(written) and summary.latents_written == 10 - len(written)
    assert len(summary.items) == 10 and not summary.skipped
    assert not [p for p in cache.rglob("*") if p.name.startswith(TMP_PREFIX)]
