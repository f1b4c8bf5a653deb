"""Hub model ids resolved from a local Hugging Face cache built here from the tiny model (no network, HF_HUB_OFFLINE=1).

The cache layout is huggingface_hub's own: models--ORG--NAME/{blobs,refs/main,snapshots/<commit>/...}, files as
symlinks to blobs, exactly what `hf download` leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lowvram import hub
from lowvram.config import apply_overrides, load_config
from lowvram.demo import default_demo_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Put `files` ({path in repo: local file}) into an HF cache the way huggingface_hub stores a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An HF cache holding the tiny model as the official single file, as a diffusers-layout repo, and a Gemma repo."""
    from lowvram.models import ltx2
    from lowvram.models.ltx2 import save_diffusers_folder, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("hub")
    src = root / "src"
    single = save_tiny_checkpoint(src / "single")
    cache = root / "cache"
    add_to_cache(cache, "Lightricks/LTX-2", {"ltx-2-19b-dev.safetensors": single})
    gemma = src / "single" / "gemma"
    gemma_files = {**tree(gemma / "text_encoder"), **tree(gemma / "tokenizer")}
    add_to_cache(cache, "google/gemma-tiny", gemma_files)
    comps = ltx2.build_tiny_components(seed=0)
    save_diffusers_folder(comps, src / "diffusers")
    (src / "diffusers" / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    add_to_cache(cache, "someone/ltx2-tiny-diffusers", tree(src / "diffusers"))
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_cfg(cache: Path, **model):
    return load_config(None, {"model.family": "tiny", "model.cache_dir": str(cache),
                              **{f"model.{k}": v for k, v in model.items()}})[0]  # fmt: skip


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    ref = hub.parse_ref("Lightricks/LTX-2@abc123:sub/file.safetensors", "model.checkpoint")
    assert (ref.repo_id, ref.revision, ref.filename) == ("Lightricks/LTX-2", "abc123", "sub/file.safetensors")
    assert hub.parse_ref("Lightricks/LTX-2.3", "model.checkpoint").filename is None
    real = tmp_path / "org"
    (real / "name").mkdir(parents=True)
    for local in (str(real / "name"), "./models/ltx.safetensors", "models/ltx-2.safetensors", "~/ltx", "C:\\m\\x"):
        assert hub.parse_ref(local, "model.checkpoint") is None, local


def test_the_file_is_chosen_by_repo_and_flavour():
    ref = hub.parse_ref("Lightricks/LTX-2", "model.checkpoint")
    assert hub.needed_files(ref, flavour="dev").filename == "ltx-2-19b-dev.safetensors"
    assert hub.needed_files(ref, flavour="dev-fp8").filename == "ltx-2-19b-dev-fp8.safetensors"
    assert hub.needed_files(ref, flavour="distilled").filename == "ltx-2-19b-distilled.safetensors"
    fp8_23 = hub.needed_files(hub.parse_ref("Lightricks/LTX-2.3", "model.checkpoint"), flavour="dev-fp8")
    assert (fp8_23.repo_id, fp8_23.filename) == ("Lightricks/LTX-2.3-fp8", "ltx-2.3-22b-dev-fp8.safetensors")
    other = hub.needed_files(hub.parse_ref("someone/ltx2", "model.checkpoint"), flavour="dev")
    assert other.filename is None and "transformer/*.safetensors" in other.patterns
    assert not any(p.endswith((".bin", ".pt", ".ckpt")) for p in other.patterns)  # never a pickle


def test_official_single_file_resolves_offline_by_id_and_loads(hub_cache, offline):
    from lowvram.models.ltx2 import load_components

    cfg = tiny_cfg(hub_cache, checkpoint="Lightricks/LTX-2", text_encoder_path="google/gemma-tiny")
    resolved = hub.resolve_model_paths(cfg)
    ckpt = Path(resolved.model.checkpoint)
    assert ckpt.name == "ltx-2-19b-dev.safetensors" and ckpt.is_relative_to(hub_cache)
    assert Path(resolved.model.text_encoder_path).is_relative_to(hub_cache)
    comps = load_components(ckpt, resolved.model.text_encoder_path, dtype=torch.float32)
    assert comps.transformer is not None and comps.text_encoder is not None and comps.tokenizer is not None


def test_revision_and_explicit_file_resolve_offline(hub_cache, offline):
    cfg = tiny_cfg(hub_cache, checkpoint=f"Lightricks/LTX-2@{COMMIT}:ltx-2-19b-dev.safetensors")
    assert COMMIT in hub.resolve_model_paths(cfg).model.checkpoint


def test_diffusers_layout_repo_resolves_offline_to_its_snapshot(hub_cache, offline):
    from lowvram.models.ltx2 import load_components, open_checkpoint

    cfg = tiny_cfg(hub_cache, checkpoint="someone/ltx2-tiny-diffusers")
    folder = Path(hub.resolve_model_paths(cfg).model.checkpoint)
    assert (folder / "transformer" / "config.json").is_file()
    assert open_checkpoint(folder).kind == "diffusers"
    comps = load_components(folder, dtype=torch.float32, components=("transformer", "connectors", "text_encoder"))
    assert comps.transformer is not None and comps.text_encoder is not None  # text_encoder/ from the same repo


def test_download_estimate_offline_counts_the_cache_and_never_downloads(hub_cache, offline):
    cached = hub.download_estimate(tiny_cfg(hub_cache, checkpoint="Lightricks/LTX-2"))
    assert cached.download_bytes == 0 and cached.items[0]["cached_bytes"] > 0 and cached.has_room is True
    assert "the disk has room" in cached.lines()[-1]
    missing = hub.download_estimate(tiny_cfg(hub_cache, checkpoint="Lightricks/LTX-2", flavour="dev-fp8"))
    assert missing.download_bytes is None and missing.has_room is None
    assert "cannot know the download size offline" in missing.lines()[-1]
    snapshot = hub_cache / "models--Lightricks--LTX-2" / "snapshots" / COMMIT
    assert not (snapshot / "ltx-2-19b-dev-fp8.safetensors").exists()


def test_plan_json_reports_the_download_and_fetches_nothing(hub_cache, tmp_path, cli):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nfamily = "ltx2"\ncheckpoint = "Lightricks/LTX-2"\nflavour = "dev-fp8"\n'
                   f'cache_dir = "{hub_cache}"\n')  # fmt: skip
    before = sorted(p.name for p in hub_cache.rglob("*"))
    result = cli("plan", "--config", str(cfg), "--profile", "3090", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode in (0, 1), result.stderr
    download = json.loads(result.stdout)["download"]
    assert download["offline"] is True and download["download_bytes"] is None
    assert download["items"][0]["label"] == "Lightricks/LTX-2:ltx-2-19b-dev-fp8.safetensors"
    assert sorted(p.name for p in hub_cache.rglob("*")) == before


@pytest.mark.slow
def test_training_from_hub_ids_offline(hub_cache, tmp_path, offline):
    from lowvram.demo import prepare_demo_dataset
    from lowvram.train.loop import read_metrics
    from lowvram.train.run import run_train

    cfg = apply_overrides(
        default_demo_config(tmp_path / "out"),
        {
            "model.checkpoint": "Lightricks/LTX-2",
            "model.text_encoder_path": "google/gemma-tiny",
            "model.cache_dir": str(hub_cache),
            "data.dataset_dir": str(tmp_path / "clips"),
            "train.max_train_steps": 2,
        },
    )
    prepare_demo_dataset(cfg)
    threads = torch.get_num_threads()
    try:
        assert run_train(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]


def test_train_dry_run_reports_the_download_and_fetches_nothing(hub_cache, tmp_path, offline):
    from rich.console import Console

    from lowvram.profiles import load_profile
    from lowvram.train.run import run

    cfg = apply_overrides(default_demo_config(tmp_path / "out"), {
        "model.checkpoint": "Lightricks/LTX-2", "model.flavour": "distilled", "model.cache_dir": str(hub_cache)})
    console = Console(record=True, width=200)
    run(cfg, profile=load_profile("3090"), dry_run=True, console=console)
    text = console.export_text()
    assert "Lightricks/LTX-2:ltx-2-19b-distilled.safetensors: size unknown (not cached" in text
    assert "cannot know the download size offline" in text
    assert not (tmp_path / "out" / "lora.safetensors").exists()
