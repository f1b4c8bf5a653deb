"""Loading and saving LTX-2 weights: the official single combined .safetensors, diffusers folders, a Gemma3 folder.

Every component is built on the meta device and filled tensor by tensor from safetensors (peak ~ one copy of the
weights; at a quantized precision ~ the quantized size, via lowvram.quant.stream); keys are checked before anything
is read. It never unpickles (.bin/.pt/.ckpt are refused) and never downloads: real configs ship with the package.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowvram.errors import LowvramError
from lowvram.models import versions
from lowvram.models.ltx2.build import (
    LTX2Components,
    build_component,
    build_on_meta,
    build_tiny_components,
    text_encoder_classes,
)
from lowvram.models.ltx2.configs import CHECKPOINT_COMPONENTS, canonical_family, family_configs, family_version
from lowvram.models.ltx2.layout import (
    _official_owner,
    diffusers_to_official,
    official_to_diffusers,
)

if TYPE_CHECKING:
    from lowvram.profiles import HardwareProfile
    from lowvram.quant.stream import LoadResult

VERSION_METADATA_KEY = versions.VERSION_METADATA_KEY
# Diffusers folder layout (LTX2Pipeline's component names).
DIFFUSERS_SUBFOLDERS = {
    "transformer": "transformer",
    "video_vae": "vae",
    "audio_vae": "audio_vae",
    "vocoder": "vocoder",
    "connectors": "connectors",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
}
FAMILY_METADATA_KEY = "lowvram_family"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------------------------------------------------
# Reading safetensors lazily


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, key, shape and safetensors dtype string (read from the header only)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise LowvramError(f"{path} is a pickle checkpoint; lowvram loads safetensors only: convert it to .safetensors")


def read_header(file: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensor refs and metadata of a .safetensors file, without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            refs = {}
            for k in f.keys():
                s = f.get_slice(k)
                refs[k] = TensorRef(file, k, tuple(s.get_shape()), s.get_dtype())
            return refs, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError has no stable import path
        short = _truncation(file)
        if short is not None:
            raise LowvramError(
                f"{file} is truncated ({short[0]} of {short[1]} bytes): the download or copy was interrupted; "
                "fetch the file again"
            ) from None
        raise LowvramError(f"cannot read {file} as safetensors: {str(e).splitlines()[0]}") from None


def _truncation(file: Path) -> tuple[int, int] | None:
    """(bytes present, bytes the header promises) when a safetensors file ends early; None if it cannot tell."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > 100_000_000:
                return None
            header = f.read(header_len)
            if len(header) < header_len:
                return (size, 8 + header_len)
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    expected = 8 + header_len + end
    return (size, expected) if size < expected else None


def _refuse_interrupted_download(folder: Path) -> None:
    # huggingface_hub writes `<file>.incomplete` (beside the target or under .cache/huggingface/download/ of a
    # local_dir) and renames it when complete: one left behind means the download stopped part-way.
    leftover = next(iter(sorted(folder.rglob("*.incomplete"))), None)
    if leftover is not None:
        raise LowvramError(
            f"{folder} is an interrupted download ({leftover.name} is still there): run the download again to "
            "finish it, then retry"
        )


class _Reader:
    """Opens each file once and hands out tensors on request."""

    def __init__(self):
        self._handles: dict[Path, Any] = {}

    def get(self, ref: TensorRef) -> torch.Tensor:
        from safetensors import safe_open

        if ref.file not in self._handles:
            self._handles[ref.file] = safe_open(str(ref.file), framework="pt")
        return self._handles[ref.file].get_tensor(ref.key)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint sources


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint: its kind, path and family, plus every component's {diffusers key: TensorRef}."""

    kind: str  # "single_file" | "diffusers"
    path: Path
    family: str
    version: str  # "2.0" | "2.3" | "2.5", detected from the weights (and checked against metadata and config)
    tensors: dict[str, dict[str, TensorRef]]  # component -> diffusers key -> where
    raw: dict[str, dict[str, TensorRef]]  # component -> its keys as named in the file (finds fp8 scales)
    configs: dict[str, dict[str, Any]]


def open_checkpoint(path: str | Path, family: str | None = None, version: str | None = None) -> CheckpointSource:
    """Resolve a single .safetensors (official layout) or a diffusers folder into per-component tensor maps.

    The LTX-2 version is read from the weights (each component's layout), checked against the file's metadata and
    against `version` (the config's model.version) when given; a mismatch is refused in one line.
    """
    path = Path(path)
    if not path.exists():
        raise LowvramError(f"checkpoint {path} does not exist: give the .safetensors file or a diffusers folder")
    _refuse_pickle(path)
    if path.is_dir():
        _refuse_interrupted_download(path)
        return _open_diffusers_folder(path, family, version)
    if path.suffix not in (".safetensors", ".sft"):
        raise LowvramError(f"{path} is not a .safetensors file or a diffusers folder")
    refs, meta = read_header(path)
    family = canonical_family(family or meta.get(FAMILY_METADATA_KEY, "ltx-2.0"))
    tensors, raw = {}, {}
    for name in CHECKPOINT_COMPONENTS:
        mapping = official_to_diffusers(name, list(refs))
        tensors[name] = {new: refs[old] for new, old in mapping.items()}
        raw[name] = {k: r for k, r in refs.items() if _official_owner(k) == name}
    if not any(tensors.values()):
        raise LowvramError(f"{path} holds no LTX-2 weights (no 'model.diffusion_model.' / 'vae.' keys)")
    found = {name: versions.versions_of_component(name, set(t)) for name, t in tensors.items() if t}
    requested = version or family_version(family)
    version = versions.resolve_checkpoint_version(
        found, str(path), stated=versions.metadata_version(meta), requested=requested
    )
    configs = family_configs(family, version)
    # LTX-2 VAEs exist with and without decoder timestep conditioning; the weights say which this one is.
    if any("time_embedder" in k or "scale_shift_table" in k for k in tensors["video_vae"]):
        configs["video_vae"] = {**configs["video_vae"], "timestep_conditioning": True}
    # LTX-2.5.0 has no keyframe embedding, 2.5.1+ has one (diffusers' conversion script); KV-cacheable checkpoints
    # drop the prompt AdaLN MLP (ltx-core model_configurator: use_prompt_adaln_single=false). The weights say which.
    t_keys = tensors["transformer"]
    if configs["transformer"].get("use_keyframes_abs_pos_embedding") and t_keys:
        has_keyframes = "keyframes_abs_pos_embedding" in t_keys
        configs["transformer"] = {**configs["transformer"], "use_keyframes_abs_pos_embedding": has_keyframes}
    if (
        configs["transformer"].get("cross_attn_mod")
        and t_keys
        and not any(k.startswith("prompt_adaln.") for k in t_keys)
    ):
        configs["transformer"] = {**configs["transformer"], "use_prompt_adaln_single": False}
    return CheckpointSource("single_file", path, family, version, tensors, raw, configs)


def run_model_version(model: Any) -> str:
    """The LTX-2 version a run trains: `model.version` (checked against the checkpoint when there is one), else
    what the checkpoint's weights say, else 2.0. `model` is the config's [model] section."""
    checkpoint = getattr(model, "checkpoint", None)
    if checkpoint and Path(checkpoint).expanduser().exists():
        return open_checkpoint(Path(checkpoint).expanduser(), version=model.version).version
    from lowvram.hub import checkpoint_version

    # A hub id (nothing downloaded yet): the release its repo holds, checked against model.version.
    return checkpoint_version(model) or model.version or versions.DEFAULT_VERSION


def _open_diffusers_folder(path: Path, family: str | None, version: str | None = None) -> CheckpointSource:
    tensors, configs = {}, {}
    for name in CHECKPOINT_COMPONENTS:
        sub = path / DIFFUSERS_SUBFOLDERS[name]
        if not sub.is_dir():
            continue
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
            what = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors weights"
            raise LowvramError(f"{sub} has {what}; lowvram loads safetensors only")
        refs: dict[str, TensorRef] = {}
        for f in files:
            got, _ = read_header(f)
            dup = set(got) & set(refs)
            if dup:
                raise LowvramError(f"{sub}: key {sorted(dup)[0]} appears in two files; keep one weights variant")
            refs.update(got)
        cfg_file = sub / "config.json"
        if not cfg_file.is_file():
            raise LowvramError(f"{sub} has no config.json: it is not a diffusers component folder")
        configs[name] = {k: v for k, v in json.loads(cfg_file.read_text()).items() if not k.startswith("_")}
        tensors[name] = refs
    if not tensors:
        raise LowvramError(f"{path} has none of the diffusers subfolders transformer/, vae/, audio_vae/, ...")
    found = {name: versions.versions_of_config(name, configs[name]) for name in tensors}
    version = versions.resolve_checkpoint_version(found, str(path), requested=version)
    return CheckpointSource("diffusers", path, family or "diffusers", version, tensors, dict(tensors), configs)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def check_keys(component: str, skeleton: torch.nn.Module, refs: dict[str, TensorRef], where: Path) -> None:
    """Refuse a checkpoint whose keys or shapes do not fit the model, naming them (one line)."""
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in refs]
    wrong = [
        f"{k} {list(refs[k].shape)} (model wants {list(v.shape)})"
        for k, v in expected.items()
        if k in refs and tuple(refs[k].shape) != tuple(v.shape)
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if wrong:
            parts.append(f"{len(wrong)} wrongly shaped: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise LowvramError(
            f"{where} does not fit the LTX-2 {component}: {'; '.join(parts)} (wrong model family or a damaged file?)"
        )


def iter_component_tensors(
    source: CheckpointSource, component: str, dtype: torch.dtype, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (diffusers key, tensor in `dtype`) one at a time: fp8 weights are dequantized with their scale.

    `only` restricts to the model's keys; spare checkpoint keys (e.g. statistics diffusers does not use) are skipped.
    """
    reader = _Reader()
    raw = source.raw.get(component, {})
    for key, ref in source.tensors[component].items():
        if only is not None and key not in only:
            continue
        t = reader.get(ref)
        if ref.dtype.startswith("F8"):
            scale = _fp8_scale(ref, raw, reader)
            if scale.ndim == 1 and t.ndim > 1:
                scale = scale.view(-1, *([1] * (t.ndim - 1)))  # per output channel
            t = t.to(torch.float32) * scale
        elif not t.is_floating_point():
            raise LowvramError(
                f"{ref.file}: {ref.key} is stored as {ref.dtype}; packed 4-bit checkpoints are not supported: "
                "use the bf16 (dev) or fp8 checkpoint"
            )
        yield key, t.to(dtype)


def _fp8_scale(ref: TensorRef, raw: dict[str, TensorRef], reader: _Reader) -> torch.Tensor:
    # Scaled fp8 files store the scale beside the weight under one of two spellings (diffusers / ComfyUI).
    stem = ref.key.rsplit(".", 1)[0]
    for name in (f"{stem}.weight_scale", f"{stem}.scale_weight"):
        if name in raw:
            return reader.get(raw[name]).to(torch.float32)
    return torch.ones((), dtype=torch.float32)


def load_component(source: CheckpointSource, component: str, *, dtype: torch.dtype, device="cpu") -> torch.nn.Module:
    """Build `component` on meta, check its keys against the checkpoint, then fill it tensor by tensor."""
    if component not in source.tensors:
        raise LowvramError(f"{source.path} has no {component} weights")
    skeleton = build_on_meta(component, source.configs[component], family=source.family)
    check_keys(component, skeleton, source.tensors[component], source.path)
    wanted = set(skeleton.state_dict(keep_vars=True))
    for key, tensor in iter_component_tensors(source, component, dtype, only=wanted):
        _assign(skeleton, key, tensor.to(device))
    return skeleton.eval().requires_grad_(False)


def _assign(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def text_encoder_model_type(folder: Path) -> str:
    """The transformers `model_type` in a text encoder folder's config.json ("gemma3" when it has none)."""
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type") or "gemma3")
    except (OSError, ValueError):
        return "gemma3"


def check_text_encoder_version(folder: str | Path, version: str) -> None:
    """Refuse a Gemma 3 folder for LTX-2.5 (which reads Gemma 4) and the reverse, naming both, in one line."""
    folder = _gemma_folder(Path(folder), "text_encoder")
    found = text_encoder_model_type(folder)
    wanted = versions.model_version(version).text_encoder_model_type
    if found != wanted:
        raise LowvramError(
            f"LTX-{version} reads a {wanted} text encoder but {folder} holds {found}: give the {wanted} folder "
            "of that release"
        )


def text_encoder_plan_config(model: Any, version: str) -> dict[str, Any] | None:
    """The user's text encoder config (`model.text_encoder_path`'s config.json, as transformers reads it) for the
    planner, checked against the release; None when there is no such folder (the shipped config is used)."""
    path = getattr(model, "text_encoder_path", None)
    if not path or getattr(model, "family", "ltx2") == "tiny":
        return None
    folder = Path(path).expanduser()
    folder = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
    if not (folder / "config.json").is_file():
        return None
    check_text_encoder_version(folder, version)
    config_cls, _ = text_encoder_classes(text_encoder_model_type(folder))
    try:
        return config_cls.from_pretrained(str(folder), local_files_only=True).to_dict()
    except (OSError, ValueError) as e:
        raise LowvramError(f"cannot read the text encoder config in {folder}: {str(e).strip().splitlines()[0]}") from e


def load_text_encoder(folder: str | Path, dtype: torch.dtype):
    """Gemma3 / Gemma 4 unified (by its config.json model_type) from a local folder (safetensors only, no remote
    code, nothing missing)."""
    folder = _gemma_folder(Path(folder), "text_encoder")
    _, model_cls = text_encoder_classes(text_encoder_model_type(folder))
    try:
        model, info = model_cls.from_pretrained(
            str(folder),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=dtype,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise LowvramError(f"cannot load Gemma3 from {folder}: {str(e).strip().splitlines()[0]}") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = missing + mismatched
        raise LowvramError(
            f"Gemma3 in {folder} does not fit its config: {len(bad)} keys missing or wrongly shaped: "
            f"{', '.join(bad[:5])}"
        )
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: str | Path):
    """The Gemma tokenizer from a local folder, padding on the left as LTX-2's connectors expect."""
    from transformers import AutoTokenizer

    folder = _gemma_folder(Path(folder), "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise LowvramError(f"cannot load the tokenizer from {folder}: {str(e).strip().splitlines()[0]}") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _gemma_folder(folder: Path, sub: str) -> Path:
    if (folder / sub).is_dir():
        return folder / sub
    if not folder.is_dir():
        raise LowvramError(f"text encoder folder {folder} does not exist: give the local Gemma3 folder")
    return folder


def load_components(
    checkpoint: str | Path,
    text_encoder: str | Path | None = None,
    *,
    family: str | None = None,
    version: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    components: tuple[str, ...] = (*CHECKPOINT_COMPONENTS, "text_encoder", "tokenizer"),
    precision: str | None = None,
    text_encoder_precision: str | None = None,
    quant_cache_dir: str | Path | None = None,
    profile: HardwareProfile | None = None,
    progress_for=None,
) -> LTX2Components:
    """Every requested component from a checkpoint (+ a Gemma3 folder); the rest of the fields are None.

    `text_encoder` defaults to the checkpoint folder itself for diffusers folders (text_encoder/, tokenizer/).
    `precision` / `text_encoder_precision` (e.g. "int8-quanto"; None, bf16 or fp32 = unquantized, in `dtype`): the
    transformer / Gemma3 are built on meta and quantized Linear by Linear as their weights are read, so host RAM
    peaks near the quantized size; `dtype` stays the dtype of everything left unquantized. `quant_cache_dir` keeps
    the quantized weights for later loads. `profile` refuses a precision the machine cannot run before any file is
    opened. The results of quantized loads are in the returned `quant_loads`. `version` (model.version) is checked
    against the checkpoint's weights and the text encoder folder's model type. `progress_for(component, skeleton)`
    may return a `progress` callback for that quantized load (the disk tier writes blocks as they load).
    """
    from lowvram.quant.precision import check_backend_supported, parse_precision

    quant = {"transformer": precision, "text_encoder": text_encoder_precision}
    quant = {name: parse_precision(p) for name, p in quant.items() if p is not None and name in components}
    quant = {name: p for name, p in quant.items() if p.quantized}
    if profile is not None:
        for p in quant.values():
            check_backend_supported(p, profile)
    source = open_checkpoint(checkpoint, family, version)
    loaded: dict[str, Any] = {name: None for name in (*CHECKPOINT_COMPONENTS, "text_encoder", "tokenizer")}
    results: dict[str, LoadResult] = {}
    for name in CHECKPOINT_COMPONENTS:
        if name not in components:
            continue
        if name in quant:
            loaded[name], results[name] = load_component_quantized(
                source, name, quant[name], dtype=dtype, cache_dir=quant_cache_dir, progress_for=progress_for
            )
            loaded[name] = loaded[name].to(device)
        else:
            loaded[name] = load_component(source, name, dtype=dtype, device=device)
    if {"text_encoder", "tokenizer"} & set(components):
        folder = text_encoder if text_encoder is not None else (source.path if source.kind == "diffusers" else None)
        if folder is None:
            raise LowvramError("the single-file checkpoint has no Gemma3: give the local Gemma3 folder (text_encoder)")
        check_text_encoder_version(folder, source.version)
        if "text_encoder" in quant:
            te, results["text_encoder"] = load_text_encoder_quantized(
                folder, quant["text_encoder"], dtype=dtype, cache_dir=quant_cache_dir, progress_for=progress_for
            )
            loaded["text_encoder"] = te.to(device)
        elif "text_encoder" in components:
            loaded["text_encoder"] = load_text_encoder(folder, dtype).to(device)
        if "tokenizer" in components:
            loaded["tokenizer"] = load_tokenizer(folder)
    return LTX2Components(**loaded, quant_loads=results)


# --------------------------------------------------------------------------------------------------------------------
# Quantized loading: the same sources read through lowvram.quant.stream, quantizing each Linear as it arrives


class ComponentSource:
    """One component of a checkpoint as a `lowvram.quant.stream.TensorSource`: diffusers keys, plain file reads
    (nothing stays memory-mapped), scaled fp8 weights dequantized exactly as `iter_component_tensors` does, and
    row slices (`get_rows`) so a row-wise backend never holds a whole unquantized weight."""

    def __init__(self, source: CheckpointSource, component: str, wanted: set[str]):
        from lowvram.quant.source import SafetensorsSource

        self.refs = {k: r for k, r in source.tensors[component].items() if k in wanted}
        self.raw = source.raw.get(component, {})
        self.files = sorted({r.file for r in self.refs.values()})
        self._reader = SafetensorsSource(self.files)  # keyed by the names in the files (unique, checked at open)
        for ref in self.refs.values():
            if not ref.dtype.startswith("F8") and not self._reader.index[ref.key].dtype.is_floating_point:
                raise LowvramError(
                    f"{ref.file}: {ref.key} is stored as {ref.dtype}; packed 4-bit checkpoints are not supported: "
                    "use the bf16 (dev) or fp8 checkpoint"
                )

    def close(self) -> None:
        self._reader.close()

    def keys(self) -> set[str]:
        return set(self.refs)

    def mapping(self) -> list[tuple[str, str]]:
        return sorted((ref.key, key) for key, ref in self.refs.items())

    def get(self, model_key: str) -> torch.Tensor:
        ref = self.refs[model_key]
        return self._dequantized(ref, self._reader.get(ref.key), None)

    def get_rows(self, model_key: str, start: int, stop: int) -> torch.Tensor:
        ref = self.refs[model_key]
        return self._dequantized(ref, self._reader.get_rows(ref.key, start, stop), (start, stop))

    def _dequantized(self, ref: TensorRef, t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        if not ref.dtype.startswith("F8"):
            return t
        stem = ref.key.rsplit(".", 1)[0]
        names = [n for n in (f"{stem}.weight_scale", f"{stem}.scale_weight") if n in self.raw]
        scale = self._reader.get(self.raw[names[0]].key).to(torch.float32) if names else torch.ones(())
        if scale.ndim == 1 and t.ndim > 1:
            if rows is not None and scale.numel() > 1:
                scale = scale[rows[0] : rows[1]]
            scale = scale.view(-1, *([1] * (t.ndim - 1)))  # per output channel
        return t.to(torch.float32) * scale


def load_component_quantized(
    source: CheckpointSource,
    component: str,
    precision,
    *,
    dtype: torch.dtype,
    cache_dir: str | Path | None = None,
    progress_for=None,
) -> tuple[torch.nn.Module, LoadResult]:
    """`component` built with its parameters on meta, filled by `load_quantized` with its exclude list, frozen and
    ready for peft. Keys and shapes are checked (by name, as `load_component` does) before any tensor is read."""
    from lowvram.quant.backends import prepare_for_peft
    from lowvram.quant.exclude import EXCLUDES
    from lowvram.quant.stream import build_empty, load_quantized

    if component not in source.tensors:
        raise LowvramError(f"{source.path} has no {component} weights")
    config = source.configs[component]
    skeleton = build_empty(lambda: build_component(component, config))
    check_keys(component, skeleton, source.tensors[component], source.path)
    wanted = set(skeleton.state_dict(keep_vars=True))
    progress = progress_for(component, skeleton) if progress_for is not None else None
    with contextlib.closing(ComponentSource(source, component, wanted)) as tensors:
        result = load_quantized(
            skeleton,
            tensors,
            precision,
            dtype=dtype,
            exclude=EXCLUDES.get(component, ()),
            cache_dir=cache_dir,
            progress=progress,
        )
    prepare_for_peft(skeleton)
    return skeleton.eval().requires_grad_(False), result


# Older Gemma3 checkpoints (google/gemma-3-*, written before transformers 5) name the text model
# `language_model.model.*`; transformers renames them on load, and so do we (first match wins).
_GEMMA_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def gemma_key(key: str) -> str:
    """A Gemma3ForConditionalGeneration checkpoint key in transformers 5 naming."""
    for old, new in _GEMMA_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_text_encoder_quantized(
    folder: str | Path, precision, *, dtype: torch.dtype, cache_dir: str | Path | None = None, progress_for=None
) -> tuple[torch.nn.Module, LoadResult]:
    """Gemma3 (or LTX-2.5's Gemma 4 unified, by config.json's model_type: same Linear names, same tied head) from a
    local folder, built on meta and quantized while read (GEMMA3_EXCLUDE;
    the lm_head/embedding tie is kept: the tied pair is left unquantized and loaded once)."""
    from lowvram.quant.backends import prepare_for_peft
    from lowvram.quant.exclude import GEMMA3_EXCLUDE
    from lowvram.quant.stream import build_empty, load_quantized

    folder = _gemma_folder(Path(folder), "text_encoder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        what = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors weights"
        raise LowvramError(f"{folder} has {what}; lowvram loads Gemma3 from safetensors only")
    model_type = text_encoder_model_type(folder)
    config_cls, model_cls = text_encoder_classes(model_type)
    try:
        config = config_cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise LowvramError(f"cannot read the Gemma3 config in {folder}: {str(e).strip().splitlines()[0]}") from e
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does: computed buffers get the weights' dtype
    try:
        skeleton = build_empty(lambda: model_cls(config))
    finally:
        torch.set_default_dtype(previous)
    # strict=False: like from_pretrained, spare tensors in the files are ignored; missing ones are still refused.
    result = load_quantized(
        skeleton,
        files,
        precision,
        dtype=dtype,
        exclude=GEMMA3_EXCLUDE,
        key_map=gemma_key,
        cache_dir=cache_dir,
        strict=False,
        progress=progress_for("text_encoder", skeleton) if progress_for is not None else None,
    )
    prepare_for_peft(skeleton)
    return skeleton.eval().requires_grad_(False), result


def quantize_loaded(module: torch.nn.Module, component: str, precision) -> list[str]:
    """Quantize an already-loaded component in place with its exclude list and make it ready for peft; for models
    built in memory (the tiny family). Checkpoints go through `load_components(precision=...)` instead."""
    from lowvram.quant.backends import prepare_for_peft, quantize_model
    from lowvram.quant.exclude import EXCLUDES

    names = quantize_model(module, precision, EXCLUDES.get(component, ()))
    prepare_for_peft(module)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Saving (the tiny family member, and conversions)


def save_single_file(
    components: LTX2Components, path: str | Path, family: str, version: str | None = None
) -> None:
    """Write the five checkpoint components in the official combined layout (atomically), tagged with `family`
    (and `version`, when given, under `lowvram_model_version`)."""
    from lowvram.fsutil import save_safetensors_atomic

    tensors: dict[str, torch.Tensor] = {}
    for name in CHECKPOINT_COMPONENTS:
        sd = getattr(components, name).state_dict()
        for official, key in diffusers_to_official(name, list(sd)).items():
            tensors[official] = sd[key].detach().contiguous()
    # The official VAE file also carries two statistics diffusers drops; write them so loading exercises that.
    n = components.video_vae.latents_mean.numel()
    tensors["vae.per_channel_statistics.channel"] = torch.arange(n, dtype=torch.float32)
    tensors["vae.per_channel_statistics.mean-of-stds"] = torch.ones(n, dtype=torch.float32)
    metadata = {FAMILY_METADATA_KEY: family}
    if version is not None:
        metadata[VERSION_METADATA_KEY] = versions.check_version(version)
    save_safetensors_atomic(tensors, path, metadata=metadata)


def save_diffusers_folder(components: LTX2Components, folder: str | Path) -> None:
    """Write every present component as a diffusers-format folder (config.json + safetensors per subfolder)."""
    from lowvram.fsutil import atomic_write_json, save_safetensors_atomic

    folder = Path(folder)
    for name in CHECKPOINT_COMPONENTS:
        module = getattr(components, name)
        if module is None:
            continue
        sub = folder / DIFFUSERS_SUBFOLDERS[name]
        config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
        config["_class_name"] = type(module).__name__
        atomic_write_json(sub / "config.json", _jsonable(config))
        sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_safetensors_atomic(sd, sub / "diffusion_pytorch_model.safetensors")
    save_text_encoder(components, folder)


def save_text_encoder(components: LTX2Components, folder: str | Path) -> None:
    """Gemma3 + tokenizer as text_encoder/ and tokenizer/ under `folder` (transformers' own safetensors format)."""
    folder = Path(folder)
    if components.text_encoder is not None:
        components.text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    if components.tokenizer is not None:
        components.tokenizer.save_pretrained(str(folder / "tokenizer"))


def save_tiny_checkpoint(folder: str | Path, seed: int = 0, version: str | None = None) -> Path:
    """The tiny family member on disk as a real user has LTX-2: one combined .safetensors + a Gemma folder.

    `version` builds that release's tiny model and names it in the file (the 2.0 file is left unnamed, as before,
    so its version is read from its keys)."""
    folder = Path(folder)
    comps = build_tiny_components(seed=seed, version=version or versions.DEFAULT_VERSION)
    path = folder / ("ltx-2-tiny.safetensors" if version is None else f"ltx-{version}-tiny.safetensors")
    save_single_file(comps, path, family="tiny", version=version)
    save_text_encoder(comps, folder / "gemma")
    return path


def _jsonable(obj):
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj
