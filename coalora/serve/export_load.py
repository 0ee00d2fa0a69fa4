"""Loading an export folder, after :func:`~coalora.serve.export_verify.verify_export` and a check
of every tensor's shape, dtype and size against ``quantization.json``.

:func:`load_export` rebuilds the served model from the folder alone;
``peft.PeftModel.from_pretrained(load_dequantized_base(folder), folder)`` gives the same
logits through peft.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from coalora.io import read_json
from coalora.quant.options import option_from_dict, packed_layout, packed_tensor
from coalora.serve.export_format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_NAME,
    BACKBONE_NAME,
    PEFT_PREFIX,
    QUANTIZATION_NAME,
)
from coalora.serve.export_verify import verify_export
from coalora.serve.packed import PackedLoRALinear


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside hold their parameters on the meta device: no memory and no random
    initialisation, until real tensors are assigned. Buffers (rotary tables, position ids) are
    built as usual, since checkpoints need not hold them."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(folder: Path, architecture: str) -> nn.Module:
    """The export's architecture with every parameter on the meta device (filled by
    ``load_state_dict(..., assign=True)`` in the stored dtypes)."""
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, architecture, None)
    if config.architectures != [architecture] or not (
        isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    ):
        raise ValueError(
            f"export {folder}: config.json names the architectures {config.architectures}, "
            f"{QUANTIZATION_NAME} {architecture!r}; export it again"
        )
    with parameters_on_meta():
        return cls(config)


def _read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(folder / name)
    except Exception as err:  # safetensors' own error types: a malformed header or data
        raise ValueError(
            f"export {folder}: {name} is not a readable safetensors file ({err})"
        ) from None


class _Tensors:
    """Takes the tensors of one safetensors file of an export, each checked against the shape
    (and dtype) that ``quantization.json`` or ``adapter_config.json`` gives it."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.tensors = _read_safetensors(folder, name)

    def take(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None, source: str
    ) -> torch.Tensor:
        """The tensor ``key``, removed from the file's remaining tensors; ``dtype`` None
        accepts any floating-point dtype."""
        tensor = self.tensors.pop(key, None)
        if tensor is None:
            raise ValueError(
                f"export {self.folder}: {self.name} lacks {key}, which {source} needs; "
                "export it again"
            )
        right_dtype = tensor.is_floating_point() if dtype is None else tensor.dtype == dtype
        if tuple(tensor.shape) != shape or not right_dtype:
            wanted = "floating point" if dtype is None else str(dtype).removeprefix("torch.")
            raise ValueError(
                f"export {self.folder}: {key} in {self.name} is {tuple(tensor.shape)} "
                f"{str(tensor.dtype).removeprefix('torch.')}, but {source} needs {shape} "
                f"{wanted}; the export is inconsistent: export it again"
            )
        return tensor


def _lora_settings(folder: Path) -> tuple[int, float]:
    """Rank and alpha of ``adapter_config.json``."""
    adapter_config = read_json(folder / ADAPTER_CONFIG_NAME)
    rank = adapter_config.get("r") if isinstance(adapter_config, dict) else None
    alpha = adapter_config.get("lora_alpha") if isinstance(adapter_config, dict) else None
    if (
        type(rank) is not int
        or rank < 1
        or isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
    ):
        raise ValueError(
            f"export {folder}: {ADAPTER_CONFIG_NAME} needs a positive integer r and a finite "
            f"lora_alpha, got r={rank!r}, lora_alpha={alpha!r}; export it again"
        )
    return rank, float(alpha)


def _restore(folder: Path, packed: bool) -> nn.Module:
    summary = verify_export(folder)
    model = _skeleton(folder, summary["architecture"])
    rank, alpha = _lora_settings(folder)
    backbone = _Tensors(folder, BACKBONE_NAME)
    adapter = _Tensors(folder, ADAPTER_NAME) if packed else None
    for name, spec in summary["matrices"].items():
        config, (rows, cols) = option_from_dict(spec["config"]), spec["shape"]
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear) or tuple(target.weight.shape) != (rows, cols):
            raise ValueError(
                f"export {folder}: {QUANTIZATION_NAME} describes {name} as a {rows}×{cols} "
                f"matrix, which {summary['architecture']} has no linear layer of; export it again"
            )
        source = f"its configuration {config} for a {rows}×{cols} matrix in {QUANTIZATION_NAME}"
        layout = packed_layout((rows, cols), config)
        tensors = {
            field: backbone.take(f"{name}.{field}", *layout[field], source) for field in layout
        }
        weight = packed_tensor(config, (rows, cols), getattr(torch, spec["dtype"]), tensors)
        bias = (
            None
            if target.bias is None
            else backbone.take(f"{name}.bias", (rows,), None, f"the {name} layer")
        )
        if adapter is not None:
            lora = f"a rank-{rank} LoRA of a {rows}×{cols} matrix ({ADAPTER_CONFIG_NAME})"
            a = adapter.take(f"{PEFT_PREFIX}{name}.lora_A.weight", (rank, cols), None, lora)
            b = adapter.take(f"{PEFT_PREFIX}{name}.lora_B.weight", (rows, rank), None, lora)
            layer: nn.Module = PackedLoRALinear(weight, bias, a, b, alpha / rank)
        else:
            layer = nn.Linear(cols, rows, bias=bias is not None)
            layer.weight.data = weight.dequantize()
            if bias is not None:
                layer.bias.data = bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    try:
        result = model.load_state_dict(backbone.tensors, strict=False, assign=True)
        for key, source in summary["tied"].items():  # one parameter again, as in training
            *parent, child = key.split(".")
            setattr(model.get_submodule(".".join(parent)), child, model.get_parameter(source))
    except (RuntimeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[-1].strip()
        raise ValueError(
            f"export {folder}: {BACKBONE_NAME} does not fit {summary['architecture']} ({reason})"
        ) from None
    targets = tuple(f"{name}." for name in summary["matrices"])
    tied = set(summary["tied"])
    missing = [k for k in result.missing_keys if not k.startswith(targets) and k not in tied]
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing or result.unexpected_keys or on_meta:
        raise ValueError(
            f"{folder / BACKBONE_NAME} does not fit {summary['architecture']}: missing "
            f"{(missing or on_meta)[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model.requires_grad_(False).eval()


def load_export(folder: str | Path) -> nn.Module:
    """The served model of an export folder: packed target matrices with their adapters."""
    return _restore(Path(folder), packed=True)


def load_dequantized_base(folder: str | Path) -> nn.Module:
    """The export's backbone with dense dequantized target matrices and no adapters: the base
    for ``peft.PeftModel.from_pretrained(base, folder)``."""
    return _restore(Path(folder), packed=False)
