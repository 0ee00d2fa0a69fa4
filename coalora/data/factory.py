"""Task kinds: building a task, its data module and its metric from a run's configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torchmetrics

from coalora.data.datamodule import TextClassificationDataModule
from coalora.data.language import LanguageModelingTask, build_lm_metric
from coalora.data.lm_datamodule import LanguageModelingDataModule
from coalora.data.task import TaskSpec, classification_metric

Task = TaskSpec | LanguageModelingTask
TASK_KINDS = ("classification", "language_modeling")
LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity"})
"""Metrics that improve downward."""


def metric_mode(metric: str) -> str:
    """``"min"`` for a metric that improves downward (perplexity), else ``"max"``: the
    ``mode`` of a checkpoint or early-stopping callback monitoring it."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def build_task(config: Mapping[str, Any]) -> Task:
    """The task a ``task`` config describes, by its ``kind`` (default ``classification``)."""
    kind = config.get("kind", "classification")
    if kind == "language_modeling":
        return LanguageModelingTask(**config)
    if kind == "classification":
        return TaskSpec(**config)
    raise ValueError(f"task.kind={kind!r}; choose one of {TASK_KINDS}")


def build_datamodule(task: Task | Mapping[str, Any], **settings: Any) -> L.LightningDataModule:
    """The data module of the task's kind; ``settings`` are the shared ``data`` config."""
    task = task if isinstance(task, Task) else build_task(task)
    if isinstance(task, LanguageModelingTask):
        return LanguageModelingDataModule(task=task, **settings)
    return TextClassificationDataModule(task=task, **settings)


def build_metric(task: Task) -> torchmetrics.Metric:
    """The task's metric (accuracy, F1, Matthews correlation or perplexity)."""
    if isinstance(task, LanguageModelingTask):
        return build_lm_metric(task)
    return classification_metric(task)
