"""The package never unpickles, never trusts remote code, and touches torch.cuda only in the device seam."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lowvram"


def sources():
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_unsafe_torch_load():
    for path, text in sources():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: torch.load without weights_only=True"


def test_no_pickle_or_remote_code():
    forbidden = [r"\bpickle\.loads?\(", r"trust_remote_code\s*=\s*True", r"\bdill\b", r"\bjoblib\.load\(",
                 r"np\.load\([^)]*allow_pickle\s*=\s*True"]
    for path, text in sources():
        for pattern in forbidden:
            assert not re.search(pattern, text), f"{path}: forbidden call matching {pattern}"


def test_only_the_device_seam_touches_torch_cuda():
    allowed = {"device.py"}
    for path, text in sources():
        if path.name in allowed:
            continue
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        assert not re.search(r"torch\.cuda\.", code), f"{path}: uses torch.cuda outside lowvram/device.py"
