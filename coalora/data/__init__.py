"""Text-classification data: task specs, raw sources and the Lightning data module."""

from coalora.data.datamodule import TextClassificationDataModule, subsample
from coalora.data.sources import load_glue, load_sentiment, load_task
from coalora.data.task import TaskSpec, build_metric

__all__ = [
    "TaskSpec",
    "TextClassificationDataModule",
    "build_metric",
    "load_glue",
    "load_sentiment",
    "load_task",
    "subsample",
]
