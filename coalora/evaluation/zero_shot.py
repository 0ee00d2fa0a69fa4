"""Zero-shot downstream evaluation of a served model with lm-evaluation-harness.

The harness is an optional dependency (``pip install 'coalora[zeroshot]'``); its built-in tasks
download their data from the Hugging Face hub, while local task YAML files found under
``include_path`` run offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

INSTALL_HINT = "pip install 'coalora[zeroshot]'"


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    device: str = "cpu",
    add_special_tokens: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Per task (and task group) its metrics, e.g. ``{"hellaswag": {"acc": .., "acc_norm": ..}}``.

    Args:
        model: a transformers causal language model object, such as
            ``Deployment.from_run(run_dir).at(bits=...)`` or ``load_export(folder)``; it is moved
            to ``device`` and put in eval mode.
        tokenizer: the model's tokenizer.
        tasks: harness task, group or tag names (``lm-eval ls tasks`` lists them), including
            those defined by YAML files under ``include_path``.
        batch_size: requests scored per forward pass.
        limit: at most this many examples per task (an int ≥ 1), or this fraction of them (a
            float in (0, 1)); None evaluates every example.
        include_path: a folder of extra task YAML files.
        device: where the model runs ("cpu", "cuda", "cuda:0", ...).
        add_special_tokens: whether encoding adds the tokenizer's special tokens; None keeps the
            tokenizer's default (a BOS token for LLaMA-style tokenizers), False suits tokenizers
            that wrap text in end markers (BERT's ``[CLS] … [SEP]``).

    Metric names are the harness's (``acc``, ``acc_stderr``, ...); a metric computed after a
    non-default filter keeps the harness's ``metric,filter`` name. Standard errors that the
    harness could not compute ("N/A") are left out.
    """
    if not tasks:
        raise ValueError("tasks is empty; name at least one harness task (see `lm-eval ls tasks`)")
    if not all(isinstance(task, str) for task in tasks):
        raise TypeError(f"tasks must be task names (str), got {tasks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None and not (
        (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
        or (isinstance(limit, float) and 0.0 < limit < 1.0)
    ):
        raise ValueError(f"limit must be None, an int >= 1 or a fraction in (0, 1), got {limit!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"include_path {str(include_path)!r} is not a folder")

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise ImportError(
            f"zero-shot evaluation needs lm-evaluation-harness (missing module {err.name!r}): "
            f"{INSTALL_HINT}"
        ) from err

    task_manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        where = "" if include_path is None else f" or under include_path {str(include_path)!r}"
        raise ValueError(
            f"unknown task(s) {unknown}: not harness tasks{where}; list the available ones with "
            "`lm-eval ls tasks` (add `--include_path DIR` for local task YAML files)"
        )

    lm = HFLM(
        pretrained=model.to(device),
        tokenizer=tokenizer,
        batch_size=batch_size,
        add_bos_token=add_special_tokens,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
    )
    return {name: _metrics(row) for name, row in results["results"].items()}


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """The metrics of one task's harness result row (its ``metric,filter`` entries; the others
    are the task's name, alias and sample count), keyed by metric name."""
    metrics = {}
    for key, value in row.items():
        metric, comma, filter_name = key.partition(",")
        if comma and value != "N/A":
            metrics[metric if filter_name == "none" else key] = float(value)
    return metrics
