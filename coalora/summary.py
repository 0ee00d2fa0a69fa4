"""What a run reports: ``eval/results.{csv,json}``, the metric-vs-bits plot, ``summary.json``,
the unquantized reference, and the serving hint on the console."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console

from coalora.data import Task, build_metric
from coalora.evaluation.evaluate import score_model
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
from coalora.io import atomic_write, atomic_write_text
from coalora.model.hub import load_backbone
from coalora.selection import EvalConfig

EXAMPLES_NAME = "examples.npz"

if TYPE_CHECKING:
    from coalora.methods import TrainingRun


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
    adapter_reference: float | None = None
    """The test metric of the trained adapter on the unquantized backbone (plain LoRA, no
    adjustment by θ); None for a fit that keeps only one configuration's packed weights."""
    examples: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    """Per record, its per-example test statistics (``Task.example_stats``)."""
    validation: list[EvalRecord] = dataclasses.field(default_factory=list)
    """The same configurations scored on the validation split (carved from training data)."""
    best_epoch: int | None = None
    """The epoch evaluated when the best validation epoch was restored (None: the last)."""
    loaded: bool = False
    """Read from the fit's folder by a resumed run (:mod:`coalora.fit_results`), not trained
    by this process."""


def hv_score(task: Task, datamodule: L.LightningDataModule) -> functools.partial | None:
    """What the hypervolume measures of a metric value: the value itself (accuracy, F1, ...), or
    for perplexity ``s = 1 − ln(ppl) / ln(V)`` (V the vocabulary size; a uniform model scores
    0, a perfect one 1)."""
    if task.metric != "perplexity":
        return None
    return functools.partial(perplexity_score, vocab_size=datamodule.vocab_size)


@torch.no_grad()
def unquantized_reference(
    model_cfg: DictConfig, task: Task, datamodule: L.LightningDataModule, device: torch.device
) -> tuple[dict[str, float], str | None]:
    """The pre-trained model's metric on the test split, unquantized and without adapters, on
    ``device`` (where the run trained): a reference line for language modelling (a fresh
    classification head means nothing). Returns it by label, and the device it ran on."""
    if task.kind != "language_modeling":
        return {}, None
    model = load_backbone(model_cfg).eval().to(device)
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
    score: functools.partial | None = None,
    memory: dict[str, float | None] | None = None,
    reference_device: str | None = None,
    split: str = "unseen",
) -> dict[str, Any]:
    """``eval/results.{csv,json}``, ``eval/accuracy_vs_bits.png`` and ``summary.json``.

    The summary's ``hv`` is the hypervolume of the split methods are compared on: ``unseen``
    configurations for one-run methods, each budget's own allocation (``seen``) for
    per-budget methods, of the metric or of its ``score`` (see :func:`hv_score`).
    ``train_seconds`` is the total over runs, the cost of serving every evaluation budget.
    ``reference`` holds metrics drawn as reference lines (see :func:`unquantized_reference`);
    ``memory`` the peak memory of training and evaluation (:class:`coalora.memory.PeakMemory`;
    a resumed run's fits read from disk are not in it).
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
    write_examples(results, eval_dir / EXAMPLES_NAME)
    summaries = {
        s: summarize(records, s, score)[cfg.method.name]
        for s in SPLITS
        if any(r.split == s for r in records)
    }
    validation = [r for result in results for r in result.validation]
    on_validation = summarize(validation, split, score)[cfg.method.name] if validation else {}
    summary = {
        "method": cfg.method.name,
        "task": task.name,
        "model": cfg.model.name,
        "quant": cfg.quant.fmt,
        "compared_split": split,
        "hv": summaries[split]["hv"],
        "metric": task.metric,
        "hv_of": "1 - ln(perplexity) / ln(vocab_size)" if score else task.metric,
        "vocab_size": score.keywords["vocab_size"] if score else None,
        "values": summaries[split]["values"],
        "reference": reference or {},
        "reference_device": reference_device,
        "adapter_on_unquantized": results[0].adapter_reference,
        "hypervolume": {s: v["hv"] for s, v in summaries.items()},
        "validation": on_validation,
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
                "best_epoch": r.best_epoch,
                "loaded": r.loaded,
            }
            for r in results
        ],
        "trainable_parameters": results[0].trainable_parameters,
        "memory": memory or {},
        "results": [r.__dict__ for r in records],
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def example_key(record: EvalRecord) -> str:
    """The name of a record's per-example statistics in ``eval/examples.npz``."""
    return f"{record.split}/{record.target_budget:g}"


def write_examples(results: list[RunResult], path: Path) -> None:
    """``eval/examples.npz``: per scored configuration (``<split>/<budget>``), the ``(examples,
    2)`` statistics its test metric is computed from, for bootstrap intervals
    (:mod:`coalora.evaluation.resampling`)."""
    arrays = {
        example_key(record): rows
        for result in results
        for record, rows in zip(result.records, result.examples, strict=True)
        if rows is not None
    }

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: numpy would append .npz to a name
            np.savez_compressed(handle, **arrays)

    atomic_write(path, save)


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


SPLIT_LEGEND = {
    "unseen": "unseen: each budget's allocation, never trained on · seen: the training "
    "configuration nearest each budget",
    "seen": "seen: each budget's own allocation, the configuration its fit trained on",
}
"""What the table's splits mean, by the split methods are compared on."""


def console_summary(results: list[RunResult], summary: dict[str, Any], out_dir: Path) -> str:
    """The results table with what its columns mean, the reference it can be judged by, and
    the hypervolume line, as printed at the end of a run."""
    records = [r for result in results for r in result.records]
    metric = summary["metric"]
    reference = results[0].adapter_reference
    judged_by = (
        f"reference: the same trained adapter on the unquantized backbone scores {metric} "
        f"{reference:.4f}"
        if reference is not None
        else "reference: none (each per-budget fit keeps only its own packed weights)"
    )
    return "\n".join(
        [
            results_table(records),
            SPLIT_LEGEND[summary["compared_split"]],
            judged_by,
            f"hypervolume ({summary['compared_split']}) {summary['hv']:.4f} · "
            f"train {summary['train_seconds']:.0f} s · eval {summary['eval_seconds']:.0f} s · "
            f"outputs {out_dir}",
        ]
    )
