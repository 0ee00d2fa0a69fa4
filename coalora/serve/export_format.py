"""The export folder's format: file names, contents, and writing a folder from plain data.

Layout of an export folder:

- ``quantized_model.safetensors``: every weight of the model except the adapters; each target
  matrix as its packed ``<name>.codes``, ``.scale_codes``, ``.second_scales`` and ``.offset``
  (``nf``, ``int``) or ``<name>.data``, its GGUF bytes (``gguf``);
- ``quantization.json``: per target matrix its option, its settings, shape, dtype and
  bytes, plus the model-wide summary (format, average bits, budget, configuration id);
- ``config.json`` and the tokenizer files (transformers' own format);
- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's LoRA format, θ's adjustment
  folded in (B' = B (I + U)) and the trained task head as ``modules_to_save``;
- ``README.md``: a model card; ``manifest.json``: size and sha256 of every other file.

While it is written, an export is a hidden temporary folder beside its destination holding
:data:`PARTIAL_MARKER` (see :mod:`coalora.serve.export_target`). Reading an export back:
:mod:`coalora.serve.export_verify` and :mod:`coalora.serve.export_load`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from coalora.io import atomic_directory, atomic_write_text
from coalora.serve.packed import PackedLoRALinear

BACKBONE_NAME = "quantized_model.safetensors"
QUANTIZATION_NAME = "quantization.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "manifest.json"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
TASK_FIELDS = ("text_fields", "label_names", "text_columns", "label_column", "label_values")
"""What :mod:`coalora.predict` needs to read a task's files and name its labels."""
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM"}
"""peft task type by the suffix of the transformers architecture name."""
PARTIAL_MARKER = ".coalora-partial-export"
"""A file only an export's temporary folder holds: the writing process's id and host."""
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a quantized matrix is restored to."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_type(architecture: str) -> str | None:
    return next((t for suffix, t in TASK_TYPES.items() if architecture.endswith(suffix)), None)


def backbone_tensors(
    state: Mapping[str, torch.Tensor], adapters: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The backbone file's tensors of a served model's ``state_dict``, without the ``adapters``
    keys, each tied weight stored once; and the ties (``key → the key it is stored under``)."""
    backbone, stored, tied = {}, {}, {}
    for key, tensor in state.items():
        if key in adapters:
            continue
        if tensor.numel() and tensor.data_ptr() in stored:
            tied[key] = stored[tensor.data_ptr()]
            continue
        stored[tensor.data_ptr()] = key
        backbone[key] = tensor.contiguous()
    return backbone, tied


def adapter_tensors(
    layers: Mapping[str, PackedLoRALinear], heads: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """peft's adapter file: ``lora_A``/``lora_B`` of every packed layer and the weights of
    every task-head module (``modules_to_save``), by module name."""
    adapter = {}
    for name, layer in layers.items():
        adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.contiguous()
        adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.contiguous()
    for head, state in heads.items():
        for key, tensor in state.items():
            adapter[f"{PEFT_PREFIX}{head}.{key}"] = tensor.contiguous()
    return adapter


def served_lora_settings(layers: Mapping[str, PackedLoRALinear]) -> tuple[int, float]:
    """Rank and alpha of the served adapters as plain LoRA: the run's rank, plus the residual
    rank when each option carries its correction, and the alpha that keeps the run's scale."""
    settings = {(len(layer.lora_A), layer.scale) for layer in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"the served layers differ in (rank, scale): {sorted(settings)}")
    ((rank, scale),) = settings
    return rank, scale * rank


def peft_adapter_config(
    architecture: str,
    run_config: Mapping[str, Any],
    targets: Sequence[str],
    heads: Sequence[str],
    lora: tuple[int, float],
) -> dict[str, Any]:
    """``adapter_config.json``: a plain peft LoRA of rank and alpha ``lora``
    (:func:`served_lora_settings`) on ``targets``."""
    rank, alpha = lora
    return {
        "peft_type": "LORA",
        "task_type": task_type(architecture),
        "base_model_name_or_path": run_config["model"]["name_or_path"],
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "modules_to_save": list(heads) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }


def matrix_description(option: int, layer: PackedLoRALinear) -> dict[str, Any]:
    """The ``quantization.json`` entry of one packed target matrix."""
    return {
        "option": option,
        "config": layer.config.to_dict(),
        "shape": list(layer.weight_shape),
        "dtype": str(layer.weight_dtype).removeprefix("torch."),
        "bits_per_param": layer.config.bits_per_param,
        "nbytes": layer.quantized.nbytes,
    }


def export_description(
    architecture: str,
    run_config: Mapping[str, Any],
    request: Mapping[str, Any],
    info: Mapping[str, Any],
    fp32_bytes: int,
    tied: Mapping[str, str],
    measured: list[dict[str, Any]],
    layers: Mapping[str, PackedLoRALinear],
    choice: Sequence[int],
) -> dict[str, Any]:
    """``quantization.json`` without ``export_bytes`` (which :func:`write_export` adds).

    Args:
        architecture: the transformers class of the served model.
        run_config: the run's resolved configuration (``model``, ``quant``, ``method``, ...).
        request: the ``bits``, ``memory_mb`` and ``config`` asked for.
        info: ``config_id``, ``avg_bits`` and ``served_bytes`` of the configuration.
        fp32_bytes: bytes of the same weights in fp32.
        tied: tied weight names (see :func:`backbone_tensors`).
        measured: the run's evaluation rows of this configuration.
        layers: the packed target layers by name, in target order.
        choice: the option of each target matrix.
    """
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "base_model": run_config["model"]["name_or_path"],
        "model_name": run_config["model"]["name"],
        "task": run_config["task"]["name"],
        "method": run_config["method"]["name"],
        "fmt": run_config["quant"]["fmt"],
        "request": dict(request),
        **info,
        "packed_bytes": sum(layer.quantized.nbytes for layer in layers.values()),
        "fp32_bytes": fp32_bytes,
        "task_spec": {k: v for k, v in run_config["task"].items() if k in TASK_FIELDS},
        "max_length": run_config["data"]["max_length"],
        "choice": list(choice),
        "tied": dict(tied),
        "measured": measured,
        "matrices": {
            name: matrix_description(option, layer)
            for (name, layer), option in zip(layers.items(), choice, strict=True)
        },
    }


def write_export(
    out: Path,
    backbone: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    description: dict[str, Any],
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    overwrite: bool = False,
) -> Path:
    """Write an export folder at ``out`` through a temporary folder marked as partial; its
    ``quantization.json`` is ``description`` plus ``export_bytes``. The caller checks ``out``
    first (:func:`coalora.serve.export_target.prepare_export_target`)."""
    with atomic_directory(out, overwrite) as tmp:
        marker = tmp / PARTIAL_MARKER
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        save_file(backbone, tmp / BACKBONE_NAME, metadata={"format": "coalora-packed"})
        save_file(adapter, tmp / ADAPTER_NAME, metadata={"format": "pt"})
        atomic_write_text(tmp / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2))
        model_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {**description, "export_bytes": sum(p.stat().st_size for p in _written(tmp))}
        atomic_write_text(tmp / QUANTIZATION_NAME, json.dumps(summary, indent=1))
        atomic_write_text(tmp / "README.md", model_card(summary))
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in _written(tmp)}
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
        marker.unlink()
    return out


def _written(tmp: Path) -> list[Path]:
    """The files of an export being written, without its :data:`PARTIAL_MARKER`."""
    return sorted(p for p in tmp.iterdir() if p.name != PARTIAL_MARKER)


def measured_lines(s: Mapping[str, Any], whose: str = "") -> str:
    """The model card's lines of the run's measured metrics of this configuration."""
    return (
        "\n".join(
            f"- {r['metric']} {r['value']:.4f} ({whose}{r['split']} configuration, budget "
            f"{r['target_budget']:g}, {r['num_samples']} test examples)"
            for r in s["measured"]
        )
        or "- not measured: this configuration was not among the run's evaluated ones"
    )


def request_text(s: Mapping[str, Any]) -> str:
    """The export request as ``key=value`` pairs."""
    return ", ".join(f"{k}={v}" for k, v in s["request"].items() if v is not None)


def model_card(s: dict[str, Any]) -> str:
    """README.md of an export: what it is, its budget, sizes, and measured metric if known."""
    mb = 1e6
    measured, request = measured_lines(s), request_text(s)
    return f"""# {s["model_name"]} · {s["task"]} · {s["avg_bits"]:.3f} bits ({s["fmt"]})

Quantized {s["architecture"]} with a LoRA adapter, exported by coalora from a
`{s["method"]}` run. Requested: {request}; configuration id `{s["config_id"]}`.

| | |
|---|---|
| average bits per target weight | {s["avg_bits"]:.4f} |
| packed target matrices | {s["packed_bytes"] / mb:.2f} MB |
| served weights (packed + other weights + adapter) | {s["served_bytes"] / mb:.2f} MB |
| export folder on disk | {s["export_bytes"] / mb:.2f} MB |
| the same weights in fp32 | {s["fp32_bytes"] / mb:.2f} MB |

Measured on the run's test split:
{measured}

Load it:

```python
from coalora.serve import load_export, load_dequantized_base
model = load_export("<this folder>")                 # packed weights, dequantized per layer
from peft import PeftModel                           # or through peft, on the dense base
model = PeftModel.from_pretrained(load_dequantized_base("<this folder>"), "<this folder>")
```

Per-matrix quantization options are in `{QUANTIZATION_NAME}`; base model: `{s["base_model"]}`.
"""
