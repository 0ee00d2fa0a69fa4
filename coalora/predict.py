"""Hydra entry point: ``python -m coalora.predict export=<folder> input=<file.tsv|file.txt>``.

Scores every row of a local file with an export folder (see :mod:`coalora.serve.export`) and
writes the rows with a ``prediction`` (label name) and its ``probability``; when the file has
the task's label column, prints the accuracy.
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
from transformers import AutoTokenizer

from coalora.io import atomic_write_text, read_utf8
from coalora.serve.export import load_export, verify_export


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a TSV file (a ``.txt`` file: header ``text``, one row per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    text = read_utf8(path)
    if path.suffix == ".txt":
        header, rows = ["text"], [[line] for line in text.splitlines() if line.strip()]
    else:
        header, *rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
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


@torch.no_grad()
def predict_file(
    export: str | Path,
    input_file: str | Path,
    out: str | Path | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score ``input_file`` with the export; returns the output path, row count and accuracy."""
    export, path = Path(export), Path(input_file)
    spec = verify_export(export)
    task = spec["task_spec"]
    if "label_names" not in task:
        raise ValueError(f"{export} is not a text classifier: nothing to predict labels with")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    header, rows = read_rows(path)
    default = ["text"] if path.suffix == ".txt" else task.get("text_columns") or task["text_fields"]
    names = list(text_columns or default)
    texts = [column(header, n, path) for n in names]
    label_name = label_column or task.get("label_column")
    labels = column(header, label_name, path) if label_name in header else None
    model, tokenizer = load_export(export), AutoTokenizer.from_pretrained(export)
    probabilities = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = tokenizer(
            *([row[i] for row in chunk] for i in texts),
            truncation=True,
            max_length=spec["max_length"],
            padding=True,
            return_tensors="pt",
        )
        probabilities.append(model(**inputs).logits.softmax(-1))
    probability, predicted = torch.cat(probabilities).max(-1)
    result: dict[str, Any] = {"rows": len(rows)}
    if labels is not None:
        values = list(task.get("label_values") or task["label_names"])
        unknown = sorted({row[labels] for row in rows} - set(values))
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not among the task's {values}")
        truth = torch.tensor([values.index(row[labels]) for row in rows])
        result["accuracy"] = (predicted == truth).float().mean().item()
    out = Path(out) if out else path.with_suffix(".predictions.tsv")
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
    writer.writerow([*header, "prediction", "probability"])
    for row, j, p in zip(rows, predicted.tolist(), probability.tolist(), strict=True):
        writer.writerow([*row, task["label_names"][j], f"{p:.4f}"])
    result["out"] = atomic_write_text(out, text.getvalue())
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    columns = OmegaConf.to_container(cfg.text_columns) if cfg.text_columns else None
    result = predict_file(cfg.export, cfg.input, cfg.out, columns, cfg.label_column, cfg.batch_size)
    accuracy = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    Console().print(f"scored {result['rows']} rows{accuracy}: {result['out']}", soft_wrap=True)


if __name__ == "__main__":
    main()
