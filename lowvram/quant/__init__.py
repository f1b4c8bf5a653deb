"""Quantized base weights: precisions, backends (quanto, torchao, bitsandbytes), streaming load, quantized cache.

Importing this package imports no quantization library; each backend imports its own on first use.
"""

from lowvram.quant.backends import get_backend, prepare_for_peft, quantize_model
from lowvram.quant.exclude import EXCLUDES, GEMMA3_EXCLUDE, LTX2_TRANSFORMER_EXCLUDE, is_quantizable, quantizable_names
from lowvram.quant.layout import (
    allocated_bytes,
    predicted_module_bytes,
    quantized_linear_bytes,
    quantized_weight_bytes,
)
from lowvram.quant.precision import NEEDS, Precision, check_backend_supported, parse_precision
from lowvram.quant.stream import LoadResult, SafetensorsSource, build_empty, load_quantized

__all__ = [
    "EXCLUDES",
    "GEMMA3_EXCLUDE",
    "LTX2_TRANSFORMER_EXCLUDE",
    "NEEDS",
    "LoadResult",
    "Precision",
    "SafetensorsSource",
    "allocated_bytes",
    "build_empty",
    "check_backend_supported",
    "get_backend",
    "is_quantizable",
    "load_quantized",
    "parse_precision",
    "predicted_module_bytes",
    "prepare_for_peft",
    "quantizable_names",
    "quantize_model",
    "quantized_linear_bytes",
    "quantized_weight_bytes",
]
