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

While it is written, an export is a hidden temporary folder beside ``out`` holding
:data:`PARTIAL_MARKER`; the next export into the same parent removes such folders whose process
no longer runs (killed before it could clean up). ``overwrite=True`` replaces only a folder that
is an earlier export (:func:`export_problem`), never other files.

:func:`load_export` rebuilds the served model from the folder alone, after checking every file
against the manifest and every tensor's shape, dtype and size against ``quantization.json``;
``peft.PeftModel.from_pretrained(load_dequantized_base(folder), folder)`` gives the same
logits through peft.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from coalora.configs import config_id
from coalora.evaluation.report import read_results
from coalora.io import atomic_directory, atomic_write_text, read_json
from coalora.model.backbone import Choice
from coalora.model.hub import load_tokenizer
from coalora.quant import QuantConfig, QuantizedTensor, average_bits
from coalora.quant.tensor import packed_nbytes
from coalora.serve.packed import PACKED_FIELDS, PackedLoRALinear, packed_layout

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
PARTIAL_MARKER = ".coalora-partial-export"
"""A file only an export's temporary folder holds: the writing process's id and host."""
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a quantized matrix is restored to."""

log = logging.getLogger(__name__)


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
    """Write the served model of ``choice`` to ``out`` (through a temporary folder).

    ``out`` must not exist, or with ``overwrite`` be an earlier export
    (:func:`check_export_target`); stale temporary folders of killed exports beside it are
    removed first."""
    check_export_target(out, overwrite)
    remove_stale_partials(out.parent)
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
        marker = tmp / PARTIAL_MARKER
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        save_file(backbone, tmp / BACKBONE_NAME, metadata={"format": "coalora-packed"})
        save_file(adapter, tmp / ADAPTER_NAME, metadata={"format": "pt"})
        atomic_write_text(tmp / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2))
        config = copy.deepcopy(served.config)
        config.architectures = [architecture]  # the class load_export rebuilds
        config.save_pretrained(tmp)
        load_tokenizer(dep.config["model"]).save_pretrained(tmp)
        summary["export_bytes"] = sum(p.stat().st_size for p in _written(tmp))
        atomic_write_text(tmp / QUANTIZATION_NAME, json.dumps(summary, indent=1))
        atomic_write_text(tmp / "README.md", model_card(summary))
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in _written(tmp)}
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
        marker.unlink()
    return out


def _written(tmp: Path) -> list[Path]:
    """The files of an export being written, without its :data:`PARTIAL_MARKER`."""
    return sorted(p for p in tmp.iterdir() if p.name != PARTIAL_MARKER)


def export_problem(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier export that may be replaced; None when it is one.

    An export is a folder (not a link) holding only plain files: those its manifest lists (a
    complete export, or one with files missing or altered), or, for a partial export, a
    :data:`PARTIAL_MARKER` among them. Anything else (another folder's ``manifest.json``, a
    file the manifest does not list, a subfolder) is a user's.
    """
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.is_dir():
        return "is not a folder"
    entries = sorted(folder.iterdir())
    names = {p.name for p in entries}
    others = [p.name for p in entries if p.is_symlink() or not p.is_file()]
    if others:
        return f"holds folders or links that are not part of an export ({others[:3]})"
    if PARTIAL_MARKER in names:
        return None
    if MANIFEST_NAME not in names:
        return f"has no {MANIFEST_NAME} (it holds {sorted(names)[:3]})"
    try:
        manifest = read_json(folder / MANIFEST_NAME)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or QUANTIZATION_NAME not in manifest:
        return (
            f"has a {MANIFEST_NAME} that is not an export's (it does not list {QUANTIZATION_NAME})"
        )
    unlisted = sorted(names - set(manifest) - {MANIFEST_NAME})
    if unlisted:
        return f"holds files that are not part of the export ({unlisted[:3]})"
    return None


def check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` whose writing would lose a user's files: an existing path unless
    ``overwrite``, and with ``overwrite`` anything but an earlier export (:func:`export_problem`).
    """
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r} must be true or false")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another folder, or overwrite=true to replace an "
            "earlier export"
        )
    problem = export_problem(out)
    if problem is not None:
        raise FileExistsError(
            f"overwrite=true replaces only an earlier coalora export, but {out} {problem}; "
            "nothing was changed: choose another folder"
        )


def _writer_running(marker: Path) -> bool:
    """Whether the process named in a :data:`PARTIAL_MARKER` may still be writing (True when
    that cannot be told: another machine, an unreadable marker)."""
    try:
        owner = read_json(marker)
        pid, host = owner["pid"], owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname() or type(pid) is not int or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed exports left in ``parent`` (hidden
    ``.<name>.<random>.tmp`` folders of plain files with a :data:`PARTIAL_MARKER` naming a
    process of this machine that no longer runs); returns them."""
    removed = []
    for tmp in sorted(parent.glob(".*.tmp")) if parent.is_dir() else []:
        marker = tmp / PARTIAL_MARKER
        if export_problem(tmp) is None and marker.is_file() and not _writer_running(marker):
            shutil.rmtree(tmp)
            removed.append(tmp)
            log.info("removed %s, left by an export that was killed", tmp)
    return removed


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


def _plain_name(name: object) -> bool:
    """A file name of the folder itself: no path separator, not ``.`` or ``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def verify_export(folder: str | Path) -> dict[str, Any]:
    """Check an export folder before anything of it is used; returns ``quantization.json``.

    The folder must hold exactly the files its manifest lists (each a plain file inside it, not
    a link, with the recorded size and sha256), and ``quantization.json`` must describe a
    consistent model (:func:`check_description`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist")
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a coalora export: {MANIFEST_NAME} is missing")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or QUANTIZATION_NAME not in manifest:
        raise ValueError(
            f"export {folder}: {MANIFEST_NAME} is not an export's manifest (it does not list "
            f"{QUANTIZATION_NAME}); export it again"
        )
    outside = [name for name in manifest if not _plain_name(name)]
    if outside:
        raise ValueError(
            f"export {folder}: {MANIFEST_NAME} lists {outside[:3]}, which are not files of the "
            "folder itself; an export lists only its own files: export it again"
        )
    links = sorted(name for name in manifest if (folder / name).is_symlink())
    if links:
        raise ValueError(
            f"export {folder}: {', '.join(links)} is a symbolic link; an export holds its files "
            "themselves, never links to files elsewhere: export it again"
        )
    missing = [name for name in manifest if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"export {folder} is incomplete: {', '.join(missing)} is missing")
    unlisted = sorted({p.name for p in folder.iterdir()} - set(manifest) - {MANIFEST_NAME})
    if unlisted:
        raise ValueError(
            f"export {folder}: {', '.join(unlisted)} is not listed in {MANIFEST_NAME}; an "
            "export holds only the files it lists: remove it or export again"
        )
    for name, entry in manifest.items():
        path = folder / name
        if (
            not isinstance(entry, dict)
            or path.stat().st_size != entry.get("bytes")
            or sha256(path) != entry.get("sha256")
        ):
            raise ValueError(
                f"export {folder}: {name} was altered (its size or sha256 differs from "
                f"{MANIFEST_NAME}); export it again"
            )
    summary = read_json(folder / QUANTIZATION_NAME)
    check_description(folder, summary)
    return summary


def check_description(folder: Path, summary: Any) -> None:
    """Refuse a ``quantization.json`` that does not describe a consistent model: per matrix a
    valid :class:`QuantConfig`, a 2-d shape, a weight dtype, and the bits per weight and byte
    count its configuration gives; a configuration (``choice``) of the matrices' options with
    its id; average bits and packed bytes that add up; the fields loading and prediction read.
    """
    where = f"export {folder}: {QUANTIZATION_NAME}"
    try:
        problems = list(_description_problems(summary))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        problems = [f"it is not an export's description ({type(err).__name__}: {err})"]
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems[:3])}; export it again")


def _description_problems(s: Mapping[str, Any]) -> Iterator[str]:
    if s["format_version"] != FORMAT_VERSION:
        yield f"format_version {s['format_version']!r}; this coalora reads {FORMAT_VERSION}"
        return
    if not isinstance(s["architecture"], str) or task_type(s["architecture"]) is None:
        yield f"architecture {s['architecture']!r} is not a supported transformers model class"
    matrices = s["matrices"]
    if not isinstance(matrices, dict) or not matrices:
        yield "it describes no quantized matrices"
        return
    numels, bits = [], []
    for name, spec in matrices.items():
        config = QuantConfig(**spec["config"])
        shape = spec["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or any(type(n) is not int or n < 1 for n in shape)
        ):
            yield f"{name}: shape {shape!r} is not that of a matrix"
            continue
        numel = shape[0] * shape[1]
        nbytes = packed_nbytes(numel, config)
        if spec["dtype"] not in WEIGHT_DTYPES:
            yield f"{name}: dtype {spec['dtype']!r} is not one of {WEIGHT_DTYPES}"
        if spec["bits_per_param"] != config.bits_per_param:
            yield (
                f"{name}: bits_per_param {spec['bits_per_param']!r} is not that of its "
                f"configuration {config} ({config.bits_per_param})"
            )
        if spec["nbytes"] != nbytes:
            yield (
                f"{name}: nbytes {spec['nbytes']!r} is not that of its configuration {config} "
                f"on a {shape[0]}×{shape[1]} matrix ({nbytes})"
            )
        numels.append(numel)
        bits.append(config.bits_per_param)
    choice = s["choice"]
    options = [spec["option"] for spec in matrices.values()]
    if choice != options or any(type(j) is not int for j in options):
        yield "choice does not list the option of every matrix in order"
    elif s["config_id"] != config_id(choice):
        yield f"config_id {s['config_id']!r} is not that of its choice ({config_id(choice)})"
    if len(numels) == len(matrices):
        avg = average_bits(numels, bits)
        if not isinstance(s["avg_bits"], float | int) or not math.isclose(
            s["avg_bits"], avg, rel_tol=1e-9
        ):
            yield f"avg_bits {s['avg_bits']!r} is not that of its matrices ({avg!r})"
        packed = sum(spec["nbytes"] for spec in matrices.values())
        if s["packed_bytes"] != packed:
            yield f"packed_bytes {s['packed_bytes']!r} is not the matrices' sum ({packed})"
    tied = s["tied"]
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        yield "tied is not a mapping of weight names"
    length = s["max_length"]
    if type(length) is not int or length < 1:
        yield f"max_length {length!r} is not a positive integer"
    if not isinstance(s["task_spec"], dict):
        yield "task_spec is not a mapping"


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
        config, (rows, cols) = QuantConfig(**spec["config"]), spec["shape"]
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
        layout = packed_layout(rows * cols, config)
        tensors = [
            backbone.take(f"{name}.{field}", *layout[field], source) for field in PACKED_FIELDS
        ]
        weight = QuantizedTensor(
            config, torch.Size((rows, cols)), getattr(torch, spec["dtype"]), *tensors
        )
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
