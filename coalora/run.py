"""Hydra entry point: ``python -m coalora.run [overrides]`` trains, evaluates and reports.

It composes the run's objects (task, data, configuration space, the method's plan and
initialisation) and hands them to :mod:`coalora.pipeline`; :mod:`coalora.summary` writes
what the fits produced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

import coalora.resolvers  # noqa: F401  (registers the config resolvers)
from coalora.checkpoints import check_identity, run_identity
from coalora.cli import quiet_console_off_rank_zero, quiet_libraries, reported_errors
from coalora.data import build_task
from coalora.memory import PeakMemory
from coalora.model.hub import check_model_for_task
from coalora.pipeline import Experiment, fit_all, load_error_table
from coalora.preflight import check_data_length, check_settings
from coalora.quant import ConfigSpace
from coalora.summary import (
    console_summary,
    hv_score,
    print_serving_hint,
    unquantized_reference,
    write_reports,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train every run of the method, evaluate, write the reports; returns the summary.

    Several processes (``trainer=ddp``, ``ddp_cpu``): every rank runs this whole function and
    trains; only global rank 0 evaluates and writes the reports, serving files and console
    output (Lightning writes the checkpoints from rank 0); the other ranks return ``{}`` once
    their training is done."""
    plan, init = instantiate(cfg.method.plan), instantiate(cfg.method.init)
    resume = check_settings(cfg, plan, init)
    check_data_length(cfg)
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True))
    check_model_for_task(cfg.model, task.name, task.kind)
    if resume is not None:
        identity = run_identity(
            cfg.model.name, task.name, cfg.quant.fmt, cfg.method.name, cfg.method.rank,
            cfg.method.alpha, cfg.method.get("residual_rank", 0),
        )  # fmt: skip
        try:
            check_identity(resume, identity)
        except ValueError as err:
            raise ValueError(f"ckpt_path={cfg.ckpt_path}: {err}") from None
    datamodule: L.LightningDataModule = instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup()
    table = load_error_table(cfg, datamodule)
    space = ConfigSpace.from_table(table)
    space.check_budgets("eval.budgets", cfg.eval.budgets)
    if plan.searchable:
        space.check_budgets("eval.val_budgets", cfg.eval.val_budgets)
    plan.check_budgets(space)
    plan.check_search(cfg.method.name, cfg.search.name, bool(cfg.search.get("callback")))
    runs = plan.runs(space, cfg.eval.budgets)
    log.info("%d run(s); first trains %d configurations", len(runs), len(runs[0].train_configs))
    exp = Experiment(cfg, task, datamodule, table, space, plan, init)
    with PeakMemory() as memory:
        results = fit_all(exp, runs)
    if rank_zero_only.rank != 0:  # a multi-process run's other ranks only train
        return {}
    out_dir = Path(cfg.paths.output_dir)
    device = torch.device(results[0].device)
    reference, reference_device = unquantized_reference(cfg.model, task, datamodule, device)
    summary = write_reports(
        cfg,
        task,
        results,
        out_dir,
        reference,
        hv_score(task, datamodule),
        memory.as_dict(),
        reference_device,
        plan.compared_split,
    )
    Console().print(console_summary(results, summary, out_dir), soft_wrap=True)
    print_serving_hint(out_dir, [r.run for r in results])
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    quiet_console_off_rank_zero()
    quiet_libraries()
    with reported_errors(interrupted="the run stopped before its evaluation"):
        return train(cfg).get("hv")  # None on ranks other than 0


if __name__ == "__main__":
    main()
