"""Quantization: configurations, codebooks, packed quantized tensors, error tables, allocation."""

from coalora.quant.allocation import allocate_budget
from coalora.quant.codebook import codebook, int_codebook, nf_codebook
from coalora.quant.config import QuantConfig, config_space
from coalora.quant.error_tables import ErrorTable, cached_error_table, error_table
from coalora.quant.fisher import diagonal_fisher
from coalora.quant.ggml_tensor import GGMLConfig, GGMLTensor
from coalora.quant.options import Option, PackedTensor, option_space, quantize
from coalora.quant.space import Choice, ConfigSpace, config_id, config_set_id
from coalora.quant.tensor import QuantizedTensor

__all__ = [
    "Choice",
    "ConfigSpace",
    "ErrorTable",
    "GGMLConfig",
    "GGMLTensor",
    "Option",
    "PackedTensor",
    "QuantConfig",
    "QuantizedTensor",
    "allocate_budget",
    "cached_error_table",
    "codebook",
    "config_id",
    "config_set_id",
    "config_space",
    "diagonal_fisher",
    "error_table",
    "int_codebook",
    "nf_codebook",
    "option_space",
    "quantize",
]
