"""The training pipeline: the error table, then each fit of a method with its evaluation."""

from __future__ import annotations

import copy
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import coalora.resolvers  # noqa: F401  (registers the config resolvers)
from coalora.checkpoint_io import full_parameters
from coalora.checkpoints import finished_epochs, run_identity
from coalora.cli import check_launch
from coalora.data import Task, build_metric
from coalora.evaluation.evaluate import evaluate_configurations, score_model
from coalora.fit_results import fit_settings, load_fit_result, save_fit_result, stopped_attempt
from coalora.methods import LoraInit, TrainingPlan, TrainingRun
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_backbone
from coalora.model.targets import find_targets, target_weights
from coalora.module import CoALoRAModule
from coalora.quant import ConfigSpace, ErrorTable, cached_error_table, diagonal_fisher
from coalora.serve.run_files import write_serving_files
from coalora.summary import RunResult
from coalora.wandb_logging import log_to_wandb, wandb_run_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Experiment:
    """What every fit of a run shares, built once by :func:`coalora.run.train`.

    ``cfg`` is the run's configuration: the model, trainer, loggers, callbacks, search and
    paths each fit is built from, and what ``run_config.json`` records for serving.
    """

    cfg: DictConfig
    task: Task
    datamodule: L.LightningDataModule
    table: ErrorTable
    space: ConfigSpace
    plan: TrainingPlan
    init: LoraInit


def estimate_fisher(
    batches: int, module_types: list[str] | None, backbone: torch.nn.Module, datamodule
) -> dict[str, torch.Tensor] | None:
    """Diagonal Fisher of the pre-trained backbone's target weights on the first ``batches``
    training batches (``quant.fisher_batches``; 0 disables weighting). The task head is still
    untrained here."""
    if batches <= 0:
        return None
    loader = datamodule.train_dataloader()
    first = [b for _, b in zip(range(batches), loader, strict=False)]
    targets = find_targets(backbone, module_types)
    weights = {t.name: backbone.get_submodule(t.name).weight for t in targets}
    return diagonal_fisher(backbone, weights, first)


def load_error_table(cfg: DictConfig, datamodule: L.LightningDataModule) -> ErrorTable:
    """The pre-trained model's error table (cached on disk), computed on the
    training device; ``quant.table_sample_fraction`` estimates it on a fraction of the weights."""
    from coalora.device import training_device

    backbone = load_backbone(cfg.model, datamodule.num_labels).to(training_device(cfg.trainer))
    fisher = estimate_fisher(cfg.quant.fisher_batches, cfg.model.module_types, backbone, datamodule)
    weights = target_weights(backbone, find_targets(backbone, cfg.model.module_types))
    return cached_error_table(
        weights,
        cfg.quant.fmt,
        cfg.paths.cache_dir,
        cfg.model.name,
        fisher,
        sample_fraction=cfg.quant.get("table_sample_fraction"),
    )


def make_trainer(
    cfg: DictConfig, space: ConfigSpace, run: TrainingRun
) -> tuple[L.Trainer, list[Logger]]:
    """The trainer with the configured loggers and callbacks (the search callback first); a
    callback set to null (``callbacks.early_stopping=null``) is left out.

    A per-budget run's W&B run is named after the method's with the run's name appended
    (``...-budget_3.0``); the runs of one method share the configured ``group``."""
    loggers = [instantiate(c, **wandb_run_name(c, run)) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.search.get("callback"):
        search = instantiate(cfg.search.strategy, _partial_=True)(space, run.train_configs)
        callbacks.insert(0, instantiate(cfg.search.callback, _partial_=True)(search))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    check_launch(trainer)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, loggers


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
    return (
        f"{where}; the checkpoint of its first {finished_epochs(last)} finished epoch(s) is "
        f"kept: resume with the same settings and {resume_arguments(last, run)}"
    )


def resume_arguments(last: Path, run: TrainingRun) -> str:
    """The overrides that resume a fit from its ``last.ckpt``: a per-budget fit resumes alone,
    in its run's folder (``<run>/<fit>/checkpoints/last.ckpt``), where the whole run, started
    again, then reads it."""
    last = last.resolve()
    if run.budget is None:
        return f"ckpt_path={last}"
    return f"ckpt_path={last} eval.budgets=[{run.budget}] hydra.run.dir={last.parents[2]}"


def build_module(exp: Experiment, run: TrainingRun, model: QuantizedLoRAModel) -> CoALoRAModule:
    """The LightningModule of one fit: the method's optimizer, k and clipping, the run's
    training and validation configurations, and the identity its checkpoints carry."""
    cfg, method = exp.cfg, exp.cfg.method
    identity = run_identity(
        cfg.model.name,
        exp.task.name,
        cfg.quant.fmt,
        method.name,
        method.rank,
        method.alpha,
        method.get("residual_rank", 0),
        options=len(model.options),
        targets=len(model.targets),
    )
    return CoALoRAModule(
        model,
        optimizer=instantiate(method.optimizer),
        train_configs=run.train_configs,
        val_configs=exp.plan.val_configs(exp.space, run, cfg.eval.val_budgets),
        metric=build_metric(exp.task),
        metric_inputs=exp.task.metric_inputs,
        configs_per_step=method.configs_per_step,
        seed=cfg.seed,
        identity=identity,
        gradient_clip_val=method.gradient_clip_val,
        theta_lr_scale=method.get("theta_lr_scale", 1.0),
    )


def fit_and_evaluate(exp: Experiment, run: TrainingRun) -> RunResult:
    """Train one run and evaluate it on the configurations its plan names. Training time
    counts the LoRA initialisation, the fit and the search; loggers, checkpoints and search
    reports go to the run's folder."""
    cfg, task, datamodule = fit_config(exp.cfg, run), exp.task, exp.datamodule
    L.seed_everything(cfg.seed, workers=True)
    model = QuantizedLoRAModel.from_run_config(load_backbone(cfg.model, datamodule.num_labels), cfg)
    start = time.perf_counter()
    exp.init.apply(model, exp.space, exp.plan, run)
    fixed = exp.plan.fixed_configuration(run)
    if fixed is not None:  # one configuration: keep its packed codes only (QLoRA's memory)
        model.keep_only(fixed)
    module = build_module(exp, run, model)
    trainer, loggers = make_trainer(cfg, exp.space, run)
    if trainer.is_global_zero:
        config = OmegaConf.to_container(cfg, resolve=True)
        write_serving_files(cfg.paths.output_dir, config, datamodule.num_labels, exp.table)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SystemExit:  # Lightning exits after a KeyboardInterrupt (Ctrl+C, SIGINT)
        if trainer.interrupted:
            raise TrainingInterrupted(interruption_message(trainer, run)) from None
        raise
    train_seconds = time.perf_counter() - start
    best_epoch = restore_best_epoch(trainer, module)
    device = trainer.strategy.root_device
    model.to(device)  # Lightning moves the model back to the CPU when fit ends
    with full_parameters(trainer):
        if not trainer.is_global_zero:  # several processes: rank 0 alone evaluates
            return RunResult(run, [], [], train_seconds, 0.0, {}, 0, 0, str(device))
        frozen_mib = model.frozen_nbytes() / 2**20
        start = time.perf_counter()
        configs = exp.plan.eval_configs(
            exp.space, run, cfg.eval.budgets, module.epoch_configs, module.trained_configs
        )
        records, examples = evaluate_configurations(
            model,
            datamodule.test_dataloader(),
            build_metric(task),
            configs,
            cfg.method.name,
            task.metric,
            task.metric_inputs,
            example_stats=task.example_stats,
        )
        validation, _ = evaluate_configurations(
            model,
            datamodule.val_dataloader(),
            build_metric(task),
            configs,
            cfg.method.name,
            task.metric,
            task.metric_inputs,
        )
        adapter_reference = None if fixed is not None else unquantized_score(exp, model)
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
        adapter_reference,
        examples,
        validation,
        best_epoch,
    )


def restore_best_epoch(trainer: L.Trainer, module: CoALoRAModule) -> int | None:
    """Load the epoch whose validation metric was best (the checkpoint callback's
    ``monitor``) into ``module`` before evaluation: its trainable weights and the training
    configurations it had. Returns that epoch (counting from 0), or None when no checkpoint
    monitors a metric (the last epoch is evaluated)."""
    callback = trainer.checkpoint_callback
    best = Path(getattr(callback, "best_model_path", "") or "")
    if callback is None or callback.monitor is None or not best.is_file():
        return None
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.on_load_checkpoint(checkpoint)
    return int(checkpoint["epoch"])


@torch.no_grad()
def unquantized_score(exp: Experiment, model: QuantizedLoRAModel) -> float:
    """The test metric of ``model``'s trained adapter on its unquantized master weights (plain
    LoRA: θ's adjustment needs a configuration): the reference its configurations are judged
    by."""
    model.set_unquantized()
    loader = exp.datamodule.test_dataloader()
    return score_model(model, loader, build_metric(exp.task), exp.task.metric_inputs)[0]


def fit_config(cfg: DictConfig, run: TrainingRun) -> DictConfig:
    """The configuration of one fit: a named run (a per-budget fit) writes to its own folder."""
    if not run.name:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / run.name)
    return cfg


def fit_all(exp: Experiment, runs: list[TrainingRun]) -> list[RunResult]:
    """Every fit in turn; each finished fit is freed before the next starts. A fit whose
    folder holds its result (``fit_result.pt``, same settings; see :func:`saved_fits`) is
    read, not trained again, so a run stopped between fits resumes; every fit starts from the
    same seed, so the fits trained after it are the ones an uninterrupted run trains."""
    results = []
    for run, saved in zip(runs, saved_fits(exp.cfg, runs), strict=True):
        result = saved or fit_and_evaluate(exp, run)
        if saved is None and rank_zero_only.rank == 0:
            cfg = fit_config(exp.cfg, run)
            save_fit_result(cfg.paths.output_dir, fit_settings(cfg, run), result)
        results.append(result)
        exp.datamodule.trainer = None  # the shared data module would keep the fit alive
        release_memory()
    return results


def saved_fits(cfg: DictConfig, runs: list[TrainingRun]) -> list[RunResult | None]:
    """Per run, the result an earlier attempt saved in its folder (None: train it), checked
    before any fit trains. Raises one error naming every folder that cannot be resumed: a
    result of other settings, or a stopped attempt's ``checkpoints/last.ckpt`` that
    ``ckpt_path`` does not resume (training again would leave it beside the new one)."""
    saved, problems = [], []
    for run in runs:
        fit_cfg = fit_config(cfg, run)
        folder = Path(fit_cfg.paths.output_dir)
        try:
            saved.append(load_fit_result(folder, fit_settings(fit_cfg, run)))
        except ValueError as err:
            saved.append(None)
            problems.append(str(err))
            continue
        last = stopped_attempt(folder)
        if last is not None and cfg.ckpt_path is None:
            problems.append(
                f"{folder} holds a stopped attempt at this fit: resume it with "
                f"{resume_arguments(last, run)}, or remove {folder} to train it again"
            )
    if problems:
        raise ValueError("; ".join(problems))
    loaded = [run.name or "the fit" for run, result in zip(runs, saved, strict=True) if result]
    if loaded:
        log.warning(
            "read %d finished fit(s) from their folders: %s", len(loaded), ", ".join(loaded)
        )
    return saved


def release_memory() -> None:
    """Free what finished work left behind: Lightning's trainer and module reference each
    other, so only the garbage collector frees a finished fit; then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
