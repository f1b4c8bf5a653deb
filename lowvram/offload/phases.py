"""Startup phasing (`offload_during_startup`): load a component, use it, free it, and only then load the next.

Text encoder -> captions encoded and cached -> freed; VAE -> latents cached -> freed; then the transformer. The run's
device peak is the largest phase instead of the sum, and each phase's peak is measured and reported. It does not know
what the phases do: the caller passes loaders and users.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowvram.device import Backend


@dataclass(frozen=True)
class Phase:
    name: str  # e.g. "text_cache"
    load: Callable[[], nn.Module]  # builds or reads the component (host side)
    use: Callable[[nn.Module], Any]  # runs it on the device; its result must not hold device tensors it needs freed


@dataclass(frozen=True)
class PhaseResult:
    name: str
    peak_device_bytes: int
    result: Any


def offload_during_startup(
    phases: Sequence[Phase], backend: Backend, *, monitor: Any | None = None, phased: bool = True
) -> list[PhaseResult]:
    """Run `phases` one after another; with `phased`, each component leaves the device before the next arrives.

    `monitor` (a `lowvram.telemetry.MemoryMonitor`) records each phase's peaks under the phase's name. With
    `phased=False` every component is loaded first and freed only at the end (the unphased baseline).
    """
    results: list[PhaseResult] = []
    kept: list[nn.Module] = []
    for phase in phases:
        backend.reset_peak_memory_stats()
        context = monitor.phase(phase.name) if monitor is not None else contextlib.nullcontext()
        with context:
            module = phase.load()
            backend.place_module(module)
            result = phase.use(module)
            peak = backend.memory_stats().max_allocated_bytes
        if phased:
            del module
            gc.collect()
            backend.empty_cache()
        else:
            kept.append(module)
        results.append(PhaseResult(name=phase.name, peak_device_bytes=peak, result=result))
    kept.clear()
    gc.collect()
    backend.empty_cache()
    return results
