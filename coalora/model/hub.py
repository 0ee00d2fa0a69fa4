"""Loading pre-trained backbones: hub names, local folders, or folders inside installed packages."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

MODEL_KINDS = {"encoder": "classification", "causal_lm": "language_modeling"}
"""Model kind (``model.kind``) → the task kind it serves: encoders get a fresh classification
head, causal LMs keep their language-modelling head."""
DTYPES = ("float32", "bfloat16", "float16")


def package_path(package: str, *parts: str) -> str:
    """Folder ``parts`` inside the installed ``package``, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; `make install` installs the embedded models"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist in the installed package {package!r}")
    return str(path)


def check_model_for_task(model: Mapping[str, Any], task_name: str, task_kind: str) -> None:
    """Refuse a model kind that does not serve the task kind (e.g. SST-2 on a causal LM)."""
    kind = model.get("kind", "encoder")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r}; choose one of {tuple(MODEL_KINDS)}")
    if MODEL_KINDS[kind] != task_kind:
        wanted = next(k for k, t in MODEL_KINDS.items() if t == task_kind)
        raise ValueError(
            f"task={task_name} is a {task_kind} task but model={model['name']} has kind "
            f"{kind}; use a model of kind {wanted}"
        )


def load_backbone(model: Mapping[str, Any], num_labels: int | None = None) -> PreTrainedModel:
    """The pre-trained model a run's ``model`` config names, in ``model.dtype``.

    ``kind: encoder`` gives a sequence classifier with a fresh ``num_labels``-way head;
    ``kind: causal_lm`` a causal LM with its own head. ``gguf_file`` loads a GGUF file (its
    weights dequantized by transformers).
    """
    dtype = model.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; choose one of {DTYPES}")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if model.get("gguf_file"):
        kwargs["gguf_file"] = model["gguf_file"]
    kind = model.get("kind", "encoder")
    if kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(model["name_or_path"], **kwargs)
    if kind == "encoder":
        return AutoModelForSequenceClassification.from_pretrained(
            model["name_or_path"], num_labels=num_labels, **kwargs
        )
    raise ValueError(f"model.kind={kind!r}; choose one of {tuple(MODEL_KINDS)}")


def load_tokenizer(model: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer of a run's ``model`` config (from its GGUF file when it has one)."""
    gguf = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
    return AutoTokenizer.from_pretrained(model["name_or_path"], **gguf)


def load_classifier(name_or_path: str, num_labels: int) -> PreTrainedModel:
    """A sequence classifier with a fresh ``num_labels``-way head, in fp32."""
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (e.g. a head reported as newly
    initialised just before its trained weights are loaded)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
