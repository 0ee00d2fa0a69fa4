"""A configuration of a ``quant=gguf`` run as llama.cpp files: a GGUF base model and a GGUF LoRA.

The base (``model.gguf``) holds every target matrix as the llama.cpp type the configuration
allocates it (the bytes training used), the other matrices (token embedding, untied output) as
:data:`OTHER_MATRIX_TYPE` and the vectors (norms) as F32, with the architecture's metadata from
the model config and the tokenizer's copied from the model's own GGUF file. The adapter
(``adapter.gguf``) is the configuration's LoRA with θ folded in (``B (I + U)``), in llama.cpp's
adapter format (``general.type = adapter``, ``adapter.lora.alpha``). LLaMA stores the query and
key rows interleaved per head (llama.cpp's rotary layout): those rows, and the LoRA B rows that
write them, are permuted as llama.cpp's converter permutes them.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import torch
from torch import nn

from coalora.io import atomic_directory, atomic_write_text
from coalora.quant.ggml_quants import quantize_ggml
from coalora.serve.export_format import (
    MANIFEST_NAME,
    PARTIAL_MARKER,
    QUANTIZATION_NAME,
    measured_lines,
    request_text,
    served_lora_settings,
    sha256,
)
from coalora.serve.export_target import prepare_export_target

if TYPE_CHECKING:
    from coalora.serve.deployment import Deployment

ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {"llama": gguf.MODEL_ARCH.LLAMA}
"""transformers ``model_type`` → llama.cpp architecture of the models a GGUF export supports."""
OTHER_MATRIX_TYPE = "Q8_0"
"""llama.cpp type of the matrices that are not quantization targets (embeddings, output)."""
MODEL_FILE, ADAPTER_FILE = "model.gguf", "adapter.gguf"


def check_gguf_export(fmt: str, model_type: str, gguf_file: str | None) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of a run that can be exported as GGUF; raises otherwise."""
    if fmt != "gguf":
        raise ValueError(
            f"format=gguf needs a run trained on llama.cpp's types (quant=gguf); this run used "
            f"quant={fmt}, whose codes llama.cpp cannot hold: export it with format=coalora "
            "(supported with format=gguf: quant=gguf)"
        )
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"format=gguf supports the architectures {sorted(ARCHITECTURES)}; this run's model "
            f"is {model_type!r}: export it with format=coalora"
        )
    if not gguf_file:
        raise ValueError(
            "format=gguf copies the tokenizer from the model's own GGUF file (model.gguf_file); "
            "this run's model was not loaded from one"
        )
    return ARCHITECTURES[model_type]


def rotary_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns transformers' query/key layout (per head: first halves of the
    rotary pairs, then second halves) into llama.cpp's (pairs interleaved)."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _permutations(config: Any) -> dict[str, torch.Tensor]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "q_proj": rotary_permutation(heads * head_dim, heads),
        "k_proj": rotary_permutation(kv_heads * head_dim, kv_heads),
    }


def _row_order(name: str, permutations: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    module = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
    return permutations.get(module.rsplit(".", 1)[-1])


def rope_theta(config: Any) -> float:
    """The rotary base of a transformers config (``rope_parameters`` in transformers 5, else
    ``rope_theta``); rotary scaling, which the exported metadata does not describe, is refused."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(
            f"format=gguf supports unscaled rotary embeddings; this model's are {kind!r}"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config gives no rotary base (rope_theta)")
    return float(theta)


def _architecture_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF file ``source``."""
    reader = gguf.GGUFReader(source)
    fields = [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    if not any(f.name == "tokenizer.ggml.model" for f in fields):
        raise ValueError(f"{source} holds no tokenizer (tokenizer.ggml.model is missing)")
    for field in fields:
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub)


def _tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    name = names.get_name(hf_name, (".weight", ".bias"))
    if name is None:
        raise ValueError(f"the weight {hf_name} has no llama.cpp tensor name")
    return name


def write_gguf_model(
    path: Path,
    arch: gguf.MODEL_ARCH,
    served: nn.Module,
    targets: Sequence[str],
    source: Path,
    other_type: str = OTHER_MATRIX_TYPE,
    name: str = "coalora export",
) -> None:
    """The base model file at ``path``.

    Args:
        arch: the llama.cpp architecture.
        served: the served transformers model (``Deployment.build``): its target layers hold
            their llama.cpp bytes (``<target>.data``), every other weight is dense.
        targets: the target layers' names.
        source: the GGUF file whose tokenizer fields are copied.
        other_type: the type of the other matrices, a llama.cpp type name or ``"F32"``.
        name: ``general.name``.
    """
    config = served.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    permutations = _permutations(config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _architecture_metadata(writer, config)
    _copy_tokenizer(writer, source)
    layers = {name: served.get_submodule(name) for name in targets}
    for key, tensor in served.state_dict().items():
        module, _, field = key.rpartition(".")
        if module in layers and field in ("lora_A", "lora_B"):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output matrix from token_embd when it is absent
        if module in layers and field == "data":
            key, kind, data = f"{module}.weight", layers[module].config.type_name, tensor
        elif tensor.ndim == 2 and other_type != "F32":
            kind, data = other_type, quantize_ggml(tensor, other_type)
        else:
            kind, data = "F32", tensor.detach().float()
        order = _row_order(key, permutations)
        if order is not None:
            data = data[order]
        raw = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(_tensor_name(names, key), data.cpu().numpy(), raw_dtype=raw)
    _finish(writer)


def write_gguf_adapter(
    path: Path,
    arch: gguf.MODEL_ARCH,
    config: Any,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
) -> None:
    """The LoRA adapter file at ``path``: per target module name its ``(A, B)`` (``(r, in)``,
    ``(out, r)``; B with θ folded in), F32, scaled by llama.cpp as ``alpha / r``."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    permutations = _permutations(config)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for module, (a, b) in adapters.items():
        base = _tensor_name(names, f"{module}.weight")
        order = _row_order(module, permutations)
        b = b if order is None else b[order]
        writer.add_tensor(f"{base}.lora_a", a.detach().float().cpu().numpy())
        writer.add_tensor(f"{base}.lora_b", b.detach().float().cpu().numpy())
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    dep: Deployment,
    out: str | Path,
    bits: float | None = None,
    memory_mb: float | None = None,
    config: Sequence[int] | str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the run's model at a budget, memory limit or configuration as llama.cpp files in
    the folder ``out``: :data:`MODEL_FILE`, :data:`ADAPTER_FILE`, a model card, the
    ``quantization.json`` description and a manifest, through a temporary folder renamed at the
    end (as :meth:`Deployment.export`)."""
    from coalora.serve.deployment import export_request

    model_cfg = dep.config["model"]
    arch = check_gguf_export(
        dep.config["quant"]["fmt"], dep.model.model.config.model_type, model_cfg.get("gguf_file")
    )
    choice = dep.choose(bits, memory_mb, config)
    out = Path(out)
    prepare_export_target(out, overwrite)
    served, layers, description = dep.export_parts(choice, export_request(bits, memory_mb, config))
    source = Path(model_cfg["name_or_path"]) / model_cfg["gguf_file"]
    adapters = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
    with atomic_directory(out, overwrite) as tmp:
        marker = tmp / PARTIAL_MARKER
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        name = f"{model_cfg['name']} ({description['avg_bits']:.2f} bits, coalora)"
        write_gguf_model(tmp / MODEL_FILE, arch, served, list(layers), source, name=name)
        write_gguf_adapter(
            tmp / ADAPTER_FILE, arch, served.config, adapters, served_lora_settings(layers)[1]
        )
        sizes = {name: (tmp / name).stat().st_size for name in (MODEL_FILE, ADAPTER_FILE)}
        summary = {**description, "format": "gguf", "file_bytes": sizes}
        summary["export_bytes"] = sum(sizes.values())
        atomic_write_text(tmp / QUANTIZATION_NAME, json.dumps(summary, indent=1))
        atomic_write_text(tmp / "README.md", gguf_model_card(summary))
        files = sorted(p for p in tmp.iterdir() if p.name != PARTIAL_MARKER)
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1))
        marker.unlink()
    return out


def gguf_model_card(s: Mapping[str, Any]) -> str:
    """README.md of a GGUF export: budget, bytes per file, measured metric, llama.cpp commands."""
    types = Counter(spec["config"]["type_name"] for spec in s["matrices"].values())
    measured, request = measured_lines(s, "coalora's evaluation, "), request_text(s)
    by_type = ", ".join(f"{t} × {n}" for t, n in sorted(types.items()))
    size = {name: f"{n:,} ({n / 1e6:.2f} MB)" for name, n in s["file_bytes"].items()}
    return f"""# {s["model_name"]} · {s["task"]} · {s["avg_bits"]:.3f} bits (llama.cpp types)

A `{s["method"]}` run of coalora as llama.cpp files. Requested: {request}; configuration id
`{s["config_id"]}`. Target matrices by type: {by_type};
other matrices {OTHER_MATRIX_TYPE}, vectors F32.

| file | bytes |
|---|---|
| `{MODEL_FILE}` (base model) | {size[MODEL_FILE]} |
| `{ADAPTER_FILE}` (LoRA, θ folded in) | {size[ADAPTER_FILE]} |
| target matrices alone | {s["packed_bytes"]:,} ({s["avg_bits"]:.4f} bits per weight) |

Measured:
{measured}

Run it:

```
llama-cli -m {MODEL_FILE} --lora {ADAPTER_FILE} -p "..."
```

```python
from llama_cpp import Llama
llm = Llama("{MODEL_FILE}", lora_path="{ADAPTER_FILE}")
```
"""
