"""peft LoRA on each quantized tiny LTX-2 transformer: LoRA gradients track the unquantized model, base gets none.

Tolerances (relative norm error of all LoRA gradients together vs the fp32 model with the same adapters), 3-4x
what was measured on this tiny model: int8 0.005-0.006, fp8 0.034, nf4 0.155.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowvram.quant import LTX2_TRANSFORMER_EXCLUDE, get_backend, prepare_for_peft, quantize_model
from lowvram.quant.tiny import relative_error, run_transformer, tiny_transformer, transformer_inputs

GRAD_TOLERANCE = {"int8-quanto": 0.025, "int8-torchao": 0.025, "fp8-torchao": 0.12, "nf4-bnb": 0.5}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _with_lora(model):
    from peft import LoraConfig, inject_adapter_in_model

    prepare_for_peft(model)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)  # B != 0: A gets grads
    return inject_adapter_in_model(config, model)


def _lora_grads(model, inputs) -> dict[str, torch.Tensor]:
    out = run_transformer(model, inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def reference():
    """The fp32 tiny transformer with LoRA, its inputs, and its LoRA gradients."""
    base = tiny_transformer(0).requires_grad_(False)
    inputs = transformer_inputs(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        lora = _with_lora(copy.deepcopy(base))
    return base, lora, inputs, _lora_grads(lora, inputs)


def _quantized_with_same_lora(reference, precision):
    base, lora, _, _ = reference
    model = copy.deepcopy(base)
    quantized = quantize_model(model, precision, LTX2_TRANSFORMER_EXCLUDE)
    model = _with_lora(model)
    adapters = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return model, quantized


@pytest.mark.parametrize("precision", list(GRAD_TOLERANCE))
def test_lora_grads_on_quantized_model_match_unquantized(reference, precision):
    _, _, inputs, expected = reference
    model, quantized = _quantized_with_same_lora(reference, precision)
    backend = get_backend(precision)
    attention = [n for n in quantized if n.endswith(".to_q")]
    assert attention and all(backend.owns(model.get_submodule(n).base_layer) for n in attention)
    grads = _lora_grads(model, inputs)
    assert grads.keys() == expected.keys() and len(grads) > 0
    flat = torch.cat([grads[k].flatten() for k in sorted(grads)])
    flat_expected = torch.cat([expected[k].flatten() for k in sorted(expected)])
    assert 0 < relative_error(flat, flat_expected) < GRAD_TOLERANCE[precision]


@pytest.mark.parametrize("precision", list(GRAD_TOLERANCE))
def test_no_gradient_reaches_quantized_base_weights(reference, precision):
    _, _, inputs, _ = reference
    model, _ = _quantized_with_same_lora(reference, precision)
    _lora_grads(model, inputs)
    base_params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    assert base_params
    assert not [n for n, p in base_params if p.requires_grad or p.grad is not None]


def test_lora_grads_without_quantization_are_identical(reference):
    base, lora, inputs, expected = reference
    model, _ = _quantized_with_same_lora(reference, "fp32")
    grads = _lora_grads(model, inputs)
    assert all(torch.equal(grads[k], expected[k]) for k in expected)
