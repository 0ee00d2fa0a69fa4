"""Hydra entry point: ``python -m coalora.run [overrides]`` trains, evaluates and reports."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from coalora.configs import (
    allocate,
    budget_grid,
    evaluation_configs,
    initial_training_set,
    nearest_seen_config,
)
from coalora.data import TaskSpec, TextClassificationDataModule, build_metric
from coalora.evaluation.evaluate import evaluate_configurations
from coalora.evaluation.report import plot_metric_vs_bits, results_table, summarize, write_results
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_classifier, package_path
from coalora.model.targets import find_targets
from coalora.module import CoALoRAModule
from coalora.quant import cached_error_table, diagonal_fisher

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("package_path", package_path, replace=True)


def build_model(cfg: DictConfig, backbone: torch.nn.Module) -> QuantizedLoRAModel:
    method = cfg.method
    return QuantizedLoRAModel(
        backbone,
        fmt=cfg.quant.fmt,
        rank=method.rank,
        alpha=method.alpha,
        dropout=method.dropout,
        module_types=cfg.model.module_types,
        config_aware=method.config_aware,
        embed_dim=method.embed_dim,
        hidden_dim=method.hidden_dim,
        cache_bytes=cfg.quant.cache_bytes,
    )


def estimate_fisher(
    cfg: DictConfig, backbone: torch.nn.Module, datamodule: TextClassificationDataModule
) -> dict[str, torch.Tensor] | None:
    """Diagonal Fisher of the pre-trained backbone's target weights on a few training batches
    (``quant.fisher_batches``; 0 disables weighting). The task head is still untrained here."""
    if cfg.quant.fisher_batches <= 0:
        return None
    loader = datamodule.train_dataloader()
    batches = [b for _, b in zip(range(cfg.quant.fisher_batches), loader, strict=False)]
    targets = find_targets(backbone, cfg.model.module_types)
    weights = {t.name: backbone.get_submodule(t.name).weight for t in targets}
    return diagonal_fisher(backbone, weights, batches)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate at every budget, write the reports; returns the summary."""
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    task = TaskSpec(**OmegaConf.to_container(cfg.task, resolve=True))
    datamodule: TextClassificationDataModule = instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup()
    backbone = load_classifier(cfg.model.name_or_path, datamodule.num_labels)
    fisher = estimate_fisher(cfg, backbone, datamodule)
    model = build_model(cfg, backbone)
    table = cached_error_table(
        model.frozen_weights(), cfg.quant.fmt, cfg.paths.cache_dir, cfg.model.name, fisher
    )
    train_configs = initial_training_set(table, budget_grid(**cfg.search.initial_budgets))
    log.info("%d training configurations", len(train_configs))
    if cfg.method.lora_init == "svd":
        model.init_lora_from_residual(allocate(table, cfg.method.svd_reference_budget))
    elif cfg.method.lora_init != "standard":
        raise ValueError(f"method.lora_init={cfg.method.lora_init!r}; choose 'standard' or 'svd'")
    val_configs = [nearest_seen_config(table, b, train_configs) for b in cfg.eval.val_budgets]
    module = CoALoRAModule(
        model,
        optimizer=instantiate(cfg.method.optimizer),
        train_configs=train_configs,
        val_configs=val_configs,
        metric=build_metric(task),
        configs_per_step=cfg.method.configs_per_step,
        seed=cfg.seed,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.search.get("callback"):
        search = instantiate(cfg.search.strategy, _partial_=True)(table, train_configs)
        callbacks.insert(0, instantiate(cfg.search.callback, _partial_=True)(search))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    configs = evaluation_configs(
        table, cfg.eval.budgets, module.epoch_configs, module.trained_configs
    )
    records = evaluate_configurations(
        model,
        datamodule.test_dataloader(),
        build_metric(task),
        configs,
        cfg.method.name,
        task.metric,
    )
    eval_seconds = time.perf_counter() - start

    eval_dir = out_dir / "eval"
    write_results(records, eval_dir)
    plot = plot_metric_vs_bits(
        records, eval_dir / "accuracy_vs_bits.png", title=f"{task.name} · {cfg.model.name}"
    )
    summary = {
        "method": cfg.method.name,
        "task": task.name,
        "model": cfg.model.name,
        "quant": cfg.quant.fmt,
        "hypervolume": {
            split: summarize(records, split)[cfg.method.name]["hv"] for split in ("unseen", "seen")
        },
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "trainable_parameters": model.trainable_parameter_counts(),
        "training_configurations": len(module.epoch_configs),
        "configurations_trained_on": len(module.trained_configs),
        "results": [r.__dict__ for r in records],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for lg in loggers:
        log_to_wandb(lg, records, plot)
    Console().print(results_table(records))
    Console().print(
        f"hypervolume (unseen) {summary['hypervolume']['unseen']:.4f} · "
        f"train {train_seconds:.0f} s · eval {eval_seconds:.0f} s · outputs {out_dir}"
    )
    return summary


def log_to_wandb(logger: Any, records, plot: Path) -> None:
    """Results table and plot to W&B (no-op for other loggers)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    columns = list(records[0].__dict__)
    logger.experiment.log(
        {
            "eval/results": wandb.Table(
                columns=columns, data=[list(r.__dict__.values()) for r in records]
            ),
            "eval/accuracy_vs_bits": wandb.Image(str(plot)),
        }
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    torch.set_float32_matmul_precision("high")
    return train(cfg)["hypervolume"]["unseen"]


if __name__ == "__main__":
    main()
