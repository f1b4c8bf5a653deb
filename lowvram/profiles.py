"""Hardware profiles: what a machine has (VRAM, reserve, TFLOP/s, PCIe) and what it supports, from profiles/*.toml.

Profiles are data, validated once here; the planner and the quantization backends read them, nothing else parses them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lowvram.errors import UsageError

GB = 10**9
GIB = 2**30

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
# Wheels carry a copy of profiles/ inside the package (pyproject force-include).
_PACKAGED_DIR = Path(__file__).resolve().parent / "_profiles"


class Supports(BaseModel):
    """What the device and its software stack can do. The planner and backends refuse what is false."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bf16: bool = Field(description="bf16 matmuls at full speed")
    fp8: bool = Field(description="fp8 (e4m3) tensor-core matmuls (Ada, Hopper, Blackwell)")
    bitsandbytes: bool = Field(description="a bitsandbytes build with kernels for this device (nf4, 8-bit AdamW)")
    flash_attention: bool = Field(description="flash or memory-efficient SDPA: O(N) attention memory")
    streams: bool = Field(description="asynchronous copy streams and events (CUDA/HIP); false on cpu")


class HardwareProfile(BaseModel):
    """One machine class. Byte figures are bytes; bandwidths are GB/s (10^9 bytes per second)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    vendor: Literal["nvidia", "amd", "cpu"]
    vram_bytes: int = Field(ge=0, description="total device memory")
    reserve_bytes: int = Field(ge=0, description="driver/context/allocator fragmentation held back from the budget")
    bf16_tflops: float = Field(gt=0, description="dense bf16 TFLOP/s (no sparsity)")
    memory_bandwidth_gbps: float = Field(gt=0, description="device memory bandwidth, GB/s")
    h2d_pinned_gbps: float = Field(gt=0, description="host-to-device copy bandwidth from pinned memory, GB/s")
    h2d_pageable_gbps: float = Field(gt=0, description="host-to-device copy bandwidth from pageable memory, GB/s")
    host_ram_bytes: int = Field(gt=0, description="typical host RAM of such a machine")
    # Written by `lowvram probe --calibrate --write`: measured on the user's GPU, they replace assumptions.
    train_tflops: float | None = Field(
        default=None, gt=0, description="measured FLOP/s (10^12) of one LTX-2 block's forward+backward with LoRA at "
        "the calibration shape; step times use it instead of bf16_tflops x an assumed efficiency"
    )
    attention_tflops: float | None = Field(default=None, gt=0, description="measured SDPA TFLOP/s at that shape")
    calibration: str = Field(default="", description="the device, shape and date the measured fields come from")
    measured: tuple[str, ...] = Field(default=(), description="the fields measured on this machine (others: assumed)")
    # A default so hand-built profiles keep validating; `lowvram probe` measures it on the cache folder.
    disk_read_gbps: float = Field(2.0, gt=0, description="sequential read of the cache disk, GB/s (page cache dropped)")
    supports: Supports

    @field_validator("measured")
    @classmethod
    def _known_fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in cls.model_fields or v in ("measured", "supports")]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        return value

    @property
    def unified_memory(self) -> bool:
        """The "device" is host memory (cpu profile): device and host bytes come out of one RAM."""
        return self.vendor == "cpu"

    def is_measured(self, field_name: str) -> bool:
        return field_name in self.measured

    @property
    def usable_vram_bytes(self) -> int:
        return max(0, self.vram_bytes - self.reserve_bytes)


def profile_dirs() -> list[Path]:
    """Built-in profile folders: the repository's profiles/ and the copy packaged inside lowvram (wheel installs)."""
    return [d for d in (PROFILES_DIR, _PACKAGED_DIR) if d.is_dir()]


def builtin_profile_names() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def _find_builtin(name: str) -> Path | None:
    for d in profile_dirs():
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    return None


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by name (`3090`) or a custom one by path (`my.toml`). Bad input raises UsageError."""
    text = str(name_or_path)
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"profile file {path} does not exist")
        return load_profile_file(path)
    found = _find_builtin(text)
    if found is None:
        names = builtin_profile_names()
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(
            f"unknown profile '{text}'{hint}; valid profiles: {', '.join(names)} or a path to a .toml file"
        )
    return load_profile_file(found)


def load_profile_file(path: Path) -> HardwareProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: malformed TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read profile: {e}") from None
    raw.setdefault("name", path.stem)
    try:
        return HardwareProfile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise UsageError(f"{path}: field '{field}': {err['msg']}") from None


def all_profiles() -> list[HardwareProfile]:
    return [load_profile(n) for n in builtin_profile_names()]
