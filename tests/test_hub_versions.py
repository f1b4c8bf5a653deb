"""Hub ids follow model.version (issue 20 x issue 15): the family repo Lightricks/LTX-2 with model.version 2.3 fetches
LTX-2.3's file; a release's repo sets the version the plan uses when model.version is omitted; a contradiction, and
a 2.5 hub id without an explicit file, are refused in one line. Offline: an HF cache built here from the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hub import COMMIT, add_to_cache  # tests/ is on sys.path (rootdir conftest)

from lowvram import hub
from lowvram.config import load_config
from lowvram.errors import UsageError
from lowvram.models.ltx2 import run_model_version


def cfg_of(**model):
    return load_config(None, {f"model.{k}": v for k, v in model.items()})[0]


def checkpoint_need(cfg) -> hub.Needed:
    (need,) = [n for n in hub.model_refs(cfg) if n.ref.key == "model.checkpoint"]
    return need


@pytest.fixture(scope="module")
def cache_23(tmp_path_factory):
    """An HF cache holding a tiny LTX-2.3 checkpoint as Lightricks/LTX-2.3's distilled file."""
    from lowvram.models.ltx2 import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("hub23")
    single = save_tiny_checkpoint(root / "src", version="2.3")
    cache = root / "cache"
    add_to_cache(cache, "Lightricks/LTX-2.3", {"ltx-2.3-22b-distilled.safetensors": single})
    return cache


@pytest.mark.parametrize(
    ("version", "flavour", "repo", "filename"),
    [
        (None, "dev", "Lightricks/LTX-2", "ltx-2-19b-dev.safetensors"),
        ("2.0", "distilled", "Lightricks/LTX-2", "ltx-2-19b-distilled.safetensors"),
        ("2.3", "dev", "Lightricks/LTX-2.3", "ltx-2.3-22b-dev.safetensors"),
        ("2.3", "distilled", "Lightricks/LTX-2.3", "ltx-2.3-22b-distilled.safetensors"),
        ("2.3", "dev-fp8", "Lightricks/LTX-2.3-fp8", "ltx-2.3-22b-dev-fp8.safetensors"),
    ],
)
def test_the_family_repo_fetches_the_file_of_model_version(version, flavour, repo, filename):
    need = checkpoint_need(cfg_of(checkpoint="Lightricks/LTX-2", version=version, flavour=flavour))
    assert (need.repo_id, need.filename) == (repo, filename)
    assert need.ref.text == "Lightricks/LTX-2"  # messages still name what the user wrote


def test_a_simpletuner_flavour_picks_the_release_file(tmp_path):
    st = tmp_path / "config.json"
    st.write_text(json.dumps({"model_family": "ltxvideo2", "pretrained_model_name_or_path": "Lightricks/LTX-2",
                              "model_flavour": "2.3-distilled"}))  # fmt: skip
    cfg = load_config(st)[0]
    assert (cfg.model.version, cfg.model.flavour) == ("2.3", "distilled")
    need = checkpoint_need(cfg)
    assert (need.repo_id, need.filename) == ("Lightricks/LTX-2.3", "ltx-2.3-22b-distilled.safetensors")


@pytest.mark.parametrize(
    ("checkpoint", "version", "expected"),
    [
        ("Lightricks/LTX-2.3", None, "2.3"),
        ("Lightricks/LTX-2.3-fp8", None, "2.3"),
        ("Lightricks/LTX-2.3:ltx-2.3-22b-dev.safetensors", None, "2.3"),
        ("Lightricks/LTX-2", None, "2.0"),
        ("Lightricks/LTX-2", "2.3", "2.3"),
        ("someone/ltx2-diffusers", None, "2.0"),  # not a release repo: no evidence, the default
        ("someone/ltx2-diffusers", "2.3", "2.3"),
    ],
)
def test_a_release_repo_sets_the_version_the_plan_uses(checkpoint, version, expected):
    flavour = "dev-fp8" if checkpoint.endswith("-fp8") else "dev"
    model = cfg_of(checkpoint=checkpoint, version=version, flavour=flavour).model
    assert run_model_version(model) == expected


def test_default_model_needs_stay_ltx_2_0():
    ckpt, _ = hub.default_model_needs()
    assert (ckpt.repo_id, ckpt.filename) == ("Lightricks/LTX-2", "ltx-2-19b-dev.safetensors")
    assert hub.RELEASE_REPOS[ckpt.repo_id] == "2.0"


def test_family_repo_with_version_resolves_offline_from_the_release_repo(cache_23, monkeypatch):
    from lowvram.models.ltx2 import open_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_of(family="tiny", checkpoint="Lightricks/LTX-2", version="2.3", flavour="distilled",
                 cache_dir=str(cache_23))  # fmt: skip
    path = Path(hub.resolve_model_paths(cfg).model.checkpoint)
    assert path.name == "ltx-2.3-22b-distilled.safetensors"
    assert path.is_relative_to(cache_23 / "models--Lightricks--LTX-2.3" / "snapshots" / COMMIT)
    assert open_checkpoint(path, version="2.3").version == "2.3"


def test_a_release_repo_without_model_version_resolves_to_that_version(cache_23, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_of(family="tiny", checkpoint="Lightricks/LTX-2.3", flavour="distilled", cache_dir=str(cache_23))
    resolved = hub.resolve_model_paths(cfg)
    assert resolved.model.version == "2.3" and cfg.model.version is None
    assert Path(resolved.model.checkpoint).name == "ltx-2.3-22b-distilled.safetensors"


def test_plan_of_a_release_repo_plans_that_version_and_fetches_nothing(tmp_path, cli):
    cache = tmp_path / "cache"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nfamily = "ltx2"\ncheckpoint = "Lightricks/LTX-2.3"\ncache_dir = "{cache}"\n')
    result = cli("plan", "--config", str(cfg), "--profile", "3090", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode in (0, 1), result.stderr
    assert "model: LTX-2.3 " in result.stdout
    assert "Lightricks/LTX-2.3:ltx-2.3-22b-dev.safetensors: size unknown" in result.stdout
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))  # nothing was fetched


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("checkpoint", "version", "line"),
    [
        (
            "Lightricks/LTX-2.3",
            "2.0",
            "model.checkpoint 'Lightricks/LTX-2.3' is an LTX-2.3 repo but model.version is 2.0: set model.version = "
            '"2.3", or name an LTX-2.0 checkpoint',
        ),
        (
            "Lightricks/LTX-2.3-fp8",
            "2.5",
            "model.checkpoint 'Lightricks/LTX-2.3-fp8' is an LTX-2.3 repo but model.version is 2.5: set "
            'model.version = "2.3", or name an LTX-2.5 checkpoint',
        ),
        (
            "Lightricks/LTX-2:ltx-2-19b-dev.safetensors",
            "2.3",
            "model.checkpoint 'Lightricks/LTX-2:ltx-2-19b-dev.safetensors' is an LTX-2.0 repo but model.version is "
            '2.3: set model.version = "2.0", or name an LTX-2.3 checkpoint',
        ),
        (
            "Lightricks/LTX-2.5:diffusion_models/x.safetensors",
            "2.3",
            "model.checkpoint 'Lightricks/LTX-2.5:diffusion_models/x.safetensors' is an LTX-2.5 repo but "
            'model.version is 2.3: set model.version = "2.5", or name an LTX-2.3 checkpoint',
        ),
    ],
)
def test_a_release_repo_that_contradicts_model_version_is_refused(checkpoint, version, line):
    model = cfg_of(checkpoint=checkpoint, version=version).model
    for check in (lambda: hub.model_refs(cfg_of(checkpoint=checkpoint, version=version)),
                  lambda: run_model_version(model)):  # fmt: skip
        with pytest.raises(UsageError) as e:
            check()
        assert str(e.value) == line


KNOWN = (
    "known: LTX-2.0: Lightricks/LTX-2:ltx-2-19b-dev-fp4.safetensors, Lightricks/LTX-2:ltx-2-19b-dev-fp8.safetensors, "
    "Lightricks/LTX-2:ltx-2-19b-dev.safetensors, Lightricks/LTX-2:ltx-2-19b-distilled-fp8.safetensors, "
    "Lightricks/LTX-2:ltx-2-19b-distilled.safetensors; LTX-2.3: Lightricks/LTX-2.3:ltx-2.3-22b-dev.safetensors, "
    "Lightricks/LTX-2.3:ltx-2.3-22b-distilled.safetensors, Lightricks/LTX-2.3-fp8:ltx-2.3-22b-dev-fp8.safetensors"
)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("checkpoint", "version", "line"),
    [
        (
            "Lightricks/LTX-2",
            "2.5",
            f"model.checkpoint 'Lightricks/LTX-2' with model.version 2.5: no LTX-2.5 single file is known ({KNOWN}): "
            "name the file as REPO:PATH.safetensors",
        ),
        (
            "Lightricks/LTX-2.5",
            None,
            f"model.checkpoint 'Lightricks/LTX-2.5': no LTX-2.5 single file is known ({KNOWN}): name the file as "
            "Lightricks/LTX-2.5:PATH.safetensors",
        ),
    ],
)
def test_a_2_5_hub_id_without_a_file_is_refused_naming_the_known_files(checkpoint, version, line):
    with pytest.raises(UsageError) as e:
        hub.model_refs(cfg_of(checkpoint=checkpoint, version=version))
    assert str(e.value) == line and "\n" not in line


def test_a_2_5_file_named_explicitly_is_accepted_and_sets_2_5():
    cfg = cfg_of(checkpoint="Lightricks/LTX-2.5:diffusion_models/x.safetensors")
    need = checkpoint_need(cfg)
    assert (need.repo_id, need.filename) == ("Lightricks/LTX-2.5", "diffusion_models/x.safetensors")
    assert run_model_version(cfg.model) == "2.5"


@pytest.mark.bad_input
def test_plan_refuses_a_contradiction_in_one_line_with_exit_2(tmp_path, cli):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nfamily = "ltx2"\ncheckpoint = "Lightricks/LTX-2.3"\nversion = "2.0"\n')
    result = cli("plan", "--config", str(cfg), "--profile", "3090", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "'Lightricks/LTX-2.3' is an LTX-2.3 repo but model.version is 2.0" in lines[0]
    assert "Traceback" not in result.stderr
