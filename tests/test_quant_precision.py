"""Precision names (ours and SimpleTuner's) and the refusal of what a machine cannot run, before any weight is read."""

from __future__ import annotations

import pytest

from lowvram.errors import LowvramError, UsageError
from lowvram.profiles import HardwareProfile, Supports
from lowvram.quant import Precision, check_backend_supported, load_quantized, parse_precision


def _profile(**supports) -> HardwareProfile:
    flags = dict(bf16=True, fp8=False, bitsandbytes=False, flash_attention=True, streams=True) | supports
    return HardwareProfile(
        name="test-gpu",
        vendor="nvidia",
        vram_bytes=24 * 2**30,
        reserve_bytes=2**30,
        bf16_tflops=70.0,
        memory_bandwidth_gbps=900.0,
        h2d_pinned_gbps=24.0,
        h2d_pageable_gbps=10.0,
        host_ram_bytes=64 * 2**30,
        supports=Supports(**flags),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no_change", Precision.BF16),
        ("bf16", Precision.BF16),
        ("fp32", Precision.FP32),
        ("int8-quanto", Precision.INT8_QUANTO),
        ("INT8-TorchAO", Precision.INT8_TORCHAO),
        ("nf4-bnb", Precision.NF4_BNB),
        ("fp8-torchao", Precision.FP8_TORCHAO),
        ("fp8-quanto", Precision.FP8_TORCHAO),
    ],
)
def test_parse_precision_accepts_our_and_simpletuner_names(name, expected):
    assert parse_precision(name) is expected


def test_precision_names_agree_with_config():
    from lowvram import config

    assert set(config.PRECISIONS) == {p.value for p in Precision}
    for alias, target in config.PRECISION_ALIASES.items():
        assert parse_precision(alias).value == target


def test_unknown_precision_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        parse_precision("int8_quant")
    assert "\n" not in str(err.value) and "valid:" in str(err.value)


def test_fp8_is_refused_on_a_profile_without_fp8():
    with pytest.raises(LowvramError) as err:
        check_backend_supported("fp8-torchao", _profile(fp8=False))
    message = str(err.value)
    assert "\n" not in message and "fp8" in message and "test-gpu" in message
    assert check_backend_supported("fp8-torchao", _profile(fp8=True)) is Precision.FP8_TORCHAO


def test_nf4_is_refused_without_bitsandbytes_support():
    with pytest.raises(LowvramError, match="bitsandbytes"):
        check_backend_supported("nf4-bnb", _profile(bitsandbytes=False))
    assert check_backend_supported("nf4-bnb", _profile(bitsandbytes=True)) is Precision.NF4_BNB


@pytest.mark.parametrize("name", ["bf16", "fp32", "int8-quanto", "int8-torchao"])
def test_int8_and_unquantized_run_on_any_profile(name):
    assert check_backend_supported(name, _profile()) is parse_precision(name)


def test_refusal_comes_before_the_checkpoint_is_opened(tmp_path):
    missing = tmp_path / "does-not-exist.safetensors"
    with pytest.raises(LowvramError, match="fp8"):
        load_quantized(None, missing, "fp8-torchao", profile=_profile(fp8=False))
