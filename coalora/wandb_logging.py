"""Weights & Biases: a run's evaluation table and plot, and per-budget run names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig

from coalora.evaluation.report import EvalRecord, plot_metric_vs_bits

if TYPE_CHECKING:
    from coalora.methods import TrainingRun


def log_to_wandb(logger: Logger, records: list[EvalRecord], eval_dir: Path) -> None:
    """Results table and metric-vs-bits plot of one run to W&B, then close the W&B run so a
    next run of a per-budget method starts its own (no-op for other loggers)."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    plot = plot_metric_vs_bits(records, eval_dir / "accuracy_vs_bits.png")
    columns = list(records[0].__dict__)
    logger.experiment.log(
        {
            "eval/results": wandb.Table(
                columns=columns, data=[list(r.__dict__.values()) for r in records]
            ),
            "eval/accuracy_vs_bits": wandb.Image(str(plot)),
        }
    )
    logger.experiment.finish()


WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


def wandb_run_name(logger_cfg: DictConfig, run: TrainingRun) -> dict[str, str]:
    """``name`` for a W&B logger of a per-budget run: the configured name plus the run's name
    (``budget_<b>``), so a method's per-budget runs are told apart; nothing otherwise."""
    if logger_cfg.get("_target_") != WANDB_LOGGER or not run.name:
        return {}
    return {"name": f"{logger_cfg.name}-{run.name}"}
