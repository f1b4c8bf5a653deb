"""One run per folder: a second start into a folder a live run holds is refused in one line (exit 1) before any
work; the lock of a killed run is gone with its process (the kernel drops flock locks), so it never blocks a resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lowvram.config import RunConfig
from lowvram.train.run_folder import LOCK_FILE, RunFolderLocked, run_folder_lock

HOLD = (
    "import sys, time\n"
    "from lowvram.train.run_folder import run_folder_lock\n"
    "with run_folder_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A separate process holding `tmp_path/run`'s lock (it imports nothing heavy: a second or so)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_start_is_refused_naming_the_holder(holder):
    run_dir, proc = holder
    with pytest.raises(RunFolderLocked) as err:
        with run_folder_lock(run_dir):
            pass
    message = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in message
    assert message.startswith(f"{run_dir} is in use by another lowvram run (lowvram train, pid {proc.pid} on ")
    assert message.endswith("wait for it to finish, stop it, or choose another --output-dir")


def test_the_lock_of_a_killed_run_does_not_block_the_next_start(holder):
    run_dir, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert str(proc.pid) in (run_dir / LOCK_FILE).read_text()  # the dead holder's record is still there...
    with run_folder_lock(run_dir):  # ...but its lock died with it
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_FILE).read_text()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderLocked):  # a second open of the lock file conflicts, even in one process
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):
        pass


def test_a_training_into_a_held_folder_stops_before_any_work(holder):
    from lowvram.train.run import run

    run_dir, _ = holder
    cfg = RunConfig.model_validate({"model": {"family": "tiny"}, "data": {"dataset_dir": str(run_dir / "clips")},
                                    "output": {"output_dir": str(run_dir)}})  # fmt: skip
    with pytest.raises(RunFolderLocked):
        run(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no cache, no metrics, no dataset


def test_cli_second_train_into_a_held_folder_exits_1_in_one_line(holder, cli):
    run_dir, proc = holder
    r = cli("train", "--output-dir", str(run_dir), "--max-steps", "2")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lowvram: error: {run_dir} is in use by another lowvram run")
    assert f"pid {proc.pid}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


def test_caching_into_a_held_folder_is_refused_but_a_dry_run_is_not(holder):
    from lowvram.train.run import run, run_cache

    run_dir, _ = holder
    cfg = RunConfig.model_validate({"model": {"family": "tiny"}, "data": {"dataset_dir": str(run_dir / "clips")},
                                    "output": {"output_dir": str(run_dir)}})  # fmt: skip
    with pytest.raises(RunFolderLocked):
        run_cache(cfg)
    (run_dir / ".tmp-lora.safetensors.abcd").write_bytes(b"the live run's write in flight")
    assert run(cfg, dry_run=True).exit_code == 0  # a dry run writes nothing there, so it needs no lock...
    assert (run_dir / ".tmp-lora.safetensors.abcd").is_file()  # ...and leaves the live run's temp files alone
