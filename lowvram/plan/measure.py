"""Exact byte and FLOP measurements of LTX-2's components on fake tensors, cached on disk.

Each function builds the real diffusers/transformers class on the meta device at the run's real shapes, runs it under
FakeTensorMode with LiveBytes, and returns plain numbers. It does not decide anything (budget.py and plan.py do).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from lowvram.fsutil import atomic_write_json

# Bump when a measurement's meaning changes: old cache entries are then simply not found.
MEASURE_VERSION = "4"

_CONFIG_ROOT = Path(__file__).resolve().parent.parent / "models" / "configs"
COMPONENTS = ("transformer", "text_encoder", "connectors", "video_vae", "audio_vae")


# --------------------------------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class ModelConfigs:
    """Constructor kwargs of the five components that take memory (the vocoder only renders validation audio)."""

    family: str  # names the version too, so every measurement is cached per version ("ltx2", "ltx2-2.3", ...)
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]  # Gemma3Config / Gemma4UnifiedConfig kwargs (+ "model_type" for Gemma 4)
    connectors: dict[str, Any]
    video_vae: dict[str, Any]
    audio_vae: dict[str, Any]

    version: str = "2.0"


def model_configs(family: str, version: str | None = None) -> ModelConfigs:
    """`ltx2`: the released configs of `version` (2.0 default, 2.3, 2.5) shipped in lowvram/models/configs;
    `tiny`: the CPU test configs of that version."""
    from lowvram.models.versions import DEFAULT_VERSION, model_version

    info = model_version(version or DEFAULT_VERSION)
    if family == "tiny":
        from lowvram.models.ltx2 import tiny_configs

        cfgs = tiny_configs(info.name)
    else:
        cfgs = {}
        for name in COMPONENTS:
            raw = json.loads((_CONFIG_ROOT / info.config_dir / f"{name}.json").read_text(encoding="utf-8"))
            cfgs[name] = {k: v for k, v in raw.items() if not k.startswith("_")}
    # 2.0 keeps its historic family name, so measurements already cached for it stay valid.
    name = family if info.name == DEFAULT_VERSION else f"{family}-{info.name}"
    return ModelConfigs(family=name, version=info.name, **{n: cfgs[n] for n in COMPONENTS})


@dataclass(frozen=True)
class TrainShape:
    """Token counts of one training step, derived from the clip shape the way the LTX-2 VAEs compress it."""

    batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_tokens: int  # 1 (a dummy) when audio is not trained
    text_tokens: int
    # IC-LoRA: the control clip's latent (height, width) at reference_downscale; its tokens follow the target's
    reference_hw: tuple[int, int] | None = None

    @property
    def reference_tokens(self) -> int:
        return 0 if self.reference_hw is None else self.latent_frames * self.reference_hw[0] * self.reference_hw[1]

    @property
    def video_tokens(self) -> int:
        """Every video token of the transformer call: the target grid's, and IC-LoRA's reference tokens."""
        return self.latent_frames * self.latent_height * self.latent_width + self.reference_tokens

    def key(self) -> dict:
        """The shape as measurement caches key it (a plain run's key is what it was before IC-LoRA existed)."""
        return {k: v for k, v in self.__dict__.items() if not (k == "reference_hw" and v is None)}

    @property
    def in_context(self) -> tuple[int, int, int, int] | None:
        """What `transformer_forward` needs to position the reference tokens (None without IC-LoRA)."""
        if self.reference_hw is None:
            return None
        h, w = self.reference_hw
        return self.latent_frames, h, w, self.latent_height // h


def train_shape(
    configs: ModelConfigs,
    *,
    width: int,
    height: int,
    frames: int,
    fps: float,
    batch: int,
    text_tokens: int,
    audio: bool,
    mode: str = "av",
    reference_downscale: int | None = None,
) -> TrainShape:
    vae = configs.video_vae
    spatial = vae.get("spatial_compression_ratio") or 32
    temporal = vae.get("temporal_compression_ratio") or 8
    a = configs.audio_vae
    latent_per_s = a["sample_rate"] / a["mel_hop_length"] / 4  # the audio VAE compresses mel time 4x: 25 /s
    audio_tokens = math.ceil(frames / fps * latent_per_s) if (audio and mode != "video") else 1
    if mode == "audio":
        # Video-only / audio-only runs pass a 1-token dummy for the other modality (a zero-length one crashes RoPE).
        return TrainShape(batch, 1, 1, 1, audio_tokens, text_tokens)
    h, w = height // spatial, width // spatial
    # IC-LoRA doubles the sequence (the control clip's tokens, 1/k² of them at reference_downscale k)
    ref = None if reference_downscale is None else (h // reference_downscale, w // reference_downscale)
    return TrainShape(batch, (frames - 1) // temporal + 1, h, w, audio_tokens, text_tokens, ref)


# --------------------------------------------------------------------------------------------------------------------
# Disk cache


def default_cache_dir() -> Path:
    base = os.environ.get("LOWVRAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowvram")
    return Path(base) / "plan"


@functools.cache
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "measure": MEASURE_VERSION}
    for pkg in ("diffusers", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "none"
    return out


class MeasureCache:
    """JSON files keyed by (kind, arguments, library versions): a warm plan never builds a model."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        self.progress: Callable[[str, dict[str, Any]], None] | None = None  # told before each measurement runs

    def get(self, kind: str, key: dict[str, Any], compute: Callable[[], dict]) -> dict:
        blob = json.dumps({"kind": kind, "key": key, "versions": _versions()}, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
        if digest in self._memory:
            return self._memory[digest]
        path = self.dir / f"{kind}-{digest}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))["value"]
            self.hits += 1
        except (OSError, ValueError, KeyError):
            self.misses += 1
            if self.progress is not None:
                self.progress(kind, key)
            value = compute()
            try:
                atomic_write_json(path, {"kind": kind, "key": json.loads(blob), "value": value})
            except OSError:
                pass  # a read-only cache folder costs speed, never correctness
        self._memory[digest] = value
        return value


# --------------------------------------------------------------------------------------------------------------------
# Weights (parameter counts by role; bytes per precision are computed in budget.py from the quant layouts)


def _linear_groups(model: torch.nn.Module, exclude: tuple[str, ...], prefix_filter: Callable[[str], bool]) -> dict:
    """Quantizable Linear weight shapes (deduplicated with counts) and the count of all other parameters."""
    from lowvram.quant.exclude import is_quantizable

    shapes: dict[str, int] = {}
    quant_params = 0
    for name, module in model.named_modules():
        if not prefix_filter(name) or not is_quantizable(name, module, exclude):
            continue
        key = f"{module.out_features}x{module.in_features}"  # the bias stays unquantized: counted as "other"
        shapes[key] = shapes.get(key, 0) + 1
        quant_params += module.weight.numel()
    params = [p.numel() for n, p in model.named_parameters() if prefix_filter(n)]
    return {
        "linear_shapes": shapes,
        "other_params": sum(params) - quant_params,
        "largest_param": max(params, default=0),
    }


def transformer_weights(configs: ModelConfigs) -> dict:
    """Parameters of one transformer block and of everything outside the blocks (all blocks are identical)."""
    from diffusers import LTX2VideoTransformer3DModel

    from lowvram.quant.exclude import LTX2_TRANSFORMER_EXCLUDE

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**{**configs.transformer, "num_layers": 1})
    block = _linear_groups(model, LTX2_TRANSFORMER_EXCLUDE, lambda n: n.startswith("transformer_blocks."))
    rest = _linear_groups(model, LTX2_TRANSFORMER_EXCLUDE, lambda n: not n.startswith("transformer_blocks."))
    return {"block": block, "rest": rest, "num_layers": configs.transformer.get("num_layers", 48)}


# diffusers' leaf_level group offload makes one group of each of these (its _GO_LC_SUPPORTED_PYTORCH_LAYERS)
_LEAF_TYPES = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)


def transformer_nonleaf_params(configs: ModelConfigs) -> dict:
    """Parameters outside leaf modules (norm weights, modulation tables): leaf_level group offload onloads them with
    their parent module, so they sit beside the onloaded leaves for the parent's whole forward."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**{**configs.transformer, "num_layers": 1})
    block = rest = 0
    for name, module in model.named_modules():
        if isinstance(module, _LEAF_TYPES):
            continue
        own = sum(p.numel() for p in module._parameters.values() if p is not None)
        if name.startswith("transformer_blocks."):
            block += own
        else:
            rest += own
    return {"block_nonleaf_params": block, "rest_nonleaf_params": rest}


def _onload_leaf_copies(model: torch.nn.Module) -> list:
    """Hooks that make every frozen leaf module compute with a fresh copy of its weights, dropped after its forward:
    what leaf_level group offload does. Autograd keeps a copy only where it saved the weight for backward, so the
    measured bytes then include exactly the onloaded weights a step holds at each point."""
    handles = []

    def pre(module, _args):
        saved = {}
        for name, param in list(module._parameters.items()):
            if param is not None and not param.requires_grad:
                saved[name] = param
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        module._lowvram_onloaded = saved

    def post(module, _args, _output):
        module._parameters.update(module.__dict__.pop("_lowvram_onloaded", {}))

    for module in model.modules():
        if isinstance(module, _LEAF_TYPES) and any(not p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    return handles


def text_encoder_weights(configs: ModelConfigs) -> dict:
    """The text encoder as loaded (Gemma3: language model, vision tower, projector; Gemma 4 unified: language model
    and embedders) split into quantizable Linears and the rest."""
    from lowvram.models.ltx2 import build_text_encoder
    from lowvram.quant.exclude import GEMMA3_EXCLUDE

    with torch.device("meta"):
        model = build_text_encoder(configs.text_encoder)
    return _linear_groups(model, GEMMA3_EXCLUDE, lambda n: True)


def text_encoder_layer_weights(configs: ModelConfigs) -> dict:
    """The text encoder's decoder layers (what `memory.text_encoder_on_disk` streams): their count, all of them
    together and the largest one (the ring's slot), split like `text_encoder_weights`."""
    from lowvram.models.ltx2 import build_text_encoder
    from lowvram.models.text_layers import decoder_layers
    from lowvram.quant.exclude import GEMMA3_EXCLUDE

    with torch.device("meta"):
        model = build_text_encoder(configs.text_encoder)
    name, layers = decoder_layers(model)
    per_layer = [_linear_groups(model, GEMMA3_EXCLUDE, lambda n, i=i: n.startswith(f"{name}.{i}.")) for i in
                 range(len(layers))]  # fmt: skip
    largest = max(per_layer, key=lambda g: g["other_params"] + sum(_shape_params(k) * c for k, c in
                                                                   g["linear_shapes"].items()))  # fmt: skip
    return {
        "layers": len(layers),
        "all": _linear_groups(model, GEMMA3_EXCLUDE, lambda n: n.startswith(f"{name}.")),
        "largest": largest,
    }


def _shape_params(key: str) -> int:
    out_features, in_features = key.split("x")
    return int(out_features) * int(in_features)


def connectors_weights(configs: ModelConfigs) -> dict:
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    with torch.device("meta"):
        model = LTX2TextConnectors(**configs.connectors)
    # Connectors stay in the compute dtype: they run once per caption while caching and their output is cached.
    return _linear_groups(model, ("*",), lambda n: True)


def vae_weights(configs: ModelConfigs) -> dict:
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    with torch.device("meta"):
        video = AutoencoderKLLTX2Video(**configs.video_vae)
        audio = AutoencoderKLLTX2Audio(**configs.audio_vae)
    return {
        "video_params": sum(p.numel() for p in video.parameters()),
        "video_encoder_params": sum(p.numel() for p in video.encoder.parameters()),
        "audio_params": sum(p.numel() for p in audio.parameters()),
    }


# --------------------------------------------------------------------------------------------------------------------
# One transformer training step (forward + loss + backward) on fake tensors


@dataclass(frozen=True)
class LoraSpec:
    """The adapter as lowvram.method.lora injects it (adapters take the base weights' dtype)."""

    rank: int
    targets: tuple[str, ...]
    dropout: float = 0.0
    include_audio: bool = True


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}[name]


def build_lora_transformer(transformer_config: dict, num_layers: int, lora: LoraSpec, compute_dtype: torch.dtype):
    """The real LTX-2 transformer on meta with the trainer's own LoRA injection: only the adapters require grad."""
    from diffusers import LTX2VideoTransformer3DModel

    from lowvram.method.lora import inject_lora

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**{**transformer_config, "num_layers": num_layers})
    model = model.to(compute_dtype)
    inject_lora(
        model, rank=lora.rank, targets=tuple(lora.targets), dropout=lora.dropout, include_audio=lora.include_audio
    )
    return model


def measure_transformer_step(
    transformer_config: dict,
    shape: TrainShape,
    lora: LoraSpec,
    *,
    compute_dtype: str = "bf16",
    checkpointing: bool,
    attention: str = "flash",
    num_layers: int = 1,
    onload_copies: bool = False,
    first_block: bool = False,
    tread_ratio: float | None = None,
) -> dict:
    """Activation bytes (parameters excluded, LoRA grads included) of one training step, by section.

    With `onload_copies` every frozen leaf module computes with a fresh copy of its weights (leaf_level group
    offload), so the bytes include the onloaded weights alive at each point. With `first_block` block 0 is measured
    as the first block of a real run (its inputs come from frozen layers and need no grad): only its peaks are
    meaningful then (there is no input-grad mark).

    Sections: `head` (embeddings, RoPE, caption projection), `block_fwd` / `block_bwd` of block 0, `tail` (output
    layers, loss and their backward), `head_bwd`. Marks give live bytes at the block's boundaries. Block 0 is
    measured as a middle block: the video/audio inputs require grad so its backward computes input grads too.

    With `tread_ratio` block 0 runs under the trainer's own TreadRouter (a route 0..0 at that share), so its
    sections hold what a routed block does: the kept share of video tokens, with its gathered per-token inputs.
    """
    from lowvram.fakemem import LiveBytes, attention_backend, fake_mode, register_module_storages
    from lowvram.models.ltx2 import TextEmbeddings, text_embedding_widths, transformer_forward

    dtype = _dtype(compute_dtype)
    model = build_lora_transformer(transformer_config, num_layers, lora, dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    cfg = model.config
    b, s_v, s_a, length = shape.batch, shape.video_tokens, shape.audio_tokens, shape.text_tokens
    block = model.transformer_blocks[0]
    lora_per_block = sum(p.numel() for n, p in block.named_parameters() if "lora_" in n)
    lora_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    with fake_mode():
        model = model.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, model)
        state = {"phase": "head", "calls": 0}

        def on_bwd_start(_grads):
            live.mark("block_bwd_start")
            live.enter_section("block_bwd")

        def on_bwd_end(_grads):
            live.mark("block_bwd_end")
            live.enter_section("head_bwd")

        def pre_hook(_module, args, kwargs):
            state["calls"] += 1
            if state["calls"] > 1:  # the recompute of a checkpointed block runs inside its backward
                live.mark("recompute_start")
                return
            live.mark("block_fwd_start")
            live.enter_section("block_fwd")
            state["inputs"] = {id(t.untyped_storage()) for t in _tensors(kwargs)}
            inputs = [
                kwargs.get("hidden_states", args[0] if args else None),
                kwargs.get("audio_hidden_states", args[1] if len(args) > 1 else None),
            ]
            needing_grad = [t for t in inputs if t is not None and t.requires_grad]
            if needing_grad:
                torch.autograd.graph.register_multi_grad_hook(needing_grad, on_bwd_end)

        def post_hook(_module, _args, kwargs, output):
            if state["calls"] > 1:
                live.mark("recompute_end")  # what the block keeps for backward when not checkpointed
                return
            live.mark("block_fwd_end")
            live.enter_section("tail")
            # Inputs made inside the call (the router's gathers) are alive until it returns; tail_start_hook takes
            # out the ones that die then: they are no part of what the block keeps.
            state["made_inside"] = [
                (weakref.ref(t.untyped_storage()), t.untyped_storage().nbytes())
                for t in _tensors(kwargs)
                if id(t.untyped_storage()) not in state["inputs"]
            ]
            if tread_ratio is None:
                watch_output_grads(output)

        def watch_output_grads(output):
            # "any": the first output grad starts the block's backward (a checkpointed block recomputes right then).
            torch.autograd.graph.register_multi_grad_hook(
                [t for t in output if t.requires_grad], on_bwd_start, mode="any"
            )

        def tail_start_hook(_module, _args):
            if state.get("made_inside") is not None:
                dead = {id(r): n for r, n in state.pop("made_inside") if r() is None}
                live.marks["block_fwd_end"] -= sum(dead.values())

        def routed_output_hook(_module, _args, output):
            # After the router's scatter: the scatter's backward already needs the checkpointed block's saved index
            # (it recomputes), so the backward starts at the scattered output's grad.
            if state["calls"] == 1:
                watch_output_grads(output)

        handles = [
            block.register_forward_pre_hook(pre_hook, with_kwargs=True),
            block.register_forward_hook(post_hook, with_kwargs=True),
        ]
        if onload_copies:
            handles += _onload_leaf_copies(model)
        router = None
        if tread_ratio is not None:
            from types import SimpleNamespace

            from lowvram.method.tread import TreadRouter

            # Registered after the marks: its token gather counts inside the block, its scatter after it. (A middle
            # routed block gets its input already gathered: counting the gather here is conservative by one hidden
            # state of the kept tokens, and only without checkpointing.)
            route = SimpleNamespace(selection_ratio=tread_ratio, start_layer_idx=0, end_layer_idx=0)
            router = TreadRouter(model, [route])
            handles.append(block.register_forward_hook(routed_output_hook))
            handles.append(model.norm_out.register_forward_pre_hook(tail_start_hook))
        # Without early stop the recompute runs the whole block: its end marks what an uncheckpointed block keeps
        # (and the peak is at most a few output-sized tensors above the early-stopping default: conservative).
        no_early_stop = torch.utils.checkpoint.set_checkpoint_early_stop(False)
        with live, attention_backend(attention), no_early_stop:
            live.enter_section("head")
            latents = torch.empty(b, s_v, cfg.in_channels, dtype=dtype)
            noise = torch.empty_like(latents)
            audio_latents = torch.empty(b, s_a, cfg.audio_in_channels, dtype=dtype)
            audio_noise = torch.empty_like(audio_latents)
            sigma = torch.empty(b)
            x_t = (latents * (1 - sigma.view(b, 1, 1)) + noise * sigma.view(b, 1, 1)).to(dtype)
            x_t.requires_grad_(not first_block)
            a_t = (audio_latents * (1 - sigma.view(b, 1, 1)) + audio_noise * sigma.view(b, 1, 1)).to(dtype)
            a_t.requires_grad_(not first_block)
            text_video, text_audio = text_embedding_widths(cfg)  # the connectors' outputs, per version
            text = TextEmbeddings(
                video=torch.empty(b, length, text_video, dtype=dtype),
                audio=torch.empty(b, length, text_audio, dtype=dtype),
                mask=torch.ones(b, length, dtype=torch.int64),
            )
            # The trainer's own call, so what is measured is what trains.
            video_pred, audio_pred = transformer_forward(
                model,
                video_tokens=x_t,
                audio_tokens=a_t,
                text=text,
                video_sigma=sigma,
                audio_sigma=sigma,
                latent_frames=shape.latent_frames,
                latent_height=shape.latent_height,
                latent_width=shape.latent_width,
                fps=25.0,
                in_context=shape.in_context,
            )
            loss = (video_pred.float() - (noise - latents).float()).pow(2).mean()
            loss = loss + (audio_pred.float() - (audio_noise - audio_latents).float()).pow(2).mean()
            loss.backward()
            del video_pred, audio_pred, loss
            live.mark("end")
        for h in handles:
            h.remove()
        if router is not None:
            router.remove()
    return {
        "num_layers": num_layers,
        "marks": dict(live.marks),
        "peaks": dict(live.peaks),
        "flops": dict(live.flops),
        "peak_bytes": live.peak_bytes,
        "lora_params_per_block": lora_per_block,
        "lora_params_total": lora_total,
    }


def _tensors(kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a block call's keyword arguments (RoPE comes as a tuple), each storage once."""
    out, seen = [], set()
    for value in kwargs.values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in seen:
                seen.add(id(t.untyped_storage()))
                out.append(t)
    return out


def resolve_tread_routes(routes: list, num_layers: int) -> tuple[tuple[int, int, float], ...]:
    """`(start, end, selection_ratio)` per route, resolved and checked exactly as the trainer's TreadRouter does."""
    from lowvram.method.tread import resolve_routes

    return resolve_routes(routes, num_layers)


# --------------------------------------------------------------------------------------------------------------------
# Text encoding (Gemma3 at 1024 tokens, all hidden states stacked) and the connectors


def measure_text_encode(
    configs: ModelConfigs, text_tokens: int, *, compute_dtype: str = "bf16", batch: int = 1
) -> dict:
    """Activation peak of Gemma3 -> stacked hidden states, and of the connectors on that stack.

    Gemma is run at full width with 1 and 2 decoder layers and extrapolated to its real depth: each layer adds one
    kept hidden state (and one slice of the stack), so the peak is linear in depth; the connectors run at full size.
    Gemma 4 (LTX-2.5) is measured the same way: its 1- and 2-layer builds are sliding + global layers, whose
    activations differ little next to the kept hidden states and the logits.
    """
    from lowvram.fakemem import LiveBytes, fake_mode, register_module_storages
    from lowvram.models.ltx2 import build_text_encoder

    dtype = _dtype(compute_dtype)
    text_cfg = configs.text_encoder["text_config"]
    depth = text_cfg["num_hidden_layers"]
    length = min(text_tokens, text_cfg.get("max_position_embeddings", text_tokens))
    peaks = []
    vision_cfg = configs.text_encoder.get("vision_config")
    if vision_cfg and "num_hidden_layers" in vision_cfg:  # Gemma3's SigLIP tower; Gemma 4's embedder has no layers
        vision_cfg = {**vision_cfg, "num_hidden_layers": 1}
    for layers in (1, 2):
        # The class models/ltx2/build.py builds (its LM head computes logits too); a text-only input never runs the
        # vision tower, so one vision layer is built instead of 27 (parameters are not counted here anyway).
        # A config.json's layer_types (and Gemma 4's per-layer overrides of its global layers) list every layer:
        # rebuilt for the reduced depth, the last layer global as transformers requires.
        reduced = {k: v for k, v in text_cfg.items() if k not in ("layer_types", "per_layer_config")}
        if text_cfg.get("per_layer_config"):
            reduced["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
            reduced["per_layer_config"] = {layers - 1: next(iter(text_cfg["per_layer_config"].values()))}
        cfg = {
            **configs.text_encoder,
            "text_config": {**reduced, "num_hidden_layers": layers},
            "vision_config": vision_cfg,
        }
        with torch.device("meta"):
            model = build_text_encoder(cfg)
        model = model.to(dtype).eval()
        with fake_mode(), torch.no_grad():
            model = model.to_empty(device="cpu")
            live = LiveBytes()
            register_module_storages(live, model)
            with live:
                live.enter_section("encode")
                ids = torch.zeros(batch, length, dtype=torch.int64)
                mask = torch.ones(batch, length, dtype=torch.int64)
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                stacked = torch.stack(out.hidden_states, dim=-1).flatten(2, 3)
                del out, stacked
        peaks.append(live.peak_bytes)
    gemma_peak = peaks[0] + (depth - 1) * (peaks[1] - peaks[0])

    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    with torch.device("meta"):
        connectors = LTX2TextConnectors(**configs.connectors)
    connectors = connectors.to(dtype).eval()
    width = configs.connectors["caption_channels"] * configs.connectors["text_proj_in_factor"]
    with fake_mode(), torch.no_grad():
        connectors = connectors.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, connectors)
        with live:
            live.enter_section("connectors")
            stacked = torch.empty(batch, length, width, dtype=dtype)
            mask = torch.ones(batch, length, dtype=torch.int64)
            video, audio, _ = connectors(stacked, mask, padding_side="left")
            del video, audio
    return {"gemma_peak_bytes": gemma_peak, "connectors_peak_bytes": live.peak_bytes, "text_tokens": length}


# --------------------------------------------------------------------------------------------------------------------
# VAE encode


def measure_video_vae_encode(
    configs: ModelConfigs,
    width: int,
    height: int,
    frames: int,
    options: dict,
    *,
    batch: int,
    compute_dtype: str = "bf16",
) -> dict:
    """The data helper's instrument (lowvram.vae) on the real-width encoder for one VAE option set."""
    from lowvram.vae import VaeOptions, measure_vae_encode_peak_bytes

    peak = measure_vae_encode_peak_bytes(
        configs.video_vae, width, height, frames, VaeOptions(**options), batch=batch, dtype=_dtype(compute_dtype)
    )
    return asdict(peak)


def measure_audio_vae_encode(
    configs: ModelConfigs, mel_frames: int, *, batch: int, compute_dtype: str = "bf16"
) -> dict:
    from diffusers import AutoencoderKLLTX2Audio

    from lowvram.fakemem import LiveBytes, fake_mode, register_module_storages

    dtype = _dtype(compute_dtype)
    with torch.device("meta"):
        vae = AutoencoderKLLTX2Audio(**configs.audio_vae)
    vae.decoder = None
    vae = vae.to(dtype)
    cfg = configs.audio_vae
    with fake_mode(), torch.no_grad():
        vae = vae.to_empty(device="cpu")
        live = LiveBytes()
        register_module_storages(live, vae)
        with live:
            live.enter_section("encode")
            mel = torch.empty(batch, cfg["in_channels"], max(4, mel_frames), cfg["mel_bins"], dtype=dtype)
            vae.encode(mel).latent_dist.mode()
    return {"peak_bytes": live.peak_bytes}
