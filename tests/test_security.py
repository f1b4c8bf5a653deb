"""The package never unpickles, never trusts remote code, touches torch.cuda only in the device seam, and keeps the
names it derives from data inside the folders the user named (the rule is in lowvram/paths.py)."""

import os
import re
from pathlib import Path

import pytest

from lowvram.errors import LowvramError, UsageError

PACKAGE = Path(__file__).resolve().parent.parent / "lowvram"


def sources():
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))]


def code_only(text: str) -> str:
    """Source without comments (a comment may name a forbidden call to explain why it is not used)."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_no_unsafe_torch_load():
    for path, text in sources():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: torch.load without weights_only=True"


def test_no_pickle_or_remote_code():
    forbidden = [
        r"\bpickle\.loads?\(",
        r"trust_remote_code\s*=\s*True",
        r"\bdill\b",
        r"\bjoblib\.load\(",
        r"np\.load\([^)]*allow_pickle\s*=\s*True",
    ]
    for path, text in sources():
        for pattern in forbidden:
            assert not re.search(pattern, text), f"{path}: forbidden call matching {pattern}"


def test_no_other_ways_to_run_untrusted_bytes():
    forbidden = {
        r"^\s*import (c?pickle|marshal|shelve)\b|^\s*from (c?pickle|marshal|shelve) import": "pickle-like modules",
        r"(?<![\w.])(eval|exec)\(": "eval/exec",
        r"shell\s*=\s*True": "a shell",
        r"\bos\.system\(|\bos\.popen\(": "a shell",
        r"\byaml\.(unsafe_)?load\(": "yaml.load (use safe_load)",
        r"\.extractall\(": "archive extraction",
        r"torch\.jit\.load\(|torch\.package": "TorchScript/torch.package (pickle inside)",
        r"\bload_state_dict\(\s*torch\.load": "torch.load into a state dict",
        r"from_pretrained\([^)]*trust_remote_code": "trust_remote_code passed at all",
    }
    for path, text in sources():
        code = code_only(text)
        for pattern, what in forbidden.items():
            assert not re.search(pattern, code, re.MULTILINE), f"{path}: {what} ({pattern})"


def test_only_the_device_seam_touches_torch_cuda():
    allowed = {"device.py"}
    for path, text in sources():
        if path.name in allowed:
            continue
        assert not re.search(r"torch\.cuda\.", code_only(text)), f"{path}: uses torch.cuda outside lowvram/device.py"


def test_weights_are_read_only_through_safetensors():
    # Every torch.load in the package is weights_only (above); here: none at all outside the refusal messages.
    for path, text in sources():
        assert not re.search(r"\btorch\.load\(", code_only(text)), f"{path}: torch.load (weights load via safetensors)"


# ---------------------------------------------------------------------------------------------------------------
# Path confinement (behaviour, not grep)


def test_a_derived_name_cannot_climb_out_with_dotdot(tmp_path):
    from lowvram.paths import confine

    assert confine(tmp_path, "latents/a.safetensors", what="cache file") == tmp_path / "latents/a.safetensors"
    for bad in ("../escape", "latents/../../escape", "/etc/passwd"):
        with pytest.raises(LowvramError, match="would leave"):
            confine(tmp_path, bad, what="cache file")


def test_a_derived_name_cannot_escape_through_a_symlink(tmp_path):
    from lowvram.paths import confine

    outside = tmp_path / "outside"
    outside.mkdir()
    base = tmp_path / "run"
    base.mkdir()
    os.symlink(outside, base / "link")
    with pytest.raises(LowvramError, match="would leave"):
        confine(base, "link/file", what="checkpoint file")


def test_a_user_named_folder_that_is_a_symlink_is_trusted_as_named(tmp_path):
    from lowvram.paths import confine, resolve_user_path

    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    base = resolve_user_path(tmp_path / "alias", what="output_dir")
    assert base == real.resolve()
    assert confine(tmp_path / "alias", "checkpoints", what="checkpoints") == tmp_path / "alias" / "checkpoints"


def test_a_dataset_id_cannot_become_a_path(tmp_path):
    from lowvram.data.spec import parse_multidatabackend

    raw = [{"id": "../../outside", "instance_data_dir": str(tmp_path)}]
    with pytest.raises(UsageError, match=r"dataset id '\.\./\.\./outside' cannot be used as a folder name"):
        parse_multidatabackend(raw, base_dir=tmp_path)


def test_an_edited_cache_index_cannot_point_outside_the_cache(tmp_path):
    import json

    from lowvram.data.build import INDEX_NAME, read_index

    cache = tmp_path / "cache"
    cache.mkdir()
    row = {
        "latent": "/etc/passwd",
        "text": str(cache / "t.safetensors"),
        "bucket": "64x64@17",
        "caption": "c",
        "dataset_id": "d",
        "repeats": 1,
    }
    (cache / INDEX_NAME).write_text(json.dumps({"items": [row]}))
    with pytest.raises(LowvramError, match="points outside"):
        read_index(cache)


def test_paths_with_nul_or_nothing_are_refused():
    from lowvram.paths import resolve_user_path

    with pytest.raises(UsageError, match="NUL"):
        resolve_user_path("out\0put", what="output_dir")
    with pytest.raises(UsageError, match="empty"):
        resolve_user_path("  ", what="output_dir")
