"""Resumable training checkpoints: LoRA + optimizer + scheduler + RNG states + step + data position, atomically.

A checkpoint folder is complete and verified (its manifest's checksums match) or it is not a checkpoint at all:
it is written under a temporary name and renamed into place last. Tensors go to safetensors, the rest to JSON;
nothing is pickled. It does not decide when to save (the loop does) and does not export the user-facing LoRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError, UsageError
from lowvram.fsutil import TMP_PREFIX, atomic_write_json, fsync_dir, make_temp_dir, save_safetensors_atomic

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: optimizer state stored as a tree (nested states); 1 (flat) is still read
READABLE_FORMATS = (1, 2)
_NAME = re.compile(r"^step-(\d{8})$")


class ResumeFailed(LowvramError):
    """A checkpoint verified but cannot continue this run (another LoRA shape, another optimizer): exit 1."""


@dataclass(frozen=True)
class ResumeInfo:
    """What a loaded checkpoint tells the loop beyond the restored objects."""

    path: Path
    step: int
    data_position: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    data_position: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    backend: Any = None,
) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXXXX` (complete or absent) and prune to the newest `keep_last`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = make_temp_dir(root, final.name)  # the user's umask, as every file lowvram writes
    try:
        save_safetensors_atomic(trainable_state(model), tmp / "lora.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_safetensors_atomic(opt_tensors, tmp / "optimizer.safetensors")
        save_safetensors_atomic(_rng_tensors(generator, backend), tmp / "rng.safetensors")
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "data_position": data_position,
            "optimizer": opt_meta,
            "scheduler": _jsonable(scheduler.state_dict()),
            "python_random": _python_random_state(),
            "extra": extra or {},
        }
        atomic_write_json(tmp / "state.json", state)
        # The manifest is written last, inside the temporary folder: its presence means every file above is whole.
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": _checksums(tmp)})
        if final.exists():
            # Same step saved again (a resumed run re-reaching it): replace only once the new one is complete.
            old = root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by their module path (contiguous CPU copies for safetensors)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; remove older ones and any temporary folders a killed run left."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for p in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    steps = sorted(list_checkpoints(run_dir), key=lambda p: p.name)
    for old in steps[: max(0, len(steps) - keep_last)]:
        # Out of sight first (one atomic rename), then deleted: a kill during rmtree must not leave a checkpoint-named
        # folder with some files gone (tests/test_faults_resume.py caught one without its manifest).
        doomed = root / f"{TMP_PREFIX}pruned-{old.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Finding and verifying


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders by name (verified or not), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the folder is a complete checkpoint whose files match the manifest, else the reason it is not."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest: {e}"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped."""
    for p in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(p) is None:
            return p
    return None


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """`None` -> no resume; `'latest'` -> newest verified checkpoint or None; a path -> that checkpoint, verified."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"--resume {resume}: no such checkpoint folder (use 'latest' or a {CHECKPOINTS_DIR}/step-* folder)"
        )
    problem = verify_checkpoint(path)
    if problem:
        raise LowvramError(f"--resume {resume}: not a usable checkpoint: {problem}; use 'latest' or another one")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Loading


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `state.json` (step, data position, what the run was trained with in `extra`)."""
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    backend: Any = None,
) -> ResumeInfo:
    """Restore everything `save_checkpoint` wrote into the given live objects; returns step and data position."""
    from safetensors.torch import load_file

    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise LowvramError(f"checkpoint {path} is not usable: {problem}")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("format") not in READABLE_FORMATS:
        raise LowvramError(
            f"checkpoint {path} has format {state.get('format')}; this lowvram reads formats {READABLE_FORMATS}"
        )

    lora = load_file(str(path / "lora.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(lora))
    unexpected = sorted(set(lora) - set(params))
    if missing or unexpected:
        raise LowvramError(
            f"checkpoint {path} does not match this model's LoRA "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): resume with the same lora settings"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != lora[name].shape:
                raise LowvramError(
                    f"checkpoint {path}: {name} has shape {tuple(lora[name].shape)}, the model {tuple(p.shape)}"
                )
            p.copy_(lora[name])

    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if "device" in rng and backend is not None and getattr(backend, "is_accelerator", False):
        backend.set_rng_state(rng["device"])  # dropout on the accelerator draws from its own generator
    _set_python_random_state(state["python_random"])
    return ResumeInfo(
        path=path, step=int(state["step"]), data_position=state["data_position"], extra=state.get("extra", {})
    )


# --------------------------------------------------------------------------------------------------------------------
# Serialization helpers (no pickle anywhere)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict -> (tensors for safetensors, JSON tree with `{"tensor": name}` where each was).

    Walked to any depth: bitsandbytes' 8-bit AdamW nests its quantized states and maps one level down
    (`__bnb_optimizer_quant_state__`), which a flat per-parameter layout could not hold.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
            return {_TENSOR_REF: name}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{name}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{name}/{i}") for i, v in enumerate(value)]
        return _jsonable(value)

    state = {str(idx): walk(pstate, str(idx)) for idx, pstate in sd["state"].items()}
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "state": state}


_TENSOR_REF = "__tensor__"


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer) -> dict:
    if "scalars" in meta:  # format 1: one level, tensors named "{index}.{key}"
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        for idx, values in meta["scalars"].items():
            state.setdefault(int(idx), {}).update(values)
    else:

        def build(value: Any) -> Any:
            if isinstance(value, dict):
                if set(value) == {_TENSOR_REF}:
                    return tensors[value[_TENSOR_REF]]
                return {k: build(v) for k, v in value.items()}
            if isinstance(value, list):
                return [build(v) for v in value]
            return value

        state = {int(idx): build(pstate) for idx, pstate in meta["state"].items()}
    groups = meta["param_groups"]
    for g, live in zip(groups, optimizer.param_groups, strict=True):
        # JSON turns tuples into lists; give tuple-valued options (betas) back their type.
        for key, value in live.items():
            if isinstance(value, tuple) and isinstance(g.get(key), list):
                g[key] = tuple(g[key])
    return {"state": state, "param_groups": groups}


def _rng_tensors(generator: torch.Generator, backend: Any = None) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if backend is not None and getattr(backend, "is_accelerator", False):
        out["device"] = backend.get_rng_state().cpu()
    return out


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dict__"):
        return _jsonable(vars(obj))
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != MANIFEST and not f.name.startswith(TMP_PREFIX)
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
