"""Scoring configurations of a trained model on a data split (DESIGN §8)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from coalora.configs import EvalConfig
from coalora.evaluation.report import EvalRecord
from coalora.model.backbone import QuantizedLoRAModel


@torch.no_grad()
def score_configuration(
    model: QuantizedLoRAModel,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: Metric,
    choice: Sequence[int],
) -> tuple[float, float, int]:
    """Metric value, mean loss and sample count of ``model`` under ``choice`` on ``batches``."""
    was_training = model.training
    model.eval()
    model.set_configuration(choice)
    metric = metric.clone().to(next(model.parameters()).device)
    total_loss, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        size = batch["labels"].shape[0]
        metric.update(out.logits.argmax(-1), batch["labels"])
        total_loss += out.loss.item() * size
        count += size
    model.train(was_training)
    if count == 0:
        raise ValueError("score_configuration got no batches")
    return metric.compute().item(), total_loss / count, count


def evaluate_configurations(
    model: QuantizedLoRAModel,
    batches: Iterable[dict[str, torch.Tensor]],
    metric: Metric,
    configs: Sequence[EvalConfig],
    method: str,
    metric_name: str,
    progress: bool = True,
) -> list[EvalRecord]:
    """One :class:`EvalRecord` per evaluation configuration."""
    batches = list(batches)
    records = []
    for cfg in tqdm(configs, desc="evaluating configurations", disable=not progress):
        value, loss, count = score_configuration(model, batches, metric, cfg.choice)
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
    return records
