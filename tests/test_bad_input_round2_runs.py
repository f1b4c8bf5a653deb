"""Bad input, second round, the training side: each case is one line naming its source, exit 2 for usage errors,
before any work, and nothing half-written. Plus: files lowvram writes get the user's umask.

`CASES` lists every bad-input case this file holds (the corpus is counted from such lists).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowvram.config import load_config
from lowvram.errors import ConfigError
from lowvram.fsutil import TMP_PREFIX, atomic_write_text, save_safetensors_atomic

pytestmark = pytest.mark.bad_input

FLAG_CASES = {
    "--nproc 0": (("train", "--nproc", "0"), "--nproc 0: give 1 or more processes (one per GPU)"),
    "--nproc -1": (("train", "--nproc", "-1"), "--nproc -1: give 1 or more processes (one per GPU)"),
    "--lr inf": (("train", "--lr", "inf"), "--lr inf: give a finite learning rate above 0, e.g. --lr 1e-4"),
    "--lr nan": (("train", "--lr", "nan"), "--lr nan: give a finite learning rate above 0, e.g. --lr 1e-4"),
    "--max-steps 0": (
        ("train", "--max-steps", "0"),
        "--max-steps 0: give 1 or more optimizer steps (to train by epochs instead, leave --max-steps out and set "
        "train.num_train_epochs)",
    ),
    '--output-dir ""': (
        ("train", "--output-dir", ""), "--output-dir is empty: give the run folder, e.g. --output-dir runs/first"
    ),
    'cache --output-dir " "': (
        ("cache", "--output-dir", " "), "--output-dir is empty: give the run folder, e.g. --output-dir runs/first"
    ),
}

CONFIG_CASES = {
    "learning_rate = inf": ("[optim]\nlearning_rate = inf\n", "{p}: 'optim.learning_rate': Input should be a finite "
                            "number (got inf)"),
    "learning_rate = nan": ("[optim]\nlearning_rate = nan\n", "{p}: 'optim.learning_rate': Input should be a finite "
                            "number (got nan)"),
    "no steps and no epochs": (
        "[train]\nmax_train_steps = 0\n",
        "{p}: train.max_train_steps and train.num_train_epochs are both 0: set one of them above 0",
    ),
}

WRITE_CASES = {
    "file-size limit (EFBIG) on a plain file": "text",
    "file-size limit (EFBIG) on a safetensors file": "safetensors",
}

CASES = {**FLAG_CASES, **CONFIG_CASES, **WRITE_CASES}


@pytest.mark.parametrize("name", FLAG_CASES)
def test_bad_train_flag_is_one_line_exit_2_before_any_work(name, tmp_path, cli):
    args, message = FLAG_CASES[name]
    r = cli(*args, cwd=tmp_path)  # the demo would write output/demo/ here
    assert r.returncode == 2, r.stdout[-500:] + r.stderr[-500:]
    assert r.stderr.strip().splitlines() == [f"lowvram: error: {message}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_bad_training_value_in_a_config_file(name, tmp_path):
    text, message = CONFIG_CASES[name]
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == message.format(p=path) and err.value.exit_code == 2


WRITE_UNDER_LIMIT = """
import resource, sys, torch
from lowvram.errors import LowvramError
from lowvram.fsutil import atomic_write_text, save_safetensors_atomic
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # as a FAT32 drive's 4 GiB cap, scaled down
path = sys.argv[1]
try:
    if sys.argv[2] == "text":
        atomic_write_text(path, "x" * 10000)
    else:
        save_safetensors_atomic({"lora_A": torch.zeros(10000)}, path)
except LowvramError as e:
    print(e)
    sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("name", WRITE_CASES)
def test_a_file_size_limit_is_one_line_naming_the_file_and_leaves_nothing(name, tmp_path):
    target = tmp_path / ("big.txt" if WRITE_CASES[name] == "text" else "lora.safetensors")
    r = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT, str(target), WRITE_CASES[name]],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stdout.strip().splitlines() == [
        f"cannot write {target}: the file is larger than this file system (or the process's file-size limit) "
        "allows; FAT32-formatted drives cap files at 4 GiB: write to an NTFS, exFAT, ext4 or APFS drive (or raise "
        "`ulimit -f`)"
    ]
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temp file


# ---------------------------------------------------------------------------------------------------------------
# Files get the user's umask (they were 0600: a ComfyUI service running as another user could not read the LoRA)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_and_checkpoint_folders_get_the_users_umask(tmp_path, umask, mask):
    from test_checkpoint_files import _objects, _save

    umask(mask)
    atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
    save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    folder = _save(tmp_path / "run", 1, *_objects())
    assert mode(tmp_path / "metrics.jsonl") == 0o666 & ~mask
    assert mode(tmp_path / "lora.safetensors") == 0o666 & ~mask
    assert mode(folder) == 0o777 & ~mask
    assert {mode(p) for p in folder.iterdir()} == {0o666 & ~mask}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]
