"""The planner's per-precision byte math equals what each backend really allocates; backends round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from lowvram.quant import Precision, allocated_bytes, get_backend, quantized_linear_bytes, quantized_weight_bytes

QUANTIZED = [p for p in Precision if p.quantized]
ROW_WISE = [p for p in QUANTIZED if get_backend(p).row_wise]


def _linear(out_features: int, in_features: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype).requires_grad_(False)


@pytest.mark.parametrize("precision", QUANTIZED, ids=lambda p: p.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("out_features", "in_features", "bias"), [(96, 128, True), (40, 72, False), (300, 64, True)])
def test_planner_bytes_equal_what_the_backend_allocates(precision, dtype, out_features, in_features, bias):
    module = get_backend(precision).quantize(_linear(out_features, in_features, dtype, bias))
    predicted = quantized_linear_bytes(in_features, out_features, bias=bias, dtype=dtype, precision=precision)
    assert allocated_bytes(module) == predicted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unquantized_bytes_are_numel_times_itemsize(dtype):
    linear = _linear(24, 40, dtype, bias=False)
    assert quantized_weight_bytes((24, 40), dtype, "bf16") == allocated_bytes(linear)


def test_quantized_weights_are_smaller_in_the_expected_order():
    shape = (4096, 4096)
    bf16 = quantized_weight_bytes(shape, torch.bfloat16, "bf16")
    int8 = quantized_weight_bytes(shape, torch.bfloat16, "int8-quanto")
    nf4 = quantized_weight_bytes(shape, torch.bfloat16, "nf4-bnb")
    assert 0.50 < int8 / bf16 < 0.51
    assert 0.25 < nf4 / bf16 < 0.27  # 4 bits + double-quantized absmax per 64 weights


@pytest.mark.parametrize("precision", ROW_WISE, ids=lambda p: p.value)
def test_row_sliced_quantization_is_bit_identical_to_whole(precision):
    backend = get_backend(precision)
    linear = _linear(70, 64, torch.bfloat16)
    whole = backend.quantize(linear, chunk_bytes=2**30)
    sliced = backend.quantize(linear, chunk_bytes=64 * 2 * 9)  # 9 rows per slice, last slice shorter
    parts_whole, _ = backend.export(whole)
    parts_sliced, _ = backend.export(sliced)
    assert parts_whole.keys() == parts_sliced.keys()
    for name in parts_whole:
        assert torch.equal(parts_whole[name].view(torch.uint8), parts_sliced[name].view(torch.uint8)), name


@pytest.mark.parametrize("precision", QUANTIZED, ids=lambda p: p.value)
def test_rebuild_from_export_gives_the_same_layer(precision):
    backend = get_backend(precision)
    linear = _linear(48, 64, torch.float32)
    quantized = backend.quantize(linear)
    parts, meta = backend.export(quantized)
    rebuilt = backend.rebuild(parts, meta, in_features=64, out_features=48, bias=linear.bias, dtype=torch.float32)
    x = torch.randn(3, 64)
    assert backend.owns(quantized) and backend.owns(rebuilt) and not backend.owns(linear)
    assert torch.equal(rebuilt(x), quantized(x))
    assert all(not p.requires_grad for p in quantized.parameters())


@pytest.mark.parametrize(
    ("precision", "tolerance"),
    [("int8-quanto", 0.01), ("int8-torchao", 0.01), ("fp8-torchao", 0.05), ("nf4-bnb", 0.15)],
)
def test_quantized_layer_error_is_within_the_precision_budget(precision, tolerance):
    linear = _linear(64, 256, torch.float32)
    x = torch.randn(8, 256)
    reference = linear(x)
    error = (get_backend(precision).quantize(linear)(x) - reference).norm() / reference.norm()
    assert 0 < error < tolerance
