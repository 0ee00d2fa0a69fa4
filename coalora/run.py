"""Hydra entry point: ``python -m coalora.run [overrides]`` trains, evaluates and reports."""

from __future__ import annotations

import copy
import functools
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from coalora.cli import reported_errors
from coalora.configs import (
    EvalConfig,
    allocate,
    budget_grid,
    check_budgets,
    config_bits,
    evaluation_configs,
    initial_training_set,
    nearest_seen_config,
)
from coalora.data import Task, build_metric, build_task
from coalora.evaluation.evaluate import evaluate_configurations, score_model
from coalora.evaluation.report import (
    SPLITS,
    EvalRecord,
    perplexity_score,
    plot_metric_vs_bits,
    results_table,
    summarize,
    write_configurations,
    write_results,
)
from coalora.io import atomic_write_text
from coalora.memory import PeakMemory
from coalora.model.backbone import Choice, QuantizedLoRAModel
from coalora.model.hub import check_model_for_task, load_backbone, package_path
from coalora.model.targets import find_targets, target_weights
from coalora.module import CoALoRAModule, check_identity, full_parameters
from coalora.preflight import check_data_length, check_settings
from coalora.quant import ErrorTable, cached_error_table, diagonal_fisher
from coalora.serve.run_files import write_serving_files

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("package_path", package_path, replace=True)
# `${pid:}`: this process's id, in run folder names (conf/hydra/default.yaml).
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


def estimate_fisher(
    cfg: DictConfig, backbone: torch.nn.Module, datamodule: L.LightningDataModule
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


def load_error_table(cfg: DictConfig, datamodule: L.LightningDataModule) -> ErrorTable:
    """The pre-trained model's error table (cached on disk, DESIGN §3), computed on the
    training device; ``quant.table_sample_fraction`` estimates it on a fraction of the weights."""
    from coalora.device import training_device

    backbone = load_backbone(cfg.model, datamodule.num_labels).to(training_device(cfg.trainer))
    fisher = estimate_fisher(cfg, backbone, datamodule)
    weights = target_weights(backbone, find_targets(backbone, cfg.model.module_types))
    return cached_error_table(
        weights,
        cfg.quant.fmt,
        cfg.paths.cache_dir,
        cfg.model.name,
        fisher,
        sample_fraction=cfg.quant.get("table_sample_fraction"),
    )


@dataclass(frozen=True)
class TrainingRun:
    """One fit: its initial training configurations and, for per-budget methods, the budget
    it serves (evaluated on its own allocation only)."""

    name: str
    train_configs: list[Choice]
    budget: float | None = None


TRAINING_SETS = ("grid", "budgets", "per_budget")


def training_runs(cfg: DictConfig, table: ErrorTable) -> list[TrainingRun]:
    """The fits a method needs (DESIGN §7), from ``method.training_set``:

    - ``grid``: one run on the allocations of ``search.initial_budgets`` (CoA-LoRA; the
      search, if any, changes the set between epochs);
    - ``budgets``: one run on the allocations of ``method.train_budgets`` (Shared-LoRA);
    - ``per_budget``: one run per evaluation budget, on that budget's allocation only
      (QLoRA, LQ-LoRA), written to ``budget_<b>/``.
    """
    method = cfg.method
    if method.training_set not in TRAINING_SETS:
        raise ValueError(
            f"method.training_set={method.training_set!r}; choose one of {TRAINING_SETS}"
        )
    if method.training_set != "grid" and cfg.search.get("callback"):
        wrong = (
            "search.callback settings (set them only for a search)"
            if cfg.search.name == "frozen"
            else f"search={cfg.search.name}"
        )
        raise ValueError(
            f"method={method.name} trains a fixed set of configurations; run it with "
            f"search=frozen, not {wrong}"
        )
    if method.training_set == "grid":
        return [
            TrainingRun("", initial_training_set(table, budget_grid(**cfg.search.initial_budgets)))
        ]
    if method.training_set == "budgets":
        return [TrainingRun("", initial_training_set(table, list(method.train_budgets)))]
    return [TrainingRun(f"budget_{b}", [allocate(table, b)], float(b)) for b in cfg.eval.budgets]


def init_lora(
    cfg: DictConfig, model: QuantizedLoRAModel, table: ErrorTable, run: TrainingRun
) -> None:
    """``method.lora_init``: ``standard`` (B = 0) or ``svd`` (LQ-LoRA, ``method.svd_iterations``
    rounds) at the run's own allocation, or at ``method.svd_reference_budget`` for runs that
    train several configurations."""
    if cfg.method.lora_init == "svd":
        choice = (
            run.train_configs[0]
            if run.budget is not None
            else allocate(table, cfg.method.svd_reference_budget)
        )
        model.init_lora_from_residual(choice, cfg.method.svd_iterations)
    elif cfg.method.lora_init != "standard":
        raise ValueError(f"method.lora_init={cfg.method.lora_init!r}; choose 'standard' or 'svd'")


def make_trainer(
    cfg: DictConfig, table: ErrorTable, run: TrainingRun
) -> tuple[L.Trainer, list[Logger]]:
    """The trainer with the configured loggers and callbacks (the search callback first).

    A per-budget run's W&B run is named after the method's with the run's name appended
    (``...-budget_3.0``); the runs of one method share the configured ``group``."""
    loggers = [instantiate(c, **wandb_run_name(c, run)) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.search.get("callback"):
        search = instantiate(cfg.search.strategy, _partial_=True)(table, run.train_configs)
        callbacks.insert(0, instantiate(cfg.search.callback, _partial_=True)(search))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    check_launch(trainer)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, loggers


def run_evaluation_configs(
    cfg: DictConfig, table: ErrorTable, run: TrainingRun, module: CoALoRAModule
) -> list[EvalConfig]:
    """Unseen and seen configurations at every budget; a per-budget run's own allocation."""
    if run.budget is None:
        return evaluation_configs(
            table, cfg.eval.budgets, module.epoch_configs, module.trained_configs
        )
    choice = run.train_configs[0]
    return [EvalConfig(run.budget, "seen", choice, config_bits(table, choice))]


@dataclass(frozen=True)
class RunResult:
    """What one fit produced."""

    run: TrainingRun
    configs: list[EvalConfig]
    records: list[EvalRecord]
    train_seconds: float
    eval_seconds: float
    trainable_parameters: dict[str, int]
    training_configurations: int
    configurations_trained_on: int
    device: str
    frozen_mib: float = 0.0


def run_identity(
    cfg: DictConfig, task_name: str, model: QuantizedLoRAModel | None = None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run (see :func:`check_identity`):
    model, task, quantization format, method and rank, and with ``model`` the size of its
    option space and its number of target matrices."""
    identity = {
        "model": cfg.model.name,
        "task": task_name,
        "quant": cfg.quant.fmt,
        "method": cfg.method.name,
        "rank": cfg.method.rank,
        "alpha": cfg.method.alpha,
    }
    if model is not None:
        identity |= {"options": len(model.options), "targets": len(model.targets)}
    return identity


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl+C (SIGINT); the message says what can be resumed."""


def interruption_message(trainer: L.Trainer, run: TrainingRun) -> str:
    """Where an interrupted fit stopped and how to resume it: its ``last.ckpt`` holds the last
    finished epoch (checkpoints are written at epoch ends only, so it is never partial)."""
    where = f"training {run.name} " if run.name else "training "
    where += f"stopped in epoch {trainer.current_epoch} (counting from 0)"
    last = Path(getattr(trainer.checkpoint_callback, "last_model_path", "") or "")
    if not last.is_file():
        return f"{where}, before any epoch finished: there is no checkpoint to resume from"
    epochs = torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1
    again = f" eval.budgets=[{run.budget}]" if run.budget is not None else ""
    return (
        f"{where}; the checkpoint of its first {epochs} finished epoch(s) is kept: resume with "
        f"the same settings and ckpt_path={last.resolve()}{again}"
    )


def fit_and_evaluate(
    cfg: DictConfig,
    run: TrainingRun,
    task: Task,
    datamodule: L.LightningDataModule,
    table: ErrorTable,
) -> RunResult:
    """Train one run and evaluate it: at every budget on unseen and seen configurations, or,
    for a per-budget run, on its own allocation. Training time counts the LoRA initialisation,
    the fit and the search; loggers, checkpoints and search reports go to the run's folder."""
    if run.name:
        cfg = copy.deepcopy(cfg)
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / run.name)
    L.seed_everything(cfg.seed, workers=True)
    model = QuantizedLoRAModel.from_run_config(load_backbone(cfg.model, datamodule.num_labels), cfg)
    start = time.perf_counter()
    init_lora(cfg, model, table, run)
    if run.budget is not None:  # one configuration: keep its packed codes only (QLoRA's memory)
        model.keep_only(run.train_configs[0])
    val_configs = (
        run.train_configs
        if run.budget is not None
        else [nearest_seen_config(table, b, run.train_configs) for b in cfg.eval.val_budgets]
    )
    module = CoALoRAModule(
        model,
        optimizer=instantiate(cfg.method.optimizer),
        train_configs=run.train_configs,
        val_configs=val_configs,
        metric=build_metric(task),
        metric_inputs=task.metric_inputs,
        configs_per_step=cfg.method.configs_per_step,
        seed=cfg.seed,
        identity=run_identity(cfg, task.name, model),
        gradient_clip_val=cfg.method.gradient_clip_val,
    )
    trainer, loggers = make_trainer(cfg, table, run)
    if trainer.is_global_zero:
        write_serving_files(
            cfg.paths.output_dir,
            OmegaConf.to_container(cfg, resolve=True),
            datamodule.num_labels,
            table,
        )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SystemExit:  # Lightning exits after a KeyboardInterrupt (Ctrl+C, SIGINT)
        if trainer.interrupted:
            raise TrainingInterrupted(interruption_message(trainer, run)) from None
        raise
    train_seconds = time.perf_counter() - start
    device = trainer.strategy.root_device
    model.to(device)  # Lightning moves the model back to the CPU when fit ends
    with full_parameters(trainer):
        if not trainer.is_global_zero:  # several processes: rank 0 alone evaluates
            return RunResult(run, [], [], train_seconds, 0.0, {}, 0, 0, str(device))
        frozen_mib = model.frozen_nbytes() / 2**20
        start = time.perf_counter()
        configs = run_evaluation_configs(cfg, table, run, module)
        records = evaluate_configurations(
            model,
            datamodule.test_dataloader(),
            build_metric(task),
            configs,
            cfg.method.name,
            task.metric,
            task.metric_inputs,
        )
        eval_seconds = time.perf_counter() - start
    for lg in loggers:
        log_to_wandb(lg, records, Path(cfg.paths.output_dir) / "eval")
    return RunResult(
        run,
        configs,
        records,
        train_seconds,
        eval_seconds,
        model.trainable_parameter_counts(),
        len(module.epoch_configs),
        len(module.trained_configs),
        str(next(model.parameters()).device),
        frozen_mib,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train every run of the method, evaluate, write the reports; returns the summary.

    Several processes (``trainer=ddp``, ``ddp_cpu``): every rank runs this whole function and
    trains; only global rank 0 evaluates and writes the reports, serving files and console
    output (Lightning writes the checkpoints from rank 0); the other ranks return ``{}`` once
    their training is done."""
    out_dir = Path(cfg.paths.output_dir)
    resume = check_settings(cfg)
    check_data_length(cfg)
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True))
    check_model_for_task(cfg.model, task.name, task.kind)
    if resume is not None:
        try:
            check_identity(resume, run_identity(cfg, task.name))
        except ValueError as err:
            raise ValueError(f"ckpt_path={cfg.ckpt_path}: {err}") from None
    datamodule: L.LightningDataModule = instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup()
    table = load_error_table(cfg, datamodule)
    check_budgets("eval.budgets", cfg.eval.budgets, table)
    if cfg.method.training_set == "grid":
        check_budgets("eval.val_budgets", cfg.eval.val_budgets, table)
    if cfg.method.training_set == "budgets":
        check_budgets("method.train_budgets", cfg.method.train_budgets, table)
    runs = training_runs(cfg, table)
    log.info("%d run(s); first trains %d configurations", len(runs), len(runs[0].train_configs))
    with PeakMemory() as memory:
        results = []
        for run in runs:
            results.append(fit_and_evaluate(cfg, run, task, datamodule, table))
            datamodule.trainer = None  # the shared data module would keep the fit alive
            release_memory()
    if rank_zero_only.rank != 0:  # a multi-process run's other ranks only train
        return {}
    records = [r for result in results for r in result.records]
    reference, reference_device = unquantized_reference(
        cfg, task, datamodule, torch.device(results[0].device)
    )
    summary = write_reports(
        cfg,
        task,
        results,
        out_dir,
        reference,
        hv_score(task, datamodule),
        memory.as_dict(),
        reference_device,
    )
    Console().print(results_table(records))
    Console().print(
        f"hypervolume ({summary['compared_split']}) {summary['hv']:.4f} · "
        f"train {summary['train_seconds']:.0f} s · eval {summary['eval_seconds']:.0f} s · "
        f"outputs {out_dir}"
    )
    print_serving_hint(out_dir, [r.run for r in results])
    return summary


def print_serving_hint(out_dir: Path, runs: list[TrainingRun]) -> None:
    """How to serve or export what this run trained (each budget's folder for per-budget runs)."""
    run_dir = out_dir / runs[0].name if runs[0].budget is not None else out_dir
    bits = runs[0].budget if runs[0].budget is not None else 3.0
    Console().print(
        f"serve it:  python -m coalora.export run_dir={run_dir} bits={bits:g}\n"
        f"     or:   Deployment.from_run({str(run_dir)!r}).at(bits={bits:g})"
        "  (from coalora.serve import Deployment)",
        soft_wrap=True,
    )


def hv_score(task: Task, datamodule: L.LightningDataModule) -> Callable[[float], float] | None:
    """What the hypervolume measures of a metric value: the value itself (accuracy, F1, ...), or
    for perplexity ``s = 1 − ln(ppl) / ln(V)`` (V the vocabulary size; a uniform model scores
    0, a perfect one 1)."""
    if task.metric != "perplexity":
        return None
    return functools.partial(perplexity_score, vocab_size=datamodule.vocab_size)


def release_memory() -> None:
    """Free what finished work left behind: Lightning's trainer and module reference each
    other, so only the garbage collector frees a finished fit; then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def unquantized_reference(
    cfg: DictConfig, task: Task, datamodule: L.LightningDataModule, device: torch.device
) -> tuple[dict[str, float], str | None]:
    """The pre-trained model's metric on the test split, unquantized and without adapters, on
    ``device`` (where the run trained): a reference line for language modelling (a fresh
    classification head means nothing). Returns it by label, and the device it ran on."""
    if task.kind != "language_modeling":
        return {}, None
    model = load_backbone(cfg.model).eval().to(device)
    value = score_model(
        model, datamodule.test_dataloader(), build_metric(task), task.metric_inputs
    )[0]
    return {"unquantized": value}, str(next(model.parameters()).device)


def write_reports(
    cfg: DictConfig,
    task: Task,
    results: list[RunResult],
    out_dir: Path,
    reference: dict[str, float] | None = None,
    score: Callable[[float], float] | None = None,
    memory: dict[str, float | None] | None = None,
    reference_device: str | None = None,
) -> dict[str, Any]:
    """``eval/results.{csv,json}``, ``eval/accuracy_vs_bits.png`` and ``summary.json``.

    The summary's ``hv`` is the hypervolume of the split methods are compared on: ``unseen``
    configurations for one-run methods, each budget's own allocation (``seen``) for
    per-budget methods, of the metric or of its ``score`` (see :func:`hv_score`).
    ``train_seconds`` is the total over runs, the cost of serving every evaluation budget.
    ``reference`` holds metrics drawn as reference lines (see :func:`unquantized_reference`);
    ``memory`` the peak memory of training and evaluation (:class:`coalora.memory.PeakMemory`).
    ``device`` is where the first run trained and was evaluated (each run's own is in
    ``runs``, with its frozen target weights' MiB as stored), ``reference_device`` where the
    reference was scored.
    """
    records = [r for result in results for r in result.records]
    eval_dir = out_dir / "eval"
    write_results(records, eval_dir)
    write_configurations([c for result in results for c in result.configs], eval_dir)
    plot_metric_vs_bits(
        records,
        eval_dir / "accuracy_vs_bits.png",
        title=f"{task.name} · {cfg.model.name}",
        reference=reference,
    )
    per_budget = results[0].run.budget is not None
    split = "seen" if per_budget else "unseen"
    summaries = {
        s: summarize(records, s, score)[cfg.method.name]
        for s in SPLITS
        if any(r.split == s for r in records)
    }
    summary = {
        "method": cfg.method.name,
        "task": task.name,
        "model": cfg.model.name,
        "quant": cfg.quant.fmt,
        "compared_split": split,
        "hv": summaries[split]["hv"],
        "metric": task.metric,
        "hv_of": "1 - ln(perplexity) / ln(vocab_size)" if score else task.metric,
        "values": summaries[split]["values"],
        "reference": reference or {},
        "reference_device": reference_device,
        "hypervolume": {s: v["hv"] for s, v in summaries.items()},
        "device": results[0].device,
        "train_seconds": sum(r.train_seconds for r in results),
        "eval_seconds": sum(r.eval_seconds for r in results),
        "runs": [
            {
                "name": r.run.name,
                "budget": r.run.budget,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds,
                "training_configurations": r.training_configurations,
                "configurations_trained_on": r.configurations_trained_on,
                "device": r.device,
                "frozen_target_mib": r.frozen_mib,
            }
            for r in results
        ],
        "trainable_parameters": results[0].trainable_parameters,
        "memory": memory or {},
        "results": [r.__dict__ for r in records],
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


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


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a Hydra ``--multirun`` whose trainer would re-launch the script for its other
    processes (strategy ``ddp`` without a launcher that starts one process per device, e.g.
    SLURM tasks): each re-launched process would run the whole sweep again."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = trainer.strategy.launcher
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise ValueError(
            f"strategy={type(trainer.strategy).__name__} with {trainer.num_devices} devices "
            "re-launches `python -m coalora.run` for its other processes, which cannot be done "
            "inside --multirun: run each job on its own, or sweep with a launcher that starts "
            "one process per device (hydra/launcher=submitit_slurm with "
            "hydra.launcher.tasks_per_node=<devices>)"
        )


def quiet_console_off_rank_zero() -> None:
    """On a process of a multi-process run other than rank 0 (from the launcher's environment:
    ``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``), show only warnings and errors on the console;
    its Hydra log file (``train_ddp_process_<k>.log`` in the run folder) keeps everything."""
    if rank_zero_only.rank == 0:
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(max(handler.level, logging.WARNING))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    quiet_console_off_rank_zero()
    with reported_errors(interrupted="the run stopped before its evaluation"):
        return train(cfg).get("hv")  # None on ranks other than 0


if __name__ == "__main__":
    main()
