"""What a run folder keeps for serving: its resolved config, the error table, the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalora.io import atomic_write, atomic_write_text
from coalora.quant import ErrorTable

RUN_CONFIG_NAME = "run_config.json"
"""The run's resolved configuration (model, quant, method, task, data) and its label count."""
ERROR_TABLE_NAME = "error_table.pt"
"""A copy of the error table the run allocated from, so serving never rebuilds it."""
CHECKPOINT_PATH = Path("checkpoints") / "last.ckpt"


def write_serving_files(
    out_dir: str | Path, config: Mapping[str, Any], num_labels: int | None, table: ErrorTable
) -> None:
    """Write :data:`RUN_CONFIG_NAME` and :data:`ERROR_TABLE_NAME` into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / RUN_CONFIG_NAME,
        json.dumps({"config": config, "num_labels": num_labels}, indent=1),
    )
    atomic_write(out_dir / ERROR_TABLE_NAME, table.save)


@dataclass(frozen=True)
class RunFiles:
    """The serving inputs of one trained run.

    Attributes:
        run_dir: the run folder.
        config: its resolved configuration (``model``, ``quant``, ``method``, ``task``, ...).
        num_labels: size of the task head (None for a language model).
        table: the error table the run allocated from.
        state_dict: the trainable weights of the checkpoint (LoRA factors, θ, task head),
            keyed as in :class:`coalora.model.backbone.QuantizedLoRAModel`.
    """

    run_dir: Path
    config: dict[str, Any]
    num_labels: int | None
    table: ErrorTable
    state_dict: dict[str, torch.Tensor]


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder written by ``python -m coalora.run``; a clear error if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    checkpoint = run_dir / CHECKPOINT_PATH
    if not checkpoint.is_file():
        budgets = sorted(
            p.name for p in run_dir.glob("budget_*") if (p / CHECKPOINT_PATH).is_file()
        )
        hint = (
            f"; this method trained one model per budget: serve one of {budgets} inside it"
            if budgets
            else "; serving needs a run that finished at least one epoch"
        )
        raise FileNotFoundError(f"{run_dir} has no checkpoint {CHECKPOINT_PATH}{hint}")
    missing = [n for n in (RUN_CONFIG_NAME, ERROR_TABLE_NAME) if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} lacks {missing}: it was written by a coalora version without serving "
            "support; train it again to serve it"
        )
    saved = json.loads((run_dir / RUN_CONFIG_NAME).read_text())
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as err:  # a truncated or foreign file: name it
        raise ValueError(f"cannot read the checkpoint {checkpoint}: {err}") from err
    prefix = "model."
    return RunFiles(
        run_dir=run_dir,
        config=saved["config"],
        num_labels=saved["num_labels"],
        table=ErrorTable.load(run_dir / ERROR_TABLE_NAME),
        state_dict={k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
    )
