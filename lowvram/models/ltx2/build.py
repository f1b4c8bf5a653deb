"""Building LTX-2 components from configs: the real diffusers / transformers classes, on meta or with tiny weights.

It loads no checkpoint (checkpoint.py fills these skeletons) and runs nothing (forward.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowvram.errors import LowvramError
from lowvram.models.ltx2.configs import TINY_MAX_TEXT_TOKENS, family_configs, tiny_configs

# Special ids follow Gemma3's text config defaults (pad 0, eos 1, bos 2) so the tiny tokenizer and the tiny Gemma
# agree without extra config.
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")

# Words of the demo captions (coloured shapes moving, a tone per clip) plus common glue words. Anything else maps
# to <unk>; digits are split one by one so any number is covered.
_TINY_WORDS = """
a an the and or with of in on at to from into over under across around through toward towards away along
between while then as is are it its this that there one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 , . ; : - ! ? ' "
red green blue yellow orange purple pink white black gray grey cyan magenta brown light dark bright pale
colored coloured colorful colourful
circle circles square squares triangle triangles rectangle rectangles star stars disc ball balls box boxes
dot dots ring rings cube sphere hexagon diamond ellipse oval line lines shape shapes object objects block blocks
moves move moving slides slide sliding bounces bounce bouncing spins spin spinning rotates rotate rotating
grows grow growing shrinks shrink shrinking falls fall falling rises rise rising drifts drift drifting
zooms zoom zooming pulses pulse pulsing flies fly flying jumps jump jumping glides glide gliding
stays still static
left right up down upward downward horizontally vertically diagonally clockwise counterclockwise
center centre middle top bottom corner edge side sides back forth
slowly quickly fast slow smooth smoothly steady steadily small large big tiny
background foreground screen frame frames scene video plain solid empty
tone tones sound sounds beep beeps hum hums plays play playing low high pitch pitched note notes hz loud quiet
soft sine wave audio silence silent
""".split()


@dataclass
class LTX2Components:
    """The seven pieces of an LTX-2 training setup. Modules are plain diffusers / transformers objects."""

    transformer: Any  # diffusers LTX2VideoTransformer3DModel
    video_vae: Any  # diffusers AutoencoderKLLTX2Video
    audio_vae: Any  # diffusers AutoencoderKLLTX2Audio
    vocoder: Any  # diffusers LTX2Vocoder
    text_encoder: Any  # transformers Gemma3ForConditionalGeneration
    tokenizer: Any  # transformers fast tokenizer, left padding
    connectors: Any  # diffusers LTX2TextConnectors
    # component -> lowvram.quant.stream.LoadResult, for each component loaded at a quantized precision (cache
    # hit or not, which Linears were quantized, bytes allocated); empty for bf16/fp32 loads.
    quant_loads: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Building


def text_encoder_classes(model_type: str = "gemma3"):
    """(config class, model class) of a text encoder by its transformers `model_type` (gemma3 or gemma4_unified)."""
    if model_type == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        return Gemma3Config, Gemma3ForConditionalGeneration
    if model_type == "gemma4_unified":
        try:
            from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
        except ImportError:
            import transformers

            raise LowvramError(
                f"LTX-2.5's Gemma 4 text encoder needs transformers with Gemma4UnifiedForConditionalGeneration "
                f"(>= 5.10); this one is {transformers.__version__}: upgrade transformers"
            ) from None
        return Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
    raise LowvramError(f"text encoder model_type {model_type!r} is not an LTX-2 text encoder (gemma3, gemma4_unified)")


def build_text_encoder(config: dict[str, Any]):
    """The text encoder from config kwargs or a config.json's `to_dict()` (its `model_type` picks Gemma 3 or 4)."""
    config = dict(config)
    config_cls, model_cls = text_encoder_classes(config.pop("model_type", "gemma3"))
    return model_cls(config_cls.from_dict(config))


def text_embedding_widths(transformer_config: Any) -> tuple[int, int]:
    """Widths of the (video, audio) text embeddings the transformer reads (= the connectors' outputs, the cache).

    LTX-2.0 projects the 3840-wide connector outputs inside the transformer (`use_prompt_embeddings`); 2.3/2.5's
    connectors project per modality to the attention widths (4096 / 2048) and the transformer reads them as they are
    (diffusers LTX2VideoTransformer3DModel.forward step 4, LTX2TextConnectors per_modality_projections).
    """
    get = (
        transformer_config.get
        if isinstance(transformer_config, dict)
        else (lambda k, d=None: getattr(transformer_config, k, d))
    )
    if get("use_prompt_embeddings", True):
        return get("caption_channels"), get("caption_channels")
    return get("cross_attention_dim"), get("audio_cross_attention_dim")


def build_component(name: str, config: dict[str, Any]):
    """Construct one component (random init) from its constructor kwargs; `name` is a field of LTX2Components."""
    if name == "text_encoder":
        return build_text_encoder(config)
    cls = _diffusers_class(name, config)
    return cls(**config)


def _diffusers_class(name: str, config: dict[str, Any] | None = None):
    if name == "transformer":
        from diffusers import LTX2VideoTransformer3DModel as cls
    elif name == "video_vae":
        from diffusers import AutoencoderKLLTX2Video as cls
    elif name == "audio_vae":
        from diffusers import AutoencoderKLLTX2Audio as cls
    elif name == "vocoder" and "bwe_hidden_channels" in (config or {}):
        # LTX-2.3/2.5: diffusers' convert_ltx2_vocoder builds LTX2VocoderWithBWE for them.
        from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE as cls
    elif name == "vocoder":
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as cls
    elif name == "connectors":
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors as cls
    else:
        raise ValueError(f"unknown LTX-2 component {name!r}")
    return cls


def build_tiny_tokenizer(max_length: int = TINY_MAX_TEXT_TOKENS):
    """A word-level tokenizer over the demo vocabulary, as a transformers fast tokenizer padding on the left."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(_TINY_WORDS))
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    if len(vocab) > tiny_configs()["text_encoder"]["text_config"]["vocab_size"]:
        raise AssertionError("tiny vocabulary outgrew the tiny Gemma's embedding table")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Whitespace()]
    )
    # Gemma prepends <bos>; so does this one, so the real and tiny text paths see the same structure.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_length,
    )


def build_tiny_components(
    seed: int = 0, dtype: torch.dtype = torch.float32, version: str | None = None
) -> LTX2Components:
    """The tiny family member: every real class at toy size, deterministic for a given seed, on CPU.

    Each component draws from its own seed so adding one never changes another's weights. The global RNG is left
    untouched. VAE latent statistics are set to non-trivial values so normalization is exercised. `version` picks
    the LTX-2 release whose flags the tiny model has.
    """
    cfgs = tiny_configs(version or "2.0")
    built: dict[str, Any] = {}
    for i, name in enumerate(("transformer", "video_vae", "audio_vae", "vocoder", "text_encoder", "connectors")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            module = build_component(name, cfgs[name])
            if name in ("video_vae", "audio_vae"):
                n = module.latents_mean.numel()
                module.latents_mean.copy_(0.1 * torch.randn(n))
                module.latents_std.copy_(1.0 + 0.5 * torch.rand(n))
        if dtype != torch.float32:
            module = module.to(dtype)
        built[name] = module.eval().requires_grad_(False)
    return LTX2Components(tokenizer=build_tiny_tokenizer(), **built)


def build_on_meta(
    component: str, config: dict[str, Any] | None = None, family: str = "ltx-2.0", version: str | None = None
):
    """The real class on the meta device (no memory): for planning and as the skeleton a load fills."""
    config = config if config is not None else family_configs(family, version)[component]
    with torch.device("meta"):
        module = build_component(component, config)
    return module
