"""Hydra entry point: ``python -m coalora.predict export=<folder> input=<file.tsv|file.txt>``.

Scores every row of a local file with an export folder (see :mod:`coalora.serve.export_format`)
and writes the rows, unchanged, with a ``prediction`` (label name) and its ``probability``; when
the file has the task's label column, prints the accuracy. The arguments, the export and the
input are checked before the model is loaded; an existing output is never replaced unless
``overwrite=true`` and it is a predictions file written earlier.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from transformers import AutoConfig, AutoTokenizer

from coalora.cli import reported_errors
from coalora.io import atomic_write_text, read_utf8
from coalora.serve.export_load import load_export
from coalora.serve.export_verify import verify_export
from coalora.serve.positions import check_max_length

PREDICTION_COLUMNS = ("prediction", "probability")
"""The columns predict adds after the input's; a file whose header ends with them is one it
wrote (and may replace with ``overwrite=true``)."""


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a TSV file (a ``.txt`` file: header ``text``, one row per non-blank
    line), each field exactly as in the file."""
    if path.is_dir():
        raise ValueError(f"input={path} is a folder; give a .tsv or .txt file")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    text = read_utf8(path)
    if path.suffix == ".txt":
        header, rows = ["text"], []
        for number, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if "\t" in line or "\r" in line:
                raise ValueError(
                    f"{path}, line {number}: a tab or carriage return inside a text cannot be "
                    "written back unchanged in the predictions TSV; replace it with a space"
                )
            if line.strip():
                rows.append([line])
    else:
        table = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
        if not table:
            raise ValueError(
                f"{path} is empty: it needs a header row naming its columns and one row per example"
            )
        header, *rows = table
    if not rows:
        raise ValueError(f"{path} has no examples to score")
    for number, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(row)} fields, the header has {len(header)}"
            )
    return header, rows


def column(header: Sequence[str], name: str, path: Path) -> int:
    if name not in header:
        raise ValueError(f"{path} has no column {name!r}; its columns are {list(header)}")
    return header.index(name)


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a TSV file whose header ends with :data:`PREDICTION_COLUMNS`."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            first = f.readline(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    return first.rstrip("\r\n").split("\t")[-2:] == list(PREDICTION_COLUMNS)


def check_output(out: Path, input_file: Path, export: Path, overwrite: bool) -> None:
    """Refuse an output that would replace a user's file: the input itself, a file inside the
    export, a folder or link, or an existing file unless ``overwrite`` and it is a predictions
    file (:func:`is_predictions_file`)."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r} must be true or false")
    if out.resolve().parent == export.resolve():
        raise ValueError(
            f"out={out} is inside the export folder, which holds only the export's files: "
            "choose a file elsewhere"
        )
    if out.is_symlink() or out.is_dir():
        raise FileExistsError(f"out={out} is a link or a folder; choose a file name")
    if not out.exists():
        return
    if out.samefile(input_file):
        raise ValueError(
            f"out={out} is the input file; predictions are never written over their input: "
            "choose another file"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another file with out=, or overwrite=true to replace "
            "predictions written earlier by coalora.predict"
        )
    if not is_predictions_file(out):
        raise FileExistsError(
            "overwrite=true replaces only a predictions file written by coalora.predict (its "
            f"header ends with {', '.join(PREDICTION_COLUMNS)}), but {out} is not one; nothing "
            "was written: choose another file"
        )


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


@torch.no_grad()
def predict_file(
    export: str | Path,
    input_file: str | Path,
    out: str | Path | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Score ``input_file`` with the export.

    Args:
        export: the export folder.
        input_file: a TSV file with a header row, or a ``.txt`` file with one text per line.
        out: the predictions file (default ``<input>.predictions.tsv``).
        text_columns: the columns holding the texts (default: the task's).
        label_column: the column of the labels (default: the task's, used when present).
        batch_size: rows scored at a time.
        overwrite: replace an existing ``out`` written earlier by predict.
        max_length: tokens per input, longer ones truncated (default: the export's).

    Returns the output path (``out``), the row count (``rows``), the number of inputs longer
    than ``max_length`` that were truncated (``truncated``) and, with labels, the accuracy.
    """
    export, path = Path(export), Path(input_file)
    check_count("batch_size", batch_size)
    spec = verify_export(export)
    task = spec["task_spec"]
    if "label_names" not in task:
        raise ValueError(f"{export} is not a text classifier: nothing to predict labels with")
    header, rows = read_rows(path)
    default = (
        ["text"] if path.suffix == ".txt" else task.get("text_columns") or task.get("text_fields")
    )
    names = list(text_columns or default or [])
    if not 1 <= len(names) <= 2:
        raise ValueError(f"text_columns={names} must name one text column or a pair of them")
    texts = [column(header, n, path) for n in names]
    label_name = label_column or task.get("label_column")
    labels = column(header, label_name, path) if label_column or label_name in header else None
    values = list(task.get("label_values") or task["label_names"])
    if labels is not None:
        unknown = sorted({row[labels] for row in rows} - set(values))
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not among the task's {values}")
    out = Path(out) if out else path.with_suffix(".predictions.tsv")
    check_output(out, path, export, overwrite)
    length = spec["max_length"] if max_length is None else max_length
    model_config = AutoConfig.from_pretrained(export)
    try:
        check_max_length(length, model_config, "max_length", spec.get("model_name"))
    except ValueError as err:
        if max_length is not None:
            raise
        raise ValueError(
            f"export {export}: {err} (the export's own, its run's data.max_length; give "
            "max_length=<n> to score with fewer tokens)"
        ) from None

    model, tokenizer = load_export(export), AutoTokenizer.from_pretrained(export)
    probabilities, truncated = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = [[row[i] for row in rows[start : start + batch_size]] for i in texts]
        full = tokenizer(*chunk, verbose=False)["input_ids"]
        truncated += sum(len(ids) > length for ids in full)
        inputs = tokenizer(
            *chunk, truncation=True, max_length=length, padding=True, return_tensors="pt"
        )
        probabilities.append(model(**inputs).logits.softmax(-1))
    probability, predicted = torch.cat(probabilities).max(-1)
    result: dict[str, Any] = {"rows": len(rows), "truncated": truncated, "max_length": length}
    if labels is not None:
        truth = torch.tensor([values.index(row[labels]) for row in rows])
        result["accuracy"] = (predicted == truth).float().mean().item()
    lines = ["\t".join([*header, *PREDICTION_COLUMNS])]
    for row, j, p in zip(rows, predicted.tolist(), probability.tolist(), strict=True):
        lines.append("\t".join([*row, task["label_names"][j], f"{p:.4f}"]))
    result["out"] = atomic_write_text(out, "\n".join(lines) + "\n")
    return result


def summary_line(result: dict[str, Any]) -> str:
    """What ``python -m coalora.predict`` prints of :func:`predict_file`'s result."""
    accuracy = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    line = f"scored {result['rows']} rows{accuracy}: {result['out']}"
    if result["truncated"]:
        line += (
            f" ({result['truncated']} of {result['rows']} inputs were longer than "
            f"{result['max_length']} tokens and were truncated to them)"
        )
    return line


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with reported_errors(interrupted="nothing was written"):
        columns = cfg.text_columns
        columns = OmegaConf.to_container(columns) if OmegaConf.is_config(columns) else columns
        if columns is not None and (
            not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)
        ):
            raise ValueError(f"text_columns={columns!r} must be a list of column names")
        result = predict_file(
            str(cfg.export),
            str(cfg.input),
            None if cfg.out is None else str(cfg.out),
            columns,
            cfg.label_column,
            cfg.batch_size,
            cfg.overwrite,
            cfg.max_length,
        )
        Console().print(summary_line(result), soft_wrap=True)


if __name__ == "__main__":
    main()
