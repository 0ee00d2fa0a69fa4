"""What a run folder keeps for serving: its resolved config, the error table, the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig

from coalora.checkpoints import IDENTITY_DEFAULTS, read_checkpoint
from coalora.io import atomic_write, atomic_write_text, load_torch_file, read_json
from coalora.quant import ErrorTable
from coalora.serve.positions import check_max_length

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


IDENTITY_SETTINGS = {
    "model": "model.name",
    "task": "task.name",
    "quant": "quant.fmt",
    "method": "method.name",
    "rank": "method.rank",
    "alpha": "method.alpha",
    "residual_rank": "method.residual_rank",
}
"""Where :data:`RUN_CONFIG_NAME` holds each entry of a checkpoint's recorded identity
(``coalora.checkpoints.run_identity``); ``options`` and ``targets`` are checked against the
error table."""
RECORDED_DATA_SETTINGS = ("max_length", "tokenizer_path")
"""``data.*`` settings the checkpoint's data-module record holds and serving depends on."""
MISSING = "missing"


def setting(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of ``a.b`` in a nested mapping; :data:`MISSING` when it is absent."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def check_run_config(
    run_dir: Path, config: Mapping[str, Any], checkpoint: Mapping[str, Any], table: ErrorTable
) -> None:
    """Refuse a :data:`RUN_CONFIG_NAME` that disagrees with what the checkpoint recorded when it
    was trained: every entry of its identity (model, task, format, method, rank, alpha,
    residual rank, the size of the option space and the number of target matrices) and the
    data settings of :data:`RECORDED_DATA_SETTINGS`. Serving builds the model from the file, so
    an edit would change the served model silently. Entries a checkpoint does not record are
    not checked (checkpoints written before ``alpha`` was recorded keep ``method.alpha``
    unchecked), except those of ``IDENTITY_DEFAULTS``, which it had at their default, as a
    file without them has."""
    identity = checkpoint["coalora"].get("identity")
    identity = IDENTITY_DEFAULTS | (identity if isinstance(identity, Mapping) else {})
    differences = []
    for key, saved in identity.items():
        if key in IDENTITY_SETTINGS:
            name, value = IDENTITY_SETTINGS[key], setting(config, IDENTITY_SETTINGS[key])
            if value == MISSING and key in IDENTITY_DEFAULTS:
                value = IDENTITY_DEFAULTS[key]
            if value != saved:
                differences.append(f"{name} is {value!r} there, {saved!r} in the checkpoint")
        elif key in ("options", "targets"):
            value = len(table.options) if key == "options" else len(table.names)
            if value != saved:
                differences.append(
                    f"{ERROR_TABLE_NAME} has {value} {key}, the checkpoint's model {saved}"
                )
    data = checkpoint.get("datamodule_hyper_parameters")
    for key in RECORDED_DATA_SETTINGS if isinstance(data, Mapping) else ():
        value = setting(config, f"data.{key}")
        if key in data and value != data[key]:
            differences.append(f"data.{key} is {value!r} there, {data[key]!r} in the checkpoint")
    if differences:
        raise ValueError(
            f"{run_dir / RUN_CONFIG_NAME} does not match the run's checkpoint {CHECKPOINT_PATH}: "
            + "; ".join(differences)
            + f". Restore the run's own {RUN_CONFIG_NAME}, or train a run with these settings"
        )


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], int | None]:
    """The resolved configuration and label count of :data:`RUN_CONFIG_NAME`."""
    path = run_dir / RUN_CONFIG_NAME
    saved = read_json(path)
    config = saved.get("config") if isinstance(saved, dict) else None
    sections = ("model", "quant", "method", "task", "data")
    missing = [k for k in sections if not isinstance(setting(config or {}, k), Mapping)]
    num_labels = saved.get("num_labels") if isinstance(saved, dict) else None
    if (
        config is None
        or missing
        or not isinstance(setting(config, "model.name_or_path"), str)
        or not (num_labels is None or type(num_labels) is int)
    ):
        raise ValueError(
            f"{path} is not a run configuration written by coalora (it needs 'config' with the "
            f"sections {list(sections)} and model.name_or_path, and 'num_labels')"
        )
    return config, num_labels


def read_error_table(path: Path) -> ErrorTable:
    """The error table of a run, read without running pickled code."""
    load_torch_file(path, f"cannot read the error table {path}")
    try:
        return ErrorTable.load(path)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(
            f"cannot read the error table {path}: not an error table written by coalora ({err})"
        ) from None


def check_model_positions(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuse a run whose ``data.max_length`` exceeds its model's token positions, reading the
    model's configuration only (not its weights)."""
    model = config["model"]
    gguf = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
    try:
        model_config = AutoConfig.from_pretrained(model["name_or_path"], **gguf)
    except (OSError, ValueError) as err:
        where = f"cannot load the model of {run_dir / RUN_CONFIG_NAME}: model.name_or_path="
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if Path(str(model["name_or_path"])).is_dir():
            raise ValueError(f"{where}{model['name_or_path']!r}: {reason}") from None
        why = "the hub is offline: HF_HUB_OFFLINE=1" if hub_constants.HF_HUB_OFFLINE else reason
        raise ValueError(
            f"{where}{model['name_or_path']!r} is neither a local model folder nor a model in "
            f"the hub cache ({why})"
        ) from None
    try:
        check_max_length(
            config["data"].get("max_length"), model_config, "data.max_length", model.get("name")
        )
    except ValueError as err:
        raise ValueError(
            f"{run_dir / RUN_CONFIG_NAME}: {err}; this run cannot be served: train it again "
            "with a data.max_length the model covers"
        ) from None


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder written by ``python -m coalora.run``; a clear error if it is not one,
    if its files are unsafe or disagree (:func:`check_run_config`), or if its ``max_length``
    exceeds the model's positions: all before any model is loaded."""
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
    config, num_labels = read_run_config(run_dir)
    state = read_checkpoint(checkpoint, f"cannot read the checkpoint {checkpoint}")
    table = read_error_table(run_dir / ERROR_TABLE_NAME)
    check_run_config(run_dir, config, state, table)
    check_model_positions(run_dir, config)
    prefix = "model."
    return RunFiles(
        run_dir=run_dir,
        config=config,
        num_labels=num_labels,
        table=table,
        state_dict={
            k.removeprefix(prefix): v
            for k, v in state["state_dict"].items()
            if k.startswith(prefix)
        },
    )
