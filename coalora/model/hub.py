"""Loading pre-trained backbones: hub names, local folders, or folders inside installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoModelForSequenceClassification, PreTrainedModel


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


def load_classifier(name_or_path: str, num_labels: int) -> PreTrainedModel:
    """A sequence classifier with a fresh ``num_labels``-way head, in fp32."""
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)
