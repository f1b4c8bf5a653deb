"""Training modes that change what one step trains on, applied from outside the loop through one small interface.

A mode's `prepare(inputs, predict, generator)` returns the step's `FlowInputs` (e.g. rolled-out noisy latents); the
loop calls each enabled mode once per micro-batch and knows none of them. Modes never build models or read files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from lowvram.method.objective import FlowInputs

# `predict(inputs, inference=False)` -> (video, audio) velocity predictions of the transformer being trained, under
# the run's autocast; `inference=True` runs it as at sampling time (eval mode: no LoRA dropout).
Predict = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class TrainingMode(Protocol):
    name: str

    def prepare(self, inputs: FlowInputs, predict: Predict, generator: torch.Generator) -> FlowInputs: ...

    # Optional: `finish(parts, inputs, batch) -> LossParts` after the training forward adds an auxiliary loss (CREPA).


def attach_mode_modules(transformer: torch.nn.Module, cfg) -> None:
    """Trainable modules a mode adds to the transformer (CREPA's projection head), after the LoRA is injected and
    before the optimizer is built, so the optimizer, checkpoints and resume carry them."""
    if cfg.crepa.enabled and not hasattr(transformer, "crepa_head"):
        from lowvram.data.crepa_features import feature_dim
        from lowvram.models.crepa import attach_head

        attach_head(transformer, feature_dim(cfg.crepa.encoder))


def build_modes(cfg, transformer: torch.nn.Module | None = None) -> tuple[TrainingMode, ...]:
    """The modes `cfg` enables, in the order they apply (CREPA needs the `transformer` its head is attached to)."""
    modes: list[TrainingMode] = []
    ic = cfg.ic_lora
    if ic.enabled:
        # First: later modes (a rollout) then see the reference tokens, which stay clean as the loss mask says.
        from lowvram.method.modes.ic_lora import InContextControl

        modes.append(InContextControl(reference_downscale=ic.reference_downscale))
    ss = cfg.scheduled_sampling
    if ss.enabled:
        from lowvram.method.modes.scheduled_sampling import ScheduledSampling

        modes.append(ScheduledSampling(probability=ss.probability, steps=ss.steps, sigma_step=ss.sigma_step))
    if cfg.crepa.enabled:
        from lowvram.method.modes.crepa import Crepa, check_crepa

        check_crepa(cfg, len(transformer.transformer_blocks))
        c = cfg.crepa
        modes.append(Crepa(transformer, block_index=c.block_index, weight=c.weight,
                           adjacent_distance=c.adjacent_distance, temporal_decay=c.temporal_decay))  # fmt: skip
    return tuple(modes)
