"""Loading pre-trained backbones: hub names, local folders, or folders inside installed packages."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging


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
