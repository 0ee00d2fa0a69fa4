"""Data: text-classification and language-modelling task specs, raw sources and the Lightning
data modules."""

from coalora.data.datamodule import TextClassificationDataModule, subsample
from coalora.data.factory import (
    LOWER_IS_BETTER,
    Task,
    build_datamodule,
    build_metric,
    build_task,
    metric_mode,
)
from coalora.data.language import LanguageModelingTask, build_lm_metric, load_corpus
from coalora.data.lm_datamodule import LanguageModelingDataModule
from coalora.data.sources import load_glue, load_sentiment, load_task
from coalora.data.task import TaskSpec

__all__ = [
    "LOWER_IS_BETTER",
    "LanguageModelingDataModule",
    "LanguageModelingTask",
    "Task",
    "TaskSpec",
    "TextClassificationDataModule",
    "build_datamodule",
    "build_lm_metric",
    "build_metric",
    "build_task",
    "load_corpus",
    "load_glue",
    "load_sentiment",
    "load_task",
    "metric_mode",
    "subsample",
]
