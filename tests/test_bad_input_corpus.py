"""The bad-input corpus: every case ends in its exact one-line message (no traceback), a non-zero exit or a listed
skip, and nothing half-written on disk.

In-process calls where the message is the subject; `python -m lowvram` subprocesses only where the exit code and
the absence of a traceback on stderr are (they cost seconds each, so there are few of them).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_data_bad_input import audio_only_mp4  # tests/ is on sys.path (rootdir conftest)

from lowvram.errors import ConfigError, LowvramError, UsageError
from lowvram.fsutil import TMP_PREFIX

pytestmark = pytest.mark.bad_input


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def leftovers(folder: Path) -> list[Path]:
    """Temporary or half-written files under `folder` (what a failed write must never leave)."""
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)] if folder.exists() else []


@pytest.fixture(scope="module")
def tiny():
    from lowvram.models.ltx2 import build_tiny_components

    return build_tiny_components(seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Config files (exit code 2 through the CLI: ConfigError is a UsageError)

CONFIG_CASES = {
    "unknown key, closest suggestion": (
        "[optim]\nlearning_rat = 0.001\n",
        "{p}: unknown key 'optim.learning_rat' (did you mean 'optim.learning_rate'?)",
    ),
    "misspelt section": ("[trian]\nseed = 1\n", "{p}: unknown key 'trian' (did you mean 'train'?)"),
    "61 frames": ("[data]\nframes = 61\n", "{p}: 'data.frames': LTX-2 needs 8k+1 frames: use 57 or 65 (got 61)"),
    "resolution not a multiple of 32": (
        '[data]\nresolution = "500x480"\n',
        "{p}: 'data.resolution': resolution 500x480: each side must be a multiple of 32 (LTX-2's VAE compresses "
        "32x): use 480 or 512 instead of 500 (got '500x480')",
    ),
    "wrong type": (
        '[lora]\nrank = "big"\n',
        "{p}: 'lora.rank': Input should be a valid integer, unable to parse string as an integer (got 'big')",
    ),
    "negative learning rate": (
        "[optim]\nlearning_rate = -0.001\n",
        "{p}: 'optim.learning_rate': Input should be greater than 0 (got -0.001)",
    ),
    "unknown model family": (
        '[model]\nfamily = "wan"\n',
        "{p}: 'model.family': Input should be 'ltx2' or 'tiny' (got 'wan')",
    ),
    "unknown precision": (
        '[model]\nprecision = "int8-torcha"\n',
        "{p}: 'model.precision': unknown precision 'int8-torcha' (did you mean 'int8-torchao'?); valid: bf16, fp32, "
        "int8-quanto, int8-torchao, nf4-bnb, fp8-torchao (got 'int8-torcha')",
    ),
    "malformed TOML": (
        '[model\nfamily = "tiny"\n',
        "{p}: malformed TOML: Expected ']' at the end of a table declaration (at line 1, column 7)",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_file_is_one_line_with_exit_code_2(tmp_path, case):
    from lowvram.config import load_config

    text, expected = CONFIG_CASES[case]
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert one_line(err.value) == expected.format(p=path)
    assert err.value.exit_code == 2


SIMPLETUNER_CASES = {
    "unknown SimpleTuner key": (
        {"model_family": "ltxvideo2", "lora_rnk": 16},
        "{p}: unknown key 'lora_rnk' (did you mean 'lora_rank'?)",
    ),
    "full fine-tune asked": (
        {"model_family": "ltxvideo2", "model_type": "full"},
        "{p}: 'model_type': model_type 'full' is not supported: lowvram trains LoRA only (use \"lora\")",
    ),
    "other model family": (
        {"model_family": "flux"},
        "{p}: 'model_family': model_family 'flux' is not supported: lowvram trains LTX-2 (use \"ltxvideo2\")",
    ),
}


@pytest.mark.parametrize("case", list(SIMPLETUNER_CASES))
def test_bad_simpletuner_config_is_one_line(tmp_path, case):
    from lowvram.config import load_config

    raw, expected = SIMPLETUNER_CASES[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert one_line(err.value) == expected.format(p=path)


def test_missing_config_file(tmp_path):
    from lowvram.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml")
    assert one_line(err.value) == f"config file {tmp_path / 'nope.toml'} does not exist"


# ---------------------------------------------------------------------------------------------------------------
# Profiles and quantization backends


def test_unknown_profile():
    from lowvram.profiles import builtin_profile_names, load_profile

    with pytest.raises(UsageError) as err:
        load_profile("4080ti")
    assert one_line(err.value) == (
        f"unknown profile '4080ti' (did you mean '4090'?); valid profiles: {', '.join(builtin_profile_names())} "
        "or a path to a .toml file"
    )


@pytest.mark.parametrize(
    "precision, profile, expected",
    [
        ("fp8-torchao", "3090",
         "precision fp8-torchao needs fp8 (e4m3) support (Ada, Hopper or Blackwell GPUs), which profile '3090' lacks; "
         "use int8-quanto or int8-torchao (or bf16) instead"),
        ("nf4-bnb", "7900xtx",
         "precision nf4-bnb needs a bitsandbytes build with kernels for this device, which profile '7900xtx' lacks; "
         "use int8-quanto or int8-torchao (or bf16) instead"),
    ],
)  # fmt: skip
def test_quantization_backend_the_profile_cannot_run(precision, profile, expected):
    from lowvram.profiles import load_profile
    from lowvram.quant.precision import check_backend_supported

    with pytest.raises(LowvramError) as err:
        check_backend_supported(precision, load_profile(profile))
    assert one_line(err.value) == expected


def test_8bit_optimizer_on_a_profile_without_bitsandbytes():
    from lowvram.config import RunConfig
    from lowvram.plan import plan_run
    from lowvram.profiles import load_profile

    cfg = RunConfig.model_validate({"model": {"family": "ltx2"}, "optim": {"optimizer": "adamw8bit"}})
    with pytest.raises(LowvramError) as err:
        plan_run(cfg, load_profile("7900xtx"), choose=False)
    assert one_line(err.value) == (
        "optim.optimizer 'adamw8bit' needs bitsandbytes, which profile '7900xtx' lacks: use 'adamw_bf16'"
    )


# ---------------------------------------------------------------------------------------------------------------
# Model checkpoints: safetensors only, keys and shapes named, interrupted downloads recognised


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from lowvram.models.ltx2 import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


PICKLE_MESSAGE = "{path} is a pickle checkpoint; lowvram loads safetensors only: convert it to .safetensors"


def _open(path):
    from lowvram.models.ltx2 import load_components

    return load_components(path, components=("transformer",))


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(LowvramError) as err:
        _open(tmp_path / "ltx-2.safetensors")
    assert one_line(err.value) == (
        f"checkpoint {tmp_path / 'ltx-2.safetensors'} does not exist: give the .safetensors file or a diffusers folder"
    )


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "model.ckpt"])
def test_pickle_checkpoint_is_refused_unread(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(LowvramError) as err:
        _open(path)
    assert one_line(err.value) == PICKLE_MESSAGE.format(path=path)


def test_diffusers_folder_with_only_pickle_weights(tmp_path):
    sub = tmp_path / "transformer"
    sub.mkdir()
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LowvramError) as err:
        _open(tmp_path)
    assert one_line(err.value) == (
        f"{sub} has only pickle weights (diffusion_pytorch_model.bin); lowvram loads safetensors only"
    )


def test_safetensors_with_wrong_keys(tmp_path):
    path = tmp_path / "other-model.safetensors"
    save_file({"unet.down.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LowvramError) as err:
        _open(path)
    assert one_line(err.value) == f"{path} holds no LTX-2 weights (no 'model.diffusion_model.' / 'vae.' keys)"


def test_safetensors_with_a_wrong_shape_names_it(tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_checkpoint))
    key = "model.diffusion_model.proj_out.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    path = tmp_path / "resized.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LowvramError) as err:
        _open(path)
    shape = list(tensors[key].shape)
    assert one_line(err.value) == (
        f"{path} does not fit the LTX-2 transformer: 1 wrongly shaped: proj_out.weight {shape} "
        f"(model wants {[shape[0], shape[1] - 1]}) (wrong model family or a damaged file?)"
    )


def test_safetensors_missing_keys_are_named(tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_checkpoint))
    del tensors["model.diffusion_model.proj_out.bias"]
    path = tmp_path / "pruned.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LowvramError) as err:
        _open(path)
    assert one_line(err.value) == (
        f"{path} does not fit the LTX-2 transformer: 1 missing: proj_out.bias (wrong model family or a damaged file?)"
    )


def test_truncated_safetensors_says_it_was_cut(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "ltx-2.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowvramError) as err:
        _open(path)
    assert one_line(err.value) == (
        f"{path} is truncated ({len(data) // 2} of {len(data)} bytes): the download or copy was interrupted; "
        "fetch the file again"
    )


def test_interrupted_download_folder(tmp_path, tiny):
    from lowvram.models.ltx2 import save_diffusers_folder

    folder = tmp_path / "LTX-2"
    save_diffusers_folder(tiny, folder)
    # What `hf download --local-dir` leaves when stopped: a partial blob under .cache and a short weights file.
    partial = folder / ".cache" / "huggingface" / "download" / "transformer" / "abc123.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 100)
    with pytest.raises(LowvramError) as err:
        _open(folder)
    assert one_line(err.value) == (
        f"{folder} is an interrupted download (abc123.incomplete is still there): run the download again to finish "
        "it, then retry"
    )


def test_missing_text_encoder_folder(tmp_path, tiny_checkpoint):
    from lowvram.models.ltx2 import load_components

    with pytest.raises(LowvramError) as err:
        load_components(tiny_checkpoint, tmp_path / "gemma-3", components=("text_encoder",))
    assert one_line(err.value) == (
        f"text encoder folder {tmp_path / 'gemma-3'} does not exist: give the local Gemma3 folder"
    )


# ---------------------------------------------------------------------------------------------------------------
# Dataset items: each bad one is skipped and listed in the summary; the good ones are cached


def _write_video(path: Path, frames: int, size: int = 64, audio: bool = False) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 13) % 255, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    from lowvram.data.synthetic import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("messy")
    make_synthetic_dataset(folder, n_clips=2)
    good = (folder / "clip_000.mp4").read_bytes()
    files = {
        "corrupt.mp4": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
        "truncated.mp4": good[:200],
        "zero.mp4": b"",
        "notes.mp4": b"these are my notes, not a video\n" * 20,
        "clip.avi": good,
        "no_caption.mp4": good,
        "empty_caption.mp4": good,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    audio_only_mp4(folder / "no_video.mp4")
    _write_video(folder / "short.mp4", frames=9)
    for name in ("corrupt", "truncated", "zero", "notes", "clip", "no_video", "short"):
        (folder / f"{name}.txt").write_text("a red circle")
    (folder / "empty_caption.txt").write_text("  \n")
    return folder


DATA_SKIPS = {
    "zero.mp4": "zero-byte file",
    "no_video.mp4": "no video stream",
    "no_caption.mp4": "missing caption file no_caption.txt",
    "empty_caption.mp4": "empty caption file empty_caption.txt",
    "clip.avi": "unsupported file type .avi: convert it to .mp4, .mov, .webm, .mkv, .png, .jpg, .jpeg, .webp, .bmp",
    "short.mp4": "too short: 9 frames at 25 fps, min_frames is 17",
}
UNDECODABLE = ("corrupt.mp4", "truncated.mp4", "notes.mp4")


@pytest.fixture(scope="module")
def messy_summary(tiny, messy, tmp_path_factory):
    from lowvram.data.build import build_caches
    from lowvram.data.spec import DataConfig, folder_dataset
    from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS

    cache = tmp_path_factory.mktemp("cache")
    data = DataConfig((folder_dataset(messy, resolution=(64, 64), frames=17),))
    return build_caches(data, tiny, cache, max_text_tokens=TINY_MAX_TEXT_TOKENS), cache


@pytest.mark.parametrize("name", list(DATA_SKIPS))
def test_bad_dataset_item_is_skipped_with_its_exact_reason(messy_summary, name):
    summary, _ = messy_summary
    reasons = {s.path.name: s.reason for s in summary.skipped}
    assert reasons[name] == DATA_SKIPS[name]
    assert f"{name}: {DATA_SKIPS[name]}" in summary.format()


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_file_is_skipped_as_such(messy_summary, name):
    summary, _ = messy_summary
    reasons = {s.path.name: s.reason for s in summary.skipped}
    assert reasons[name].startswith("cannot decode (") and "\n" not in reasons[name]


def test_good_items_are_cached_and_nothing_is_half_written(messy_summary):
    summary, cache = messy_summary
    assert sorted(i.latent_path.name.split("-")[0] for i in summary.items) == ["clip_000", "clip_001"]
    assert len(summary.skipped) == len(DATA_SKIPS) + len(UNDECODABLE)
    assert leftovers(cache) == []
    for f in cache.rglob("*.safetensors"):
        load_file(str(f))


def test_dataset_folder_that_does_not_exist(tiny, tmp_path):
    from lowvram.data.build import build_caches
    from lowvram.data.spec import DataConfig, folder_dataset

    data = DataConfig((folder_dataset(tmp_path / "clips", resolution=(64, 64)),))
    with pytest.raises(LowvramError) as err:
        build_caches(data, tiny, tmp_path / "cache", max_text_tokens=32)
    assert one_line(err.value) == (
        "no usable dataset items (clips: cannot read folder (No such file or directory); check the path and "
        "permissions); add clips with .txt captions or fix the paths"
    )
    assert not (tmp_path / "cache").exists()


def test_dataset_id_that_would_climb_out_of_the_cache(tmp_path):
    from lowvram.data.spec import parse_multidatabackend

    with pytest.raises(UsageError) as err:
        parse_multidatabackend([{"id": "../x", "instance_data_dir": str(tmp_path)}], base_dir=tmp_path)
    assert one_line(err.value) == (
        "dataset id '../x' cannot be used as a folder name: give a plain name without '/' or '..'"
    )


# ---------------------------------------------------------------------------------------------------------------
# Disks: full, read-only


def test_disk_full_while_writing_a_cache_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    from lowvram.data.build import build_caches
    from lowvram.data.spec import DataConfig, folder_dataset
    from lowvram.data.synthetic import make_synthetic_dataset
    from lowvram.models.ltx2 import TINY_MAX_TEXT_TOKENS

    clips, cache = tmp_path / "clips", tmp_path / "cache"
    make_synthetic_dataset(clips, n_clips=2)
    real_save = safetensors.torch.save_file
    written = []

    def save_until_full(tensors, filename, metadata=None):
        if "latents" in str(filename):
            if written:  # the second latent entry finds the disk full half-way through its write
                Path(filename).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    data = DataConfig((folder_dataset(clips, resolution=(64, 64), frames=17),))
    with pytest.raises(LowvramError) as err:
        build_caches(data, tiny, cache, max_text_tokens=TINY_MAX_TEXT_TOKENS)
    [first] = list((cache / "latents" / "clips").iterdir())  # the entry written before the disk filled up
    target = next(p for p in sorted(clips.glob("*.mp4")) if not first.name.startswith(p.stem + "-"))
    assert one_line(err.value).startswith("cannot write ") and one_line(err.value).endswith(
        ": no space left on the device; free disk space or choose another folder"
    )
    assert target.stem in str(err.value)
    assert leftovers(cache) == []
    load_file(str(first))  # what is there is whole


def test_read_only_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    import lowvram.paths
    from lowvram.config import RunConfig
    from lowvram.train.run import run

    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)

    def refuse(folder):
        # Root ignores permission bits: simulate what a normal user (or a read-only mount) gets.
        raise PermissionError(errno.EROFS, "Read-only file system")

    if os.geteuid() == 0:
        monkeypatch.setattr(lowvram.paths, "_probe_write", refuse)
    cfg = RunConfig.model_validate(
        {"model": {"family": "tiny"}, "data": {"dataset_dir": str(tmp_path / "clips")},
         "output": {"output_dir": str(out)}}
    )  # fmt: skip
    try:
        with pytest.raises(LowvramError) as err:
            run(cfg)
    finally:
        out.chmod(0o755)
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert one_line(err.value) == f"output_dir {out.resolve()} is not writable ({reason}): choose a writable folder"
    assert list(out.iterdir()) == []


def test_out_of_memory_while_caching_is_one_line_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    from lowvram.config import RunConfig
    from lowvram.train import run as assembly

    def encode_out_of_memory(cfg, run_dir, backend, *, monitor, console=None, profile=None, validation=None):
        with monitor.phase("latent_cache"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.69 GiB total)")

    monkeypatch.setattr(assembly, "cache_dataset", encode_out_of_memory)
    out = tmp_path / "run"
    cfg = RunConfig.model_validate(
        {"model": {"family": "tiny"}, "data": {"dataset_dir": str(tmp_path / "clips")},
         "output": {"output_dir": str(out)}}
    )  # fmt: skip
    with pytest.raises(LowvramError) as err:
        assembly.run(cfg)
    assert one_line(err.value) == (
        "out of device memory in phase 'latent_cache' (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
        "23.69 GiB total)); lower data.resolution, data.frames or train.batch_size (or set memory.vae_tiling = "
        "true for caching) and rerun: caches and checkpoints are kept"
    )
    assert leftovers(out) == []


def test_output_dir_that_is_a_file(tmp_path):
    from lowvram.paths import writable_dir

    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(UsageError) as err:
        writable_dir(f, what="output_dir")
    assert one_line(err.value) == f"output_dir {f.resolve()} is a file, not a folder: choose another path"


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def test_resume_from_a_folder_that_does_not_exist(tmp_path):
    from lowvram.train.checkpoint import resolve_resume

    with pytest.raises(UsageError) as err:
        resolve_resume(tmp_path, str(tmp_path / "step-9"))
    assert one_line(err.value) == (
        f"--resume {tmp_path / 'step-9'}: no such checkpoint folder (use 'latest' or a checkpoints/step-* folder)"
    )


def test_resume_from_a_damaged_checkpoint(tmp_path):
    from lowvram.train.checkpoint import resolve_resume

    ckpt = tmp_path / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "lora.safetensors").write_bytes(b"0123")
    (ckpt / "manifest.json").write_text(json.dumps({"files": {"lora.safetensors": {"bytes": 4, "sha256": "0" * 64}}}))
    with pytest.raises(LowvramError) as err:
        resolve_resume(tmp_path, str(ckpt))
    assert one_line(err.value) == (
        f"--resume {ckpt}: not a usable checkpoint: lora.safetensors does not match its checksum; use 'latest' or "
        "another one"
    )


# ---------------------------------------------------------------------------------------------------------------
# Through the CLI: exit codes, one line on stderr, no traceback


def _cli_error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("lowvram: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("lowvram: error: ")


def test_cli_config_error_exits_2_in_one_line(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlearning_rat = 0.001\n")
    result = cli("train", "--config", str(path), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert _cli_error(result) == f"{path}: unknown key 'optim.learning_rat' (did you mean 'optim.learning_rate'?)"
    assert not (tmp_path / "out").exists()


def test_cli_pickle_checkpoint_exits_1_in_one_line(cli, tmp_path):
    ckpt = tmp_path / "ltx-2.pt"
    ckpt.write_bytes(b"\x80\x04 pickle")
    path = tmp_path / "run.toml"
    path.write_text(
        f'[model]\nfamily = "tiny"\ncheckpoint = "{ckpt}"\n[data]\ndataset_dir = "{tmp_path / "clips"}"\n'
        f'[output]\noutput_dir = "{tmp_path / "out"}"\n'
    )
    result = cli("train", "--config", str(path))
    assert result.returncode == 1
    assert _cli_error(result) == PICKLE_MESSAGE.format(path=ckpt)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out" / "checkpoints").exists()
