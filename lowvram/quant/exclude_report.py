"""Measure what the exclude lists buy: output error of the tiny LTX-2 transformer and Gemma3 per precision.

`python -m lowvram.quant.exclude_report [--seeds 4]` prints relative output error vs fp32 with every Linear quantized
and with the exclude list applied. Tiny random-init models: the numbers show direction, not the real model's error.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from lowvram.quant.backends import quantize_model
from lowvram.quant.exclude import GEMMA3_EXCLUDE, LTX2_TRANSFORMER_EXCLUDE, quantizable_names
from lowvram.quant.precision import Precision
from lowvram.quant.tiny import (
    relative_error,
    run_transformer,
    text_encoder_hidden_states,
    tiny_text_encoder,
    tiny_transformer,
    transformer_inputs,
)

QUANTIZED = [p for p in Precision if p.quantized]


@torch.no_grad()
def transformer_errors(precision: Precision, seeds: int) -> tuple[float, float]:
    """Median relative error of the tiny transformer's output: (all Linears quantized, exclude list applied)."""
    errors: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(seeds):
        reference = tiny_transformer(seed)
        inputs = transformer_inputs(seed)
        expected = run_transformer(reference, inputs)
        for use_exclude in (False, True):
            model = copy.deepcopy(reference)
            quantize_model(model, precision, LTX2_TRANSFORMER_EXCLUDE if use_exclude else ())
            errors[use_exclude].append(relative_error(run_transformer(model, inputs), expected))
    return statistics.median(errors[False]), statistics.median(errors[True])


@torch.no_grad()
def text_encoder_errors(precision: Precision, seeds: int) -> tuple[float, float]:
    errors: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(seeds):
        reference = tiny_text_encoder(seed)
        expected = text_encoder_hidden_states(reference, seed)
        for use_exclude in (False, True):
            model = copy.deepcopy(reference)
            # Without the list, every plain Linear is quantized except lm_head (tied to the embedding).
            quantize_model(model, precision, GEMMA3_EXCLUDE if use_exclude else ("lm_head",))
            errors[use_exclude].append(relative_error(text_encoder_hidden_states(model, seed), expected))
    return statistics.median(errors[False]), statistics.median(errors[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    transformer = tiny_transformer(0)
    n_all = len(quantizable_names(transformer))
    n_kept = len(quantizable_names(transformer, LTX2_TRANSFORMER_EXCLUDE))
    print(f"tiny LTX-2 transformer: {n_all} Linears, {n_kept} quantized with the exclude list; median of {args.seeds}")
    print(f"{'precision':14s} {'all_linears':>12s} {'with_exclude':>13s}   (relative output error vs fp32)")
    for p in QUANTIZED:
        all_err, excl_err = transformer_errors(p, args.seeds)
        print(f"{p.value:14s} {all_err:12.4f} {excl_err:13.4f}")
    print("tiny Gemma3 (stacked hidden states)")
    for p in QUANTIZED:
        all_err, excl_err = text_encoder_errors(p, args.seeds)
        print(f"{p.value:14s} {all_err:12.4f} {excl_err:13.4f}")


if __name__ == "__main__":
    main()
