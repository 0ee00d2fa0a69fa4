"""Quantization options of every format behind one interface.

An option is a :class:`QuantConfig` (``nf``, ``int``: coalora's own double-quantized codes) or
a :class:`GGMLConfig` (``gguf``: a llama.cpp tensor type). Both have ``fmt``,
``bits_per_param``, ``FIELD_CHOICES``/``field_values()``, ``fits(shape)``, ``to_dict()``; the
functions here quantize with either, and describe and rebuild the packed tensors either gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from coalora.quant.config import QuantConfig, config_space
from coalora.quant.ggml_tensor import GGMLConfig, GGMLTensor, gguf_space, quantize_to_ggml
from coalora.quant.tensor import (
    PACKED_FIELDS,
    TORCH_SCALE_DTYPES,
    QuantizedTensor,
)
from coalora.quant.tensor import packed_nbytes as double_quantized_nbytes
from coalora.quant.tensor import quantize as double_quantize_weight

Option = QuantConfig | GGMLConfig
PackedTensor = QuantizedTensor | GGMLTensor
FORMATS: tuple[str, ...] = ("nf", "int", "gguf")


def check_format(fmt: object) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not supported; choose one of {FORMATS}")
    return fmt


def option_space(fmt: str) -> list[Option]:
    """The options of a format, in a fixed order (``config_space`` or ``gguf_space``)."""
    return gguf_space() if check_format(fmt) == "gguf" else list(config_space(fmt))


def option_from_dict(d: Mapping[str, Any]) -> Option:
    """The option ``to_dict()`` wrote."""
    if d.get("fmt") == "gguf":
        return GGMLConfig(d["type_name"])
    return QuantConfig(**d)


def quantize(w: torch.Tensor, option: Option) -> PackedTensor:
    """Quantize ``w`` with ``option``; the result's ``.dequantize()`` is what training uses."""
    if isinstance(option, GGMLConfig):
        return quantize_to_ggml(w, option)
    return double_quantize_weight(w, option)


def packed_nbytes(numel: int, option: Option) -> int:
    """Bytes :func:`quantize` stores for ``numel`` weights (of a shape the option fits)."""
    if isinstance(option, GGMLConfig):
        return option.packed_nbytes(numel)
    return double_quantized_nbytes(numel, option)


def packed_fields(option: Option) -> tuple[str, ...]:
    """Names of the tensors a packed weight of ``option`` holds, in field order."""
    return GGMLTensor.FIELDS if isinstance(option, GGMLConfig) else PACKED_FIELDS


def packed_layout(
    shape: Sequence[int], option: Option
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each packed tensor :func:`quantize` stores for a weight of ``shape``;
    their bytes add up to :func:`packed_nbytes`."""
    numel = int(torch.Size(shape).numel())
    if isinstance(option, GGMLConfig):
        return {"data": ((shape[0], option.packed_nbytes(numel) // shape[0]), torch.uint8)}
    blocks = -(-numel // option.block_size)
    groups = -(-blocks // option.scale_block_size)
    return {
        "codes": ((blocks * option.block_size * option.bits // 8,), torch.uint8),
        "scale_codes": ((groups * option.scale_block_size * option.scale_bits // 8,), torch.uint8),
        "second_scales": ((groups,), TORCH_SCALE_DTYPES[option.scale_dtype]),
        "offset": ((), torch.float32),
    }


def packed_tensor(
    option: Option, shape: torch.Size, dtype: torch.dtype, fields: Mapping[str, torch.Tensor]
) -> PackedTensor:
    """The packed weight of ``option`` made of its tensors ``fields`` (by :func:`packed_fields`)."""
    values = [fields[name] for name in packed_fields(option)]
    kind = GGMLTensor if isinstance(option, GGMLConfig) else QuantizedTensor
    return kind(option, torch.Size(shape), dtype, *values)


def tensor_fields(tensor: PackedTensor) -> dict[str, torch.Tensor]:
    """The tensors a packed weight holds, by name."""
    return {name: getattr(tensor, name) for name in packed_fields(tensor.config)}


def usable_options(options: Sequence[Option], shapes: Sequence[Sequence[int]]) -> list[list[bool]]:
    """``[matrix][option]``: whether each option can store each matrix (``option.fits``)."""
    return [[o.fits(tuple(s)) for o in options] for s in shapes]
