"""Quantization: configurations, codebooks, packed quantized tensors, error tables, allocation."""

from coalora.quant.allocation import achievable_range, allocate_budget, average_bits
from coalora.quant.codebook import codebook, int_codebook, nf_codebook
from coalora.quant.config import QuantConfig, config_space
from coalora.quant.errors import ErrorTable, cached_error_table, diagonal_fisher, error_table
from coalora.quant.tensor import QuantizedTensor, quantize

__all__ = [
    "ErrorTable",
    "QuantConfig",
    "QuantizedTensor",
    "achievable_range",
    "allocate_budget",
    "average_bits",
    "cached_error_table",
    "codebook",
    "config_space",
    "diagonal_fisher",
    "error_table",
    "int_codebook",
    "nf_codebook",
    "quantize",
]
