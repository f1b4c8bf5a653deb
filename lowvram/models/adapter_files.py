"""Validation adapters as files: where each LoRA file is, which of this model's layers it adapts, checked at startup.

`validation.adapters` / `validation.adapter_sets` name LoRA files (a local file, a folder holding one, or a hub id
read from huggingface_hub's cache, never downloaded). Only each file's safetensors header is read here: its keys
(the official / ComfyUI names `diffusion_model.*`, diffusers' `transformer.*`, or bare module paths) are mapped to
this model version's Linear modules through the checkpoint layout's own converter (as LoRA export names them), and
every lora_A / lora_B shape is checked against the layer. A missing file, a weight_name the folder lacks, an adapter
for another model, or two renders with one label is one line before anything is cached or loaded. It does not load
tensors or touch the transformer (lowvram/train/validation_adapters.py stacks them for the render).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UsageError

ADAPTER_SUFFIXES = (".safetensors", ".sft")
# diffusers' `save_lora_weights` file name, which SimpleTuner also assumes for a hub repo named without a file.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PLAIN_LABEL = "lora"  # the set with no adapter: the LoRA being trained alone
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_PARTS = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B",
          ".alpha": "alpha"}  # fmt: skip
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


@dataclass(frozen=True)
class AdapterModule:
    """One adapted layer: our module path, the file's keys for it, and its shapes."""

    module: str
    a_key: str
    b_key: str
    alpha_key: str | None
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ResolvedAdapter:
    label: str
    source: str  # the path or hub id as written
    file: Path
    scale: float
    modules: tuple[AdapterModule, ...]
    nbytes: int  # the file's tensor bytes (what the host holds while its set renders)
    file_itemsize: int = 2  # bytes per element in the file (bf16 usually)

    def sidecar(self) -> dict:
        return {"label": self.label, "path": self.source, "file": str(self.file), "scale": self.scale,
                "modules": len(self.modules)}  # fmt: skip


@dataclass(frozen=True)
class ResolvedSet:
    """One validation render: its adapters stacked on the LoRA being trained, with its own guidance and steps."""

    label: str
    adapters: tuple[ResolvedAdapter, ...]
    guidance: float
    steps: int

    @property
    def host_bytes(self) -> int:
        return sum(a.nbytes for a in self.adapters)

    def delta_bytes(self, rows: int, tokens: int, itemsize: int) -> int:
        """The worst layer call's transient: its A and B copied to the device (in the file's dtype, then cast to the
        compute dtype when that differs), `x A^T`, the delta (added in place). An upper bound: every layer is counted
        at `tokens` (the longest stream), though the timestep layers see one row per sample."""
        worst = 0
        for a in self.adapters:
            per_element = a.file_itemsize + (itemsize if a.file_itemsize != itemsize else 0)
            for m in a.modules:
                weights = m.rank * (m.in_features + m.out_features) * per_element
                worst = max(worst, weights + rows * tokens * (m.rank + m.out_features) * itemsize)
        return worst

    def sidecar(self) -> dict:
        return {"set": self.label, "adapters": [a.sidecar() for a in self.adapters]}


# --------------------------------------------------------------------------------------------------------------------
# Files


def resolve_adapter_file(path: str, weight_name: str | None, *, where: str, cache_dir=None) -> Path:
    """The .safetensors file an adapter entry names: a file, a folder (+ weight_name), or a hub id in the cache."""
    from lowvram.hub import parse_ref

    local = Path(path).expanduser()
    ref = parse_ref(path, f"{where}.path")
    if ref is None:
        if not local.exists():
            raise UsageError(
                f"{where}.path: {local} does not exist: give a LoRA .safetensors file, a folder holding one, or a "
                "hub id org/name[:file] already in the hub cache"
            )
        if local.is_dir():
            return _in_folder(local, weight_name, where=where, what=str(local))
        if weight_name is not None and weight_name != local.name:
            raise UsageError(f"{where}.weight_name {weight_name!r}: path is already the file {local}: leave it out")
        return _checked_suffix(local, where)
    return _from_hub_cache(ref, weight_name, where=where, cache_dir=cache_dir)


def _checked_suffix(file: Path, where: str) -> Path:
    if file.suffix not in ADAPTER_SUFFIXES:
        raise UsageError(f"{where}.path: {file} is not a .safetensors file: lowvram loads LoRA weights from "
                         "safetensors only (convert pickles first)")  # fmt: skip
    return file


def _in_folder(folder: Path, weight_name: str | None, *, where: str, what: str) -> Path:
    files = sorted(p.name for p in folder.iterdir() if p.suffix in ADAPTER_SUFFIXES)
    if weight_name is not None:
        if (folder / weight_name).is_file():
            return _checked_suffix(folder / weight_name, where)
        held = ", ".join(files[:6]) or "no .safetensors file"
        raise UsageError(f"{where}.weight_name: {weight_name!r} is not in {what} (it holds {held}): name one of those")
    if len(files) == 1:
        return folder / files[0]
    if DEFAULT_WEIGHT_NAME in files:
        return folder / DEFAULT_WEIGHT_NAME
    held = f"{len(files)} .safetensors files ({', '.join(files[:6])})" if files else "no .safetensors file"
    raise UsageError(f"{where}: {what} holds {held}: name the adapter's file with weight_name")


def _from_hub_cache(ref, weight_name: str | None, *, where: str, cache_dir) -> Path:
    """A hub id read from the cache only: adapters are never downloaded (the run may be offline, and a download is
    the user's decision; the message gives the command)."""
    import huggingface_hub

    from lowvram.hub import Needed, download_command

    if ref.filename and weight_name and ref.filename != weight_name:
        raise UsageError(f"{where}: path names the file {ref.filename!r} and weight_name {weight_name!r}: keep one")
    filename = ref.filename or weight_name
    cache = str(cache_dir) if cache_dir else None
    need = Needed(ref, ref.repo_id, filename, patterns=("*.safetensors",))
    fetch = download_command(need, cache)
    if filename is not None:
        found = huggingface_hub.try_to_load_from_cache(ref.repo_id, filename, cache_dir=cache, revision=ref.revision)
        if isinstance(found, str):
            return _checked_suffix(Path(found), where)
    else:
        try:
            folder = huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache,
                                                       local_files_only=True)  # fmt: skip
        except Exception:  # noqa: BLE001 - huggingface_hub's "not cached" errors differ between its versions
            folder = None
        if folder is not None:
            return _in_folder(Path(folder), None, where=where, what=f"the cached {ref.repo_id}")
    label = f"{ref.repo_id}:{filename}" if filename else ref.repo_id
    raise UsageError(f"{where}.path: {label} is not in the hub cache and validation adapters are read offline: "
                     f"fetch it with: {fetch}")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# This model's layers, and an adapter's keys checked against them


@functools.lru_cache(maxsize=4)
def _linear_shapes(config_items: tuple) -> tuple[dict[str, tuple[int, int]], int]:
    """{module path: (in, out)} of the transformer's Linears (blocks as `transformer_blocks.0`), and its depth.

    One block is built on the meta device: every block has the same layers, so depth only bounds the index.
    """
    import torch

    from lowvram.models.ltx2.build import build_component

    config = dict(config_items)
    depth = int(config.get("num_layers", 1))
    with torch.device("meta"):
        model = build_component("transformer", {**config, "num_layers": 1})
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return shapes, depth


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _module_paths(stems: list[str]) -> dict[str, str | None]:
    """{key stem in the file: our module path, or None}: `diffusion_model.*` (official) through the checkpoint
    layout's converter, `transformer.*` (diffusers) and bare paths as they are."""
    from lowvram.models.ltx2.layout import official_to_diffusers

    out: dict[str, str | None] = {}
    official = {}
    for stem in stems:
        bare = stem.removeprefix("model.")
        if bare.startswith("diffusion_model."):
            official["model." + bare + ".weight"] = stem
        else:
            out[stem] = bare.removeprefix("transformer.")
    back = official_to_diffusers("transformer", list(official))
    for ours, key in back.items():
        out[official[key]] = ours.removesuffix(".weight")
    for stem in official.values():
        out.setdefault(stem, None)
    return out


def read_adapter(file: Path, transformer_config: dict, *, where: str, version: str) -> tuple[list, int, int]:
    """The adapter's layers, from its header only; a key or shape this model does not have is one line."""
    from lowvram.models.ltx2.checkpoint import read_header

    try:
        refs, _ = read_header(file)
    except Exception as e:  # noqa: BLE001 - read_header's own one-line LowvramError, or an OS error
        raise UsageError(f"{where}: {e}") from None
    model = f"this model's transformer (LTX-2 {version})"
    parts: dict[str, dict[str, str]] = {}
    for key in refs:
        suffix = next((s for s in _PARTS if key.endswith(s)), None)
        if suffix is None:
            raise UsageError(f"{where}: {file.name} key {key!r} is not a LoRA weight (lora_A/lora_B/alpha): lowvram "
                             "stacks plain LoRA adapters only")  # fmt: skip
        parts.setdefault(key.removesuffix(suffix), {})[_PARTS[suffix]] = key
    if not parts:
        raise UsageError(f"{where}: {file.name} holds no LoRA weights (lora_A/lora_B keys)")
    shapes, depth = _linear_shapes(tuple(sorted((k, _freeze(v)) for k, v in transformer_config.items())))
    paths = _module_paths(list(parts))
    unmatched = []
    modules = []
    for stem, keys in parts.items():
        ours = paths[stem]
        block = _BLOCK.match(ours or "")
        lookup = ours
        if block is not None:
            lookup = None if int(block.group(1)) >= depth else _BLOCK.sub("transformer_blocks.0.", ours)
        if lookup not in shapes:
            unmatched.append(stem)
            continue
        if "A" not in keys or "B" not in keys:
            raise UsageError(f"{where}: {file.name} has {'lora_B' if 'A' in keys else 'lora_A'} but not its pair for "
                             f"{stem}: the file is incomplete")  # fmt: skip
        a, b = refs[keys["A"]].shape, refs[keys["B"]].shape
        fan_in, fan_out = shapes[lookup]
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
            raise UsageError(
                f"{where}: {file.name} does not fit {model}: {stem} has lora_A {list(a)} and lora_B {list(b)}, its "
                f"layer {ours} maps {fan_in} -> {fan_out} features: an adapter for another model or version"
            )
        modules.append(AdapterModule(ours, keys["A"], keys["B"], keys.get("alpha"), a[0], fan_in, fan_out))
    if unmatched:
        raise UsageError(
            f"{where}: {file.name} adapts {len(unmatched)} of its {len(parts)} layers that {model} does not have "
            f"(e.g. {unmatched[0]!r}): an adapter for another model or version"
        )
    nbytes = sum(_nbytes(r) for r in refs.values())
    return modules, nbytes, max(_itemsize(refs[m.a_key]) for m in modules)


def _itemsize(ref) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(str(ref.dtype).upper(), 1)


def _nbytes(ref) -> int:
    import math

    return math.prod(ref.shape) * _itemsize(ref)


# --------------------------------------------------------------------------------------------------------------------
# The config's sets


def _config_sets(v) -> list[tuple[str, object, list[tuple[str, object]]]]:
    """[(where, set-or-None, [(where, adapter)])]: `adapters` as one set each, or `adapter_sets` as given."""
    if v.adapters:
        return [(f"validation.adapters[{i}]", None, [(f"validation.adapters[{i}]", a)]) for i, a in
                enumerate(v.adapters)]  # fmt: skip
    out = []
    for i, s in enumerate(v.adapter_sets):
        where = f"validation.adapter_sets[{i}]"
        out.append((where, s, [(f"{where}.adapters[{j}]", a) for j, a in enumerate(s.adapters)]))
    return out


def _check_label(label: str, where: str) -> str:
    if not _LABEL.match(label) or label in (".", ".."):
        raise UsageError(f"{where}.label {label!r}: use letters, digits and . _ + - (it names the output folder)")
    return label


def adapter_sets(cfg, transformer_config: dict | None = None, version: str | None = None) -> list[ResolvedSet]:
    """Every render the config asks for, files resolved and checked; [] when no adapter is configured (the plain
    validation, written as before). `transformer_config` / `version`: the plan's; else the run's model's."""
    v = cfg.validation
    entries = _config_sets(v)
    if not v.enabled or not entries:
        return []
    if transformer_config is None:
        from lowvram.models.ltx2.checkpoint import run_model_version
        from lowvram.models.ltx2.configs import family_configs

        version = run_model_version(cfg.model)
        transformer_config = family_configs("tiny" if cfg.model.family == "tiny" else "ltx2", version)["transformer"]
    from lowvram.hub import cache_dir_of

    cache_dir = cache_dir_of(cfg)
    sets: list[ResolvedSet] = []
    seen: dict[str, str] = {}
    files: dict[Path, tuple[list[AdapterModule], int, int]] = {}
    for where, spec, adapters in entries:
        resolved = []
        for awhere, a in adapters:
            file = resolve_adapter_file(a.path, a.weight_name, where=awhere, cache_dir=cache_dir)
            if file not in files:
                files[file] = read_adapter(file, transformer_config, where=awhere, version=version or "2.0")
            modules, nbytes, item = files[file]
            label = _check_label(a.label, awhere) if a.label else _slug(file.stem)
            resolved.append(ResolvedAdapter(label, a.path, file, a.scale, tuple(modules), nbytes, item))
        labels = [r.label for r in resolved]
        if len(set(labels)) != len(labels):
            raise UsageError(f"{where}: two adapters are labelled {labels[0]!r}: give each a distinct label")
        if spec is not None and spec.label:
            label = _check_label(spec.label, where)
        else:
            label = "+".join(labels) if labels else PLAIN_LABEL
        if label in seen:
            raise UsageError(f"{where}: its label {label!r} is already {seen[label]}'s (renders write to "
                             "validation/step-N/<label>/): give each a distinct label")  # fmt: skip
        seen[label] = where
        guidance = spec.guidance if spec is not None and spec.guidance is not None else v.guidance
        steps = spec.steps if spec is not None and spec.steps is not None else v.num_inference_steps
        sets.append(ResolvedSet(label, tuple(resolved), float(guidance), int(steps)))
    return sets


def _slug(stem: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", stem).strip("._") or "adapter"
    return slug if _LABEL.match(slug) else "adapter_" + slug


def set_guidances(cfg) -> list[float]:
    """The guidance of every validation render, without reading a file (the plan's guidance rows)."""
    v = cfg.validation
    if v.adapter_sets:
        return [s.guidance if s.guidance is not None else v.guidance for s in v.adapter_sets]
    return [v.guidance]
