"""Base-model precisions (`bf16`, `int8-quanto`, ...): their names, what each needs, and the refusal before loading.

Pure data and checks: importing this module imports no quantization library and touches no weight.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from lowvram.errors import LowvramError, UsageError

if TYPE_CHECKING:
    from lowvram.profiles import HardwareProfile


class Precision(str, Enum):
    """How base weights are stored. The value is the user-facing name (the config's spelling)."""

    BF16 = "bf16"
    FP32 = "fp32"
    INT8_QUANTO = "int8-quanto"
    INT8_TORCHAO = "int8-torchao"
    NF4_BNB = "nf4-bnb"
    FP8_TORCHAO = "fp8-torchao"

    @property
    def quantized(self) -> bool:
        return self not in (Precision.BF16, Precision.FP32)


# SimpleTuner spellings; kept equal to lowvram.config.PRECISION_ALIASES (a test checks they agree).
PRECISION_ALIASES: dict[str, str] = {
    "no_change": "bf16",
    "fp8-quanto": "fp8-torchao",
    "int4-quanto": "nf4-bnb",
}


@dataclass(frozen=True)
class BackendNeeds:
    """What a precision requires of the machine (profile `supports` flags) and of the Python environment."""

    supports: tuple[str, ...]  # HardwareProfile.supports fields that must be true
    python_module: str | None  # importable package providing the kernels
    pip_name: str | None
    why: str  # shown when refused


NEEDS: dict[Precision, BackendNeeds] = {
    Precision.BF16: BackendNeeds((), None, None, ""),
    Precision.FP32: BackendNeeds((), None, None, ""),
    Precision.INT8_QUANTO: BackendNeeds((), "optimum.quanto", "optimum-quanto", ""),
    Precision.INT8_TORCHAO: BackendNeeds((), "torchao", "torchao", ""),
    Precision.NF4_BNB: BackendNeeds(
        ("bitsandbytes",), "bitsandbytes", "bitsandbytes", "needs a bitsandbytes build with kernels for this device"
    ),
    Precision.FP8_TORCHAO: BackendNeeds(
        ("fp8",), "torchao", "torchao", "needs fp8 (e4m3) support (Ada, Hopper or Blackwell GPUs)"
    ),
}


def parse_precision(name: str | Precision) -> Precision:
    """`"int8-quanto"`, SimpleTuner's `"no_change"`, or a Precision -> Precision; anything else is a UsageError."""
    if isinstance(name, Precision):
        return name
    text = str(name).strip().lower()
    text = PRECISION_ALIASES.get(text, text)
    try:
        return Precision(text)
    except ValueError:
        valid = [p.value for p in Precision]
        close = difflib.get_close_matches(text, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown precision '{name}'{hint}; valid: {', '.join(valid)}") from None


def check_backend_supported(precision: str | Precision, profile: HardwareProfile) -> Precision:
    """Refuse, in one line, a precision this machine or environment cannot run. Call before loading any weight."""
    p = parse_precision(precision)
    needs = NEEDS[p]
    missing = [flag for flag in needs.supports if not getattr(profile.supports, flag)]
    if missing:
        raise LowvramError(
            f"precision {p.value} {needs.why}, which profile '{profile.name}' lacks; "
            f"use int8-quanto or int8-torchao (or bf16) instead"
        )
    if needs.python_module and importlib.util.find_spec(needs.python_module.split(".")[0]) is None:
        raise LowvramError(f"precision {p.value} needs the {needs.pip_name} package: pip install {needs.pip_name}")
    return p
