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


def build_modes(cfg) -> tuple[TrainingMode, ...]:
    """The modes `cfg` enables, in the order they apply."""
    modes: list[TrainingMode] = []
    ss = cfg.scheduled_sampling
    if ss.enabled:
        from lowvram.method.modes.scheduled_sampling import ScheduledSampling

        modes.append(ScheduledSampling(probability=ss.probability, steps=ss.steps, sigma_step=ss.sigma_step))
    return tuple(modes)
