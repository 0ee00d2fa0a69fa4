"""GGML (llama.cpp) quantization in torch: a weight's exact GGUF bytes, and the weights they hold.

``quantize_ggml`` writes what llama.cpp's reference quantizers (ggml-quants.c, as
``ggml_quantize_chunk`` runs them without an importance matrix) store; ``dequantize_ggml`` gives
exactly what ``gguf.quants.dequantize`` gives for those bytes. Both are vectorized over blocks,
run on the input's device and compute in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from coalora.quant import ggml_kquants, ggml_legacy
from coalora.quant.ggml_types import GGMLType, ggml_type

_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": ggml_kquants.quantize_q2_k,
    "Q3_K": ggml_kquants.quantize_q3_k,
    "Q4_K": ggml_kquants.quantize_q4_k,
    "Q5_K": ggml_kquants.quantize_q5_k,
    "Q6_K": ggml_kquants.quantize_q6_k,
    "Q4_0": ggml_legacy.quantize_q4_0,
    "Q5_0": ggml_legacy.quantize_q5_0,
    "Q8_0": ggml_legacy.quantize_q8_0,
}

_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": ggml_kquants.dequantize_q2_k,
    "Q3_K": ggml_kquants.dequantize_q3_k,
    "Q4_K": ggml_kquants.dequantize_q4_k,
    "Q5_K": ggml_kquants.dequantize_q5_k,
    "Q6_K": ggml_kquants.dequantize_q6_k,
    "Q4_0": ggml_legacy.dequantize_q4_0,
    "Q5_0": ggml_legacy.dequantize_q5_0,
    "Q8_0": ggml_legacy.dequantize_q8_0,
}


def _row_bytes(shape: Sequence[int], kind: GGMLType) -> int:
    """Bytes per row of a 2-D ``shape`` stored as ``kind``; raises if the shape does not fit."""
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (rows, row length) weight, got shape {tuple(shape)}")
    length = shape[1]
    if length <= 0 or length % kind.weights_per_block:
        raise ValueError(
            f"row length {length} is not a positive multiple of the {kind.name} block size "
            f"{kind.weights_per_block}"
        )
    return length // kind.weights_per_block * kind.bytes_per_block


def quantize_ggml(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """The bytes llama.cpp stores for the weight ``w`` as GGML type ``type_name``.

    Args:
        w: finite floating weight ``(rows, n)``, ``n`` a multiple of the type's block size.
        type_name: a name from ``GGML_TYPES``, e.g. ``"Q4_K"``.

    Returns:
        uint8 ``(rows, n / weights_per_block * bytes_per_block)``: each row its GGUF blocks.
    """
    kind = ggml_type(type_name)
    row_bytes = _row_bytes(w.shape, kind)
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    w = w.detach().float()
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise ValueError(
            f"w has {bad} non-finite values (NaN or inf); GGML types need finite weights"
        )
    blocks = _QUANTIZERS[kind.name](w.reshape(-1, kind.weights_per_block))
    return blocks.reshape(w.shape[0], row_bytes)


def dequantize_ggml(
    data: torch.Tensor,
    type_name: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weights that the GGML bytes ``data`` hold, as ``gguf.quants.dequantize`` computes them.

    Args:
        data: uint8 ``(rows, row_bytes)`` as :func:`quantize_ggml` returns or a GGUF file stores.
        type_name: a name from ``GGML_TYPES``.
        shape: the weight's shape ``(rows, n)``.
        dtype: the returned dtype; the arithmetic is fp32 either way.
    """
    kind = ggml_type(type_name)
    row_bytes = _row_bytes(shape, kind)
    expected = (shape[0], row_bytes)
    if data.dtype != torch.uint8:
        raise TypeError(f"data must be uint8 bytes, got dtype {data.dtype}")
    if tuple(data.shape) != expected:
        raise ValueError(
            f"a {kind.name} weight of shape {tuple(shape)} takes bytes of shape {expected}, "
            f"got {tuple(data.shape)}"
        )
    values = _DEQUANTIZERS[kind.name](data.reshape(-1, kind.bytes_per_block))
    return values.reshape(tuple(shape)).to(dtype)
