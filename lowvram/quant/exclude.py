"""Which Linears get quantized: LTX-2 and Gemma3 exclude lists (module-name patterns) and the rule applying them.

Only exact `nn.Linear` modules are candidates (norms, embeddings, convs and Linear subclasses that callers read
`.weight` from directly, like MultiheadAttention's out_proj, are never touched). Error measurements: README/quant.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch

# diffusers LTX2VideoTransformer3DModel: keep everything outside the 48 transformer blocks in full precision. These
# layers are small (<2% of the weights) but sit where an error reaches every token: the patchify projections in and
# out, the caption projections, and the timestep/AdaLN embeddings that modulate every block.
LTX2_TRANSFORMER_EXCLUDE: tuple[str, ...] = (
    "proj_in",
    "audio_proj_in",
    "proj_out",
    "audio_proj_out",
    "caption_projection.*",
    "audio_caption_projection.*",
    "time_embed.*",
    "audio_time_embed.*",
    "av_cross_attn_*",
    "*norm*",
    "*embed*",
)

# transformers Gemma3ForConditionalGeneration (text path): the tied lm_head/embedding (quantizing lm_head would
# untie it), the multimodal projector and the vision tower's embeddings. Norms and embeddings are not Linears anyway.
GEMMA3_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*embed_tokens*",
    "*multi_modal_projector*",
    "*embeddings*",
    "*norm*",
)


# Per component, so the transformer and the text encoder can each have their own precision.
EXCLUDES: dict[str, tuple[str, ...]] = {"transformer": LTX2_TRANSFORMER_EXCLUDE, "text_encoder": GEMMA3_EXCLUDE}


def is_quantizable(name: str, module: torch.nn.Module, exclude: Sequence[str] = ()) -> bool:
    """True when `module` (called `name` in its model) is a plain Linear that no exclude pattern matches."""
    if type(module) is not torch.nn.Linear:
        return False
    return not any(fnmatchcase(name, pattern) for pattern in exclude)


def quantizable_names(model: torch.nn.Module, exclude: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Names of the Linears a load at a quantized precision replaces: not excluded, and not holding a tied weight
    (a tied lm_head/embedding would silently untie)."""
    tied = tied_parameter_ids(model)
    return [
        name
        for name, module in model.named_modules()
        if is_quantizable(prefix + name, module, exclude) and id(module.weight) not in tied
    ]


def tied_parameter_ids(model: torch.nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, n in counts.items() if n > 1}
