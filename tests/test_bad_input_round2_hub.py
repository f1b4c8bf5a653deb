"""Bad input, second round (issue 20 and issue 13's `report --png`): hub ids, trackers, report destinations.

Each case is one line naming the key and what to do, with the exit code of its kind (2 usage, 1 runtime). The hub is
never reached: a local HF cache is built in a temp folder, and the hub's refusals (gated, not found) are
huggingface_hub's own exception classes raised where its download function would raise them.
"""

from __future__ import annotations

import json

import httpx
import pytest
from huggingface_hub import errors

from lowvram import hub
from lowvram.config import load_config
from lowvram.errors import ConfigError, LowvramError

pytestmark = pytest.mark.bad_input

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))


def gated() -> Exception:
    return errors.GatedRepoError("403 gated", response=_response(403))


def not_found() -> Exception:
    return errors.RepositoryNotFoundError("404", response=_response(404))


def unreachable() -> Exception:
    return errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")


# (id, model settings, HF_HUB_OFFLINE, token, what the hub raises (None: the real cache answers), exit, the line)
HUB_CASES = [
    (
        "offline, the chosen file is not cached: the exact command",
        {"checkpoint": "Lightricks/LTX-2", "flavour": "dev-fp8"}, True, None, None, 1,
        "model.checkpoint 'Lightricks/LTX-2': Lightricks/LTX-2:ltx-2-19b-dev-fp8.safetensors is not in the cache and "
        "HF_HUB_OFFLINE=1 forbids downloading; fetch it with: hf download Lightricks/LTX-2 "
        "ltx-2-19b-dev-fp8.safetensors --cache-dir {cache}",
    ),
    (
        "offline, a diffusers repo missing its transformer: the exact command",
        {"checkpoint": "someone/partial-diffusers"}, True, None, None, 1,
        "model.checkpoint 'someone/partial-diffusers': transformer/, connectors/ not in the cache ({cache}/"
        "models--someone--partial-diffusers/snapshots/" + COMMIT + "); fetch it with: hf download "
        "someone/partial-diffusers --include \"model_index.json\" --include \"transformer/*.json\" --include "
        "\"transformer/*.safetensors\" --include \"vae/*.json\" --include \"vae/*.safetensors\" --include "
        "\"audio_vae/*.json\" --include \"audio_vae/*.safetensors\" --include \"vocoder/*.json\" --include "
        "\"vocoder/*.safetensors\" --include \"connectors/*.json\" --include \"connectors/*.safetensors\" "
        "--include \"text_encoder/*.json\" --include \"text_encoder/*.safetensors\" --include \"tokenizer/*.json\" "
        "--include \"tokenizer/*.safetensors\" --include \"tokenizer/tokenizer.model\" --cache-dir {cache}",
    ),
    (
        "offline, a text encoder repo never fetched",
        {"text_encoder_path": "google/gemma-3-12b-it-qat-q4_0-unquantized"}, True, None, None, 1,
        "model.text_encoder_path 'google/gemma-3-12b-it-qat-q4_0-unquantized': "
        "google/gemma-3-12b-it-qat-q4_0-unquantized (*.json, *.safetensors, tokenizer.model) is not in the cache and "
        "HF_HUB_OFFLINE=1 forbids downloading; fetch it with: hf download google/gemma-3-12b-it-qat-q4_0-unquantized "
        "--include \"*.json\" --include \"*.safetensors\" --include \"tokenizer.model\" --cache-dir {cache}",
    ),
    (
        "gated Gemma and no token",
        {"text_encoder_path": "google/gemma-3-12b-it-qat-q4_0-unquantized"}, False, None, gated, 1,
        "model.text_encoder_path 'google/gemma-3-12b-it-qat-q4_0-unquantized': "
        "google/gemma-3-12b-it-qat-q4_0-unquantized is gated and no Hugging Face token is set: accept its license at "
        "https://huggingface.co/google/gemma-3-12b-it-qat-q4_0-unquantized, then run `hf auth login` (or set "
        "HF_TOKEN) and retry",
    ),
    (
        "gated Gemma, a token without access",
        {"text_encoder_path": "google/gemma-3-12b-it-qat-q4_0-unquantized"}, False, "hf_x", gated, 1,
        "model.text_encoder_path 'google/gemma-3-12b-it-qat-q4_0-unquantized': "
        "google/gemma-3-12b-it-qat-q4_0-unquantized is gated and your token has no access yet: accept its license at "
        "https://huggingface.co/google/gemma-3-12b-it-qat-q4_0-unquantized (logged in as the token's owner) and retry",
    ),
    (
        "a repo that does not exist",
        {"checkpoint": "Lightricks/LTX-9:ltx.safetensors"}, False, None, not_found, 2,
        "model.checkpoint 'Lightricks/LTX-9:ltx.safetensors': no model repo Lightricks/LTX-9 on the hub (a private "
        "repo needs `hf auth login` or HF_TOKEN): check the id (no local path of that name exists either)",
    ),
    (
        "online but the hub does not answer",
        {"checkpoint": "Lightricks/LTX-2"}, False, None, unreachable, 1,
        "model.checkpoint 'Lightricks/LTX-2': cannot download Lightricks/LTX-2:ltx-2-19b-dev.safetensors (An error "
        "happened while trying to locate the file on the Hub); check the connection, or set HF_HUB_OFFLINE=1 to use "
        "the cache (fetch elsewhere with: hf download Lightricks/LTX-2 ltx-2-19b-dev.safetensors --cache-dir {cache})",
    ),
    (
        "a flavour the official repo does not have",
        {"checkpoint": "Lightricks/LTX-2.3", "flavour": "dev-fp4"}, True, None, None, 2,
        "model.checkpoint 'Lightricks/LTX-2.3' has no 'dev-fp4' file: set model.flavour to one of dev, dev-fp8, "
        "distilled, or name the file as Lightricks/LTX-2.3:FILE.safetensors",
    ),
    (
        "a pickle file named in the repo",
        {"checkpoint": "someone/ltx2:model.ckpt"}, True, None, None, 2,
        "model.checkpoint 'someone/ltx2:model.ckpt': lowvram loads .safetensors files only; name one after ':'",
    ),
    (
        "a file named for the text encoder",
        {"text_encoder_path": "google/gemma-3-12b-it:model.safetensors"}, True, None, None, 2,
        "model.text_encoder_path 'google/gemma-3-12b-it:model.safetensors': a text encoder is a whole repo: drop "
        "':model.safetensors'",
    ),
]


@pytest.fixture
def partial_cache(tmp_path):
    """An HF cache with one diffusers repo of which only the VAE was fetched."""
    cache = tmp_path / "cache"
    snap = cache / "models--someone--partial-diffusers" / "snapshots" / COMMIT
    (snap / "vae").mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (snap / "vae" / "config.json").write_text("{}")
    (snap / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (cache / "models--someone--partial-diffusers" / "refs").mkdir()
    (cache / "models--someone--partial-diffusers" / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.mark.parametrize("case", HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_bad_hub_reference_is_one_line(case, partial_cache, monkeypatch):
    import huggingface_hub

    _, model, is_offline, token, raises, code, expected = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if is_offline else "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    if raises is not None:
        def refuse(*a, **k):
            raise raises()

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    overrides = {"model.family": "tiny", "model.cache_dir": str(partial_cache)}
    cfg, _ = load_config(None, {**overrides, **{f"model.{k}": v for k, v in model.items()}})
    with pytest.raises(LowvramError) as err:
        hub.resolve_model_paths(cfg)
    assert str(err.value) == expected.format(cache=partial_cache)
    assert "\n" not in str(err.value) and err.value.exit_code == code


TRACKER_CASES = [
    ('[output]\nreport_to = ["tensorbord"]\n',
     "'output.report_to': unknown tracker 'tensorbord'; valid: tensorboard, wandb, trackio or none"),
    ('[output]\nreport_to = "all"\n',
     "'output.report_to': unknown tracker 'all' (name them); valid: tensorboard, wandb, trackio or none"),
    ('[output]\ntracker_project_name = ""\n',
     "'output.tracker_project_name': String should have at least 1 character"),
]


@pytest.mark.parametrize("text,expected", TRACKER_CASES)
def test_bad_tracker_settings_are_one_line(tmp_path, text, expected):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {expected}")
    assert err.value.exit_code == 2


def test_a_tracker_that_is_not_installed_names_the_pip_extra(monkeypatch):
    import importlib.util

    from lowvram import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg, _ = load_config(None, {"model.family": "tiny", "output.report_to": ["wandb"]})
    with pytest.raises(LowvramError) as err:
        tracking.check_installed(cfg)
    assert str(err.value) == (
        "output.report_to names 'wandb', which is not installed: pip install 'lowvram[wandb]' (or remove it from "
        "output.report_to)"
    )
    assert err.value.exit_code == 2


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "memory.jsonl").write_text(json.dumps({"type": "phase", "name": "train", "start_s": 0.0, "end_s": 1.0,
                                                  "rss_baseline_bytes": 1, "rss_peak_bytes": 2}) + "\n")  # fmt: skip
    return run


REPORT_PNG_CASES = [
    ("a folder", lambda tmp: tmp, "--png {png} is a folder: give a file name such as {png}/memory.png"),
    ("an unwritable folder", lambda tmp: tmp / "ro" / "memory.png",
     "cannot write {png}: permission denied; choose a writable folder"),
    ("not a png", lambda tmp: tmp / "memory.jpg", "--png {png}: the timeline is a PNG: give a name ending in .png"),
    ("a path below a file", lambda tmp: tmp / "run" / "memory.jsonl" / "memory.png",
     "cannot write {png}: {png.parent} is a file, not a folder"),
]


@pytest.mark.parametrize("case", REPORT_PNG_CASES, ids=[c[0] for c in REPORT_PNG_CASES])
def test_report_png_to_a_bad_destination_is_one_line_exit_2(tmp_path, cli, case):
    import os

    _, where, expected = case
    run = _run_folder(tmp_path)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    png = where(tmp_path)
    try:
        if os.geteuid() == 0 and "unwritable" in case[0]:
            pytest.skip("root writes into read-only folders")
        result = cli("report", str(run), "--png", str(png))
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"lowvram: error: {expected.format(png=png)}"]
    assert not list(tmp_path.glob("**/.tmp-*"))
