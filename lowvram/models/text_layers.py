"""Where the text encoder's decoder layers are (what the text disk tier streams and the planner sizes)."""

from __future__ import annotations

from torch import nn

from lowvram.errors import UsageError

_NOT_TEXT = ("vision", "audio", "image", "multi_modal")  # the encoder's other towers never run while caching text


def decoder_layers(text_encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the language model's decoder layers (Gemma3: `model.language_model.layers`):
    the `layers` list with the most parameters outside the vision/audio towers."""
    found = [
        (name, module)
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.rpartition(".")[2] == "layers"
        and not any(word in name for word in _NOT_TEXT)
    ]
    if not found:
        raise UsageError(
            f"memory.text_encoder_on_disk: {type(text_encoder).__name__} has no decoder `layers` list to stream: "
            "set memory.text_encoder_on_disk = false"
        )
    return max(found, key=lambda f: sum(p.numel() for p in f[1].parameters()))
