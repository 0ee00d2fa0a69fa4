"""Scoring configurations of a trained model on a data split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from coalora.evaluation.report import EvalRecord
from coalora.model.backbone import QuantizedLoRAModel
from coalora.selection import EvalConfig

MetricInputs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Logits and labels → the inputs of a task's metric (see ``TaskSpec.metric_inputs``)."""
ExampleStats = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Logits and labels → one row per example (see ``TaskSpec.example_stats``)."""


class Score(NamedTuple):
    """A model's metric, mean loss and sample count on some batches; ``examples`` holds the
    per-example statistics when they were asked for (else None)."""

    value: float
    loss: float
    count: int
    examples: np.ndarray | None = None


@torch.no_grad()
def score_configuration(
    model: QuantizedLoRAModel,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: Metric,
    choice: Sequence[int],
    metric_inputs: MetricInputs,
    example_stats: ExampleStats | None = None,
) -> Score:
    """Metric value, mean loss and sample count of ``model`` under ``choice`` on ``batches``.

    ``metric_inputs`` maps logits and labels to the metric's inputs (the task's own). The loss
    is the mean over examples (over tokens for language modelling: every block has the same
    length)."""
    model.set_configuration(choice)
    return score_model(model, batches, metric, metric_inputs, example_stats)


@torch.no_grad()
def score_model(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: Metric,
    metric_inputs: MetricInputs,
    example_stats: ExampleStats | None = None,
) -> Score:
    """Metric value, mean loss and sample count of any model returning ``loss`` and ``logits``
    (in eval mode, restored afterwards), and with ``example_stats`` the per-example rows it
    maps each batch to. The metric covers these batches only: it is not synchronised with
    other processes (a multi-process run evaluates on rank 0 alone)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metric = metric.clone().to(device)
    metric.distributed_available_fn = lambda: False  # torchmetrics: compute without syncing
    total_loss, count, rows = 0.0, 0, []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        size = batch["labels"].shape[0]
        metric.update(*metric_inputs(out.logits, batch["labels"]))
        if example_stats is not None:
            rows.append(example_stats(out.logits, batch["labels"]).double().cpu().numpy())
        total_loss += out.loss.item() * size
        count += size
    model.train(was_training)
    if count == 0:
        raise ValueError("score_model got no batches")
    examples = np.concatenate(rows) if example_stats is not None else None
    return Score(metric.compute().item(), total_loss / count, count, examples)


def evaluate_configurations(
    model: QuantizedLoRAModel,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: Metric,
    configs: Sequence[EvalConfig],
    method: str,
    metric_name: str,
    metric_inputs: MetricInputs,
    progress: bool = True,
    example_stats: ExampleStats | None = None,
) -> tuple[list[EvalRecord], list[np.ndarray | None]]:
    """One :class:`EvalRecord` per evaluation configuration, and each one's per-example
    statistics (None without ``example_stats``)."""
    batches = list(batches)
    records, examples = [], []
    for cfg in tqdm(configs, desc="evaluating configurations", disable=not progress):
        value, loss, count, rows = score_configuration(
            model, batches, metric, cfg.choice, metric_inputs, example_stats
        )
        examples.append(rows)
        records.append(
            EvalRecord(
                method=method,
                split=cfg.split,
                target_budget=cfg.target_budget,
                avg_bits=cfg.avg_bits,
                metric=metric_name,
                value=value,
                loss=loss,
                num_samples=count,
                config_id=cfg.config_id,
            )
        )
    return records, examples
