"""Export folders: a packed quantized backbone plus a standard peft LoRA adapter.

Layout of an export folder:

- ``quantized_model.safetensors``: every weight of the model except the adapters; each target
  matrix as its packed ``<name>.codes``, ``.scale_codes``, ``.second_scales`` and ``.offset``;
- ``quantization.json``: per target matrix its option, :class:`QuantConfig`, shape, dtype and
  bytes, plus the model-wide summary (format, average bits, budget, configuration id);
- ``config.json`` and the tokenizer files (transformers' own format);
- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's LoRA format, θ's adjustment
  folded in (B' = B (I + U)) and the trained task head as ``modules_to_save``;
- ``README.md``: a model card; ``manifest.json``: size and sha256 of every other file.

:func:`load_export` rebuilds the served model from the folder alone;
``peft.PeftModel.from_pretrained(load_dequantized_base(folder), folder)`` gives the same
logits through peft.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from coalora.evaluation.report import read_results
from coalora.io import atomic_directory, atomic_write_text
from coalora.model.backbone import Choice
from coalora.model.hub import load_tokenizer
from coalora.quant import QuantConfig, QuantizedTensor
from coalora.serve.packed import PACKED_FIELDS, PackedLoRALinear

if TYPE_CHECKING:
    from coalora.serve.deployment import Deployment

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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_type(architecture: str) -> str | None:
    return next((t for suffix, t in TASK_TYPES.items() if architecture.endswith(suffix)), None)


def head_modules(dep: Deployment) -> list[str]:
    """Modules outside the adapters that training changed (the task head), by name."""
    return sorted(
        {
            name.removeprefix("model.").rpartition(".")[0]
            for name, p in dep.model.named_parameters()
            if p.requires_grad and name.startswith("model.") and ".lora_" not in name
        }
    )


def measured_metric(dep: Deployment, choice: Choice) -> list[dict[str, Any]]:
    """The run's evaluation rows for this configuration (empty when it was never scored)."""
    cid = dep.describe(choice)["config_id"]
    rows = []
    for folder in dep.eval_dirs():
        if (folder / "results.csv").is_file():
            rows += [r.__dict__ for r in read_results(folder / "results.csv") if r.config_id == cid]
    return rows


def write_export(
    dep: Deployment, choice: Choice, out: Path, request: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write the served model of ``choice`` to ``out`` (through a temporary folder)."""
    served = dep.build(choice)
    targets = [t.name for t in dep.model.targets]
    packed: dict[str, PackedLoRALinear] = {n: served.get_submodule(n) for n in targets}
    architecture = type(served).__name__
    lora = {f"{n}.{part}" for n in targets for part in ("lora_A", "lora_B")}
    backbone, stored, tied = {}, {}, {}
    for key, tensor in served.state_dict().items():
        if key in lora:
            continue  # the adapters go to the adapter file
        if tensor.numel() and tensor.data_ptr() in stored:
            tied[key] = stored[tensor.data_ptr()]  # tied weights are stored once
            continue
        stored[tensor.data_ptr()] = key
        backbone[key] = tensor.contiguous()
    adapter = {}
    for name, layer in packed.items():
        adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.contiguous()
        adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.contiguous()
    heads = head_modules(dep)
    for head in heads:
        for key, tensor in served.get_submodule(head).state_dict().items():
            adapter[f"{PEFT_PREFIX}{head}.{key}"] = tensor.contiguous()
    method, model_cfg = dep.config["method"], dep.config["model"]
    info = dep.describe(choice)
    summary = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "base_model": model_cfg["name_or_path"],
        "model_name": model_cfg["name"],
        "task": dep.config["task"]["name"],
        "method": method["name"],
        "fmt": dep.config["quant"]["fmt"],
        "request": request,
        **info,
        "packed_bytes": sum(layer.quantized.nbytes for layer in packed.values()),
        "fp32_bytes": sum(4 * n for n in dep.table.numels) + dep.fixed_nbytes,
        "task_spec": {k: v for k, v in dep.config["task"].items() if k in TASK_FIELDS},
        "max_length": dep.config["data"]["max_length"],
        "choice": list(choice),
        "tied": tied,
        "measured": measured_metric(dep, choice),
        "matrices": {
            name: {
                "option": option,
                "config": layer.config.to_dict(),
                "shape": list(layer.weight_shape),
                "dtype": str(layer.weight_dtype).removeprefix("torch."),
                "bits_per_param": layer.config.bits_per_param,
                "nbytes": layer.quantized.nbytes,
            }
            for (name, layer), option in zip(packed.items(), choice, strict=True)
        },
    }
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type(architecture),
        "base_model_name_or_path": model_cfg["name_or_path"],
        "r": method["rank"],
        "lora_alpha": method["alpha"],
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": heads or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    with atomic_directory(out, overwrite) as tmp:
        save_file(backbone, tmp / BACKBONE_NAME, metadata={"format": "coalora-packed"})
        save_file(adapter, tmp / ADAPTER_NAME, metadata={"format": "pt"})
        atomic_write_text(tmp / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2))
        config = copy.deepcopy(served.config)
        config.architectures = [architecture]  # the class load_export rebuilds
        config.save_pretrained(tmp)
        load_tokenizer(dep.config["model"]).save_pretrained(tmp)
        summary["export_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        atomic_write_text(tmp / QUANTIZATION_NAME, json.dumps(summary, indent=1))
        atomic_write_text(tmp / "README.md", model_card(summary))
        manifest = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())
        }
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return out


def model_card(s: dict[str, Any]) -> str:
    """README.md of an export: what it is, its budget, sizes, and measured metric if known."""
    mb = 1e6
    measured = (
        "\n".join(
            f"- {r['metric']} {r['value']:.4f} ({r['split']} configuration, budget "
            f"{r['target_budget']:g}, {r['num_samples']} test examples)"
            for r in s["measured"]
        )
        or "- not measured: this configuration was not among the run's evaluated ones"
    )
    request = ", ".join(f"{k}={v}" for k, v in s["request"].items() if v is not None)
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


def verify_export(folder: str | Path) -> dict[str, Any]:
    """Check every file of an export against its manifest; returns ``quantization.json``."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a coalora export: {MANIFEST_NAME} is missing")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    missing = [name for name in manifest if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"export {folder} is incomplete: {', '.join(missing)} is missing")
    for name, entry in manifest.items():
        path = folder / name
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise ValueError(
                f"export {folder}: {name} was altered (its size or sha256 differs from "
                f"{MANIFEST_NAME}); export it again"
            )
    return json.loads((folder / QUANTIZATION_NAME).read_text())


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


def _skeleton(folder: Path) -> nn.Module:
    """The export's architecture with every parameter on the meta device (filled by
    ``load_state_dict(..., assign=True)`` in the stored dtypes)."""
    config = AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        return getattr(transformers, config.architectures[0])(config)


def _restore(folder: Path, packed: bool) -> nn.Module:
    summary = verify_export(folder)
    model = _skeleton(folder)
    backbone = load_file(folder / BACKBONE_NAME)
    adapter = load_file(folder / ADAPTER_NAME)
    alpha_over_r = (lambda c: c["lora_alpha"] / c["r"])(
        json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    )
    for name, spec in summary["matrices"].items():
        tensors = [backbone.pop(f"{name}.{field}") for field in PACKED_FIELDS]
        weight = QuantizedTensor(
            QuantConfig(**spec["config"]),
            torch.Size(spec["shape"]),
            getattr(torch, spec["dtype"]),
            *tensors,
        )
        bias = backbone.pop(f"{name}.bias", None)
        if packed:
            a = adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"]
            b = adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            layer: nn.Module = PackedLoRALinear(weight, bias, a, b, alpha_over_r)
        else:
            layer = nn.Linear(spec["shape"][1], spec["shape"][0], bias=bias is not None)
            layer.weight.data = weight.dequantize()
            if bias is not None:
                layer.bias.data = bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    result = model.load_state_dict(backbone, strict=False, assign=True)
    for key, source in summary["tied"].items():  # one parameter again, as in the trained model
        *parent, child = key.split(".")
        setattr(model.get_submodule(".".join(parent)), child, model.get_parameter(source))
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
