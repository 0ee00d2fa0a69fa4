"""Language-modelling corpora: the task spec, its perplexity metric and a split's raw text.

A corpus split is read as one text (local files or the dataset hub);
:class:`~coalora.data.lm_datamodule.LanguageModelingDataModule` tokenises it whole and cuts it into
blocks of exactly ``max_length`` tokens, and a causal LM is scored on them by perplexity
(next-token prediction).
"""

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import datasets
import torch
import torchmetrics
from torch import Tensor
from torchmetrics.text import Perplexity

from coalora.io import read_utf8

log = logging.getLogger(__name__)

TEXT_DIR_ENV = "COALORA_TEXT_DIR"

Source = Literal["wikitext", "c4", "text"]
MetricName = Literal["perplexity"]

SOURCES: tuple[str, ...] = ("wikitext", "c4", "text")
# Label id that the metric (and Hugging Face causal-LM losses) leave out.
IGNORE_INDEX = -100

_METRIC_FACTORIES: dict[str, Callable[[], torchmetrics.Metric]] = {
    "perplexity": lambda: Perplexity(ignore_index=IGNORE_INDEX),
}
METRICS: tuple[str, ...] = tuple(_METRIC_FACTORIES)

# Fields describing a corpus on the dataset hub; the local source "text" takes none of them.
_HUB_FIELDS: tuple[str, ...] = (
    "hub_path",
    "hub_subset",
    "hub_train_split",
    "hub_test_split",
    "hub_data_files",
    "max_documents",
)
_REQUIRED_HUB_FIELDS: tuple[str, ...] = ("hub_path", "hub_train_split", "hub_test_split")
# Fields describing a local copy of a hub corpus (all or none of them).
_LOCAL_FIELDS: tuple[str, ...] = ("dir_name", "train_files", "test_file")


@dataclass(frozen=True)
class LanguageModelingTask:
    """A language-modelling corpus: where its text lives and the metric it reports.

    Built from a Hydra config with ``LanguageModelingTask(**cfg.task)``; lists become tuples.

    Args:
        name: short corpus name (``wikitext2``).
        kind: always ``"language_modeling"`` (tells these tasks from text classification).
        source: ``"wikitext"`` or ``"c4"`` (the hub, or a local copy when ``dir_name`` is
            set), or ``"text"`` (plain UTF-8 files named by ``train_files`` and ``test_file``).
        metric: ``"perplexity"``.
        hub_path: hub dataset path (``Salesforce/wikitext``); hub sources only, as are the
            ``hub_*`` fields and ``max_documents``.
        hub_subset: hub configuration name (``wikitext-2-raw-v1``), or None.
        hub_train_split: hub split used as our training data (``train``).
        hub_test_split: hub split used as our ``test`` split (``test``).
        hub_data_files: hub split → file pattern inside the dataset repository, for corpora
            read from some of their files (c4's first shards); keys must be the two splits.
        text_column: hub column holding a document's text.
        document_separator: string joining a split's hub documents into one text.
        max_documents: documents kept from the start of each hub split; None keeps all.
        dir_name: folder of the local copy inside ``data_dir`` (``wikitext-2-raw``).
        train_files: candidate training files; the first that exists is used (a warning
            names it when it is not the first). For ``text``: paths, absolute or relative
            to ``data_dir`` (else to the working directory).
        test_file: the ``test`` file, found like ``train_files``.
        data_dir: folder holding ``dir_name``; when None, ``$COALORA_TEXT_DIR``, else the
            dataset hub. For ``text``: the folder relative paths start from.
    """

    name: str
    kind: Literal["language_modeling"]
    source: Source
    metric: MetricName
    hub_path: str | None = None
    hub_subset: str | None = None
    hub_train_split: str | None = None
    hub_test_split: str | None = None
    hub_data_files: Mapping[str, str] | None = None
    text_column: str = "text"
    document_separator: str = "\n\n"
    max_documents: int | None = None
    dir_name: str | None = None
    train_files: tuple[str, ...] | None = None
    test_file: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.train_files is not None:
            if isinstance(self.train_files, str):
                raise ValueError(
                    f"train_files must be a list of file names, got the string {self.train_files!r}"
                )
            object.__setattr__(self, "train_files", tuple(self.train_files))
        if self.hub_data_files is not None:
            if not isinstance(self.hub_data_files, Mapping):
                raise ValueError(
                    f"hub_data_files must map hub splits to file patterns, got "
                    f"{self.hub_data_files!r}"
                )
            object.__setattr__(self, "hub_data_files", dict(self.hub_data_files))
        self._validate()

    def _validate(self) -> None:
        if self.kind != "language_modeling":
            raise ValueError(f"Unknown task kind {self.kind!r}; accepted: ('language_modeling',)")
        if self.source not in SOURCES:
            raise ValueError(
                f"Unknown language-modelling source {self.source!r}; accepted: {SOURCES}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; accepted: {METRICS}")
        for field in ("name", "text_column"):
            _check_text(field, getattr(self, field))
        if not isinstance(self.document_separator, str):
            raise ValueError(
                f"document_separator must be a string, got {self.document_separator!r}"
            )
        if self.max_documents is not None and (
            type(self.max_documents) is not int or self.max_documents < 1
        ):
            raise ValueError(
                f"max_documents must be a positive integer or null, got {self.max_documents!r}"
            )
        if self.train_files is not None:
            if not self.train_files:
                raise ValueError(f"train_files of task {self.name!r} is empty")
            for file in self.train_files:
                _check_text("train_files entry", file)
        for field in (*_REQUIRED_HUB_FIELDS, "hub_subset", "dir_name", "test_file", "data_dir"):
            if getattr(self, field) is not None:  # the required ones are checked below
                _check_text(field, getattr(self, field))
        set_local = [f for f in _LOCAL_FIELDS if getattr(self, f) is not None]
        if self.source == "text":
            extra = [f for f in (*_HUB_FIELDS, "dir_name") if getattr(self, f) is not None]
            if extra:
                raise ValueError(
                    f"Fields {extra} do not apply to source 'text' (task {self.name!r})"
                )
            missing = [f for f in ("train_files", "test_file") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"Source 'text' (task {self.name!r}) needs fields {missing}: the training "
                    "file(s) and the test file"
                )
            return
        missing = [f for f in _REQUIRED_HUB_FIELDS if getattr(self, f) is None]
        if missing:
            raise ValueError(f"Source {self.source!r} (task {self.name!r}) needs fields {missing}")
        if self.hub_train_split == self.hub_test_split:
            raise ValueError(
                f"hub_train_split and hub_test_split of task {self.name!r} are both "
                f"{self.hub_test_split!r}; the test split must be separate"
            )
        if self.hub_data_files is not None:
            splits = {self.hub_train_split, self.hub_test_split}
            if set(self.hub_data_files) != splits:
                raise ValueError(
                    f"hub_data_files keys {sorted(self.hub_data_files)} must be the hub splits "
                    f"{sorted(splits)} of task {self.name!r}"
                )
            for pattern in self.hub_data_files.values():
                _check_text("hub_data_files pattern", pattern)
        if set_local and len(set_local) != len(_LOCAL_FIELDS):
            missing = [f for f in _LOCAL_FIELDS if f not in set_local]
            raise ValueError(
                f"A local copy of task {self.name!r} needs all of {list(_LOCAL_FIELDS)}; "
                f"missing {missing}"
            )
        if self.data_dir is not None and not set_local:
            raise ValueError(
                f"data_dir {self.data_dir!r} is set but task {self.name!r} has no local layout "
                f"({list(_LOCAL_FIELDS)}); it loads from the hub"
            )

    def metric_inputs(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Align causal-LM outputs for the metric: position t predicts token t + 1.

        Args:
            logits: ``(batch, length, vocab)`` scores of the next token at every position.
            labels: ``(batch, length)`` token ids; ``-100`` marks positions left out.

        Returns:
            ``(logits[:, :-1], labels[:, 1:])``, the ``(preds, target)`` of ``Perplexity``.
        """
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"Expected logits (batch, length, vocab) and labels (batch, length), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        return logits[:, :-1], labels[:, 1:]

    def example_stats(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per block, what perplexity is computed from: ``(batch, 2)`` of the summed
        next-token negative log-likelihood and the number of scored tokens (see
        :func:`coalora.evaluation.resampling.metric_of`)."""
        preds, target = self.metric_inputs(logits, labels)
        nll = torch.nn.functional.cross_entropy(
            preds.transpose(1, 2).float(), target, ignore_index=-100, reduction="none"
        )
        return torch.stack([nll.sum(-1), (target != -100).sum(-1).to(nll.dtype)], dim=-1)


def _check_text(field: str, value: object) -> None:
    """Check that ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")


def build_lm_metric(task: LanguageModelingTask) -> torchmetrics.Metric:
    """The task's metric: ``Perplexity`` (ignoring label ``-100``), updated with the
    ``(preds, target)`` of :meth:`LanguageModelingTask.metric_inputs`."""
    return _METRIC_FACTORIES[task.metric]()


class SplitText(NamedTuple):
    """A corpus split as one text, and where it was read (named in errors and logs)."""

    text: str
    origin: str


def load_corpus(task: LanguageModelingTask) -> dict[str, SplitText]:
    """The ``train`` and ``test`` texts of ``task``.

    Local files are read whole as UTF-8. Hub documents (the ``text_column`` of the first
    ``max_documents`` rows) are joined by ``document_separator``. A hub source reads its
    local copy when it has one (``dir_name``) and ``data_dir`` or ``$COALORA_TEXT_DIR`` is
    set, else the hub.
    """
    if task.source == "text":
        root = Path(task.data_dir) if task.data_dir is not None else None
        return _read_files(task, root)
    data_dir = task.data_dir or os.environ.get(TEXT_DIR_ENV) or None
    if task.dir_name is not None and data_dir is not None:
        if task.max_documents is not None:
            raise ValueError(
                f"max_documents {task.max_documents} slices hub data, but task {task.name!r} "
                f"reads whole local files from {data_dir}; set max_documents to null"
            )
        folder = Path(data_dir) / task.dir_name
        if not folder.is_dir():
            raise FileNotFoundError(f"Folder of task {task.name!r} not found: {folder}")
        return _read_files(task, folder)
    return {
        "train": _load_hub_split(task, task.hub_train_split),
        "test": _load_hub_split(task, task.hub_test_split),
    }


def _read_files(task: LanguageModelingTask, root: Path | None) -> dict[str, SplitText]:
    """Read the first existing ``train_files`` entry and ``test_file``, relative to ``root``."""
    resolve = (lambda name: Path(name)) if root is None else (lambda name: root / name)
    candidates = [resolve(name) for name in task.train_files]
    train = next((path for path in candidates if path.is_file()), None)
    if train is None:
        raise FileNotFoundError(
            f"No training file of task {task.name!r} found; tried {[str(p) for p in candidates]}"
        )
    if train != candidates[0]:
        log.warning(
            "Task %r: %s not found; training on %s instead", task.name, candidates[0], train
        )
    test = resolve(task.test_file)
    if not test.is_file():
        raise FileNotFoundError(f"Test file of task {task.name!r} not found: {test}")
    if train.resolve() == test.resolve():
        raise ValueError(f"Task {task.name!r} would train and test on the same file {test}")
    return {
        "train": SplitText(read_utf8(train), str(train)),
        "test": SplitText(read_utf8(test), str(test)),
    }


def _load_hub_split(task: LanguageModelingTask, split: str) -> SplitText:
    """Join the documents of one hub split (its first ``max_documents``) into one text."""
    data_files = None if task.hub_data_files is None else {split: task.hub_data_files[split]}
    documents = datasets.load_dataset(
        task.hub_path, task.hub_subset, split=split, data_files=data_files
    )
    origin = f"{task.hub_path}/{task.hub_subset} split {split!r}"
    if task.text_column not in documents.column_names:
        raise ValueError(f"Column {task.text_column!r} not in {origin}: {documents.column_names}")
    if task.max_documents is not None:
        if task.max_documents > len(documents):
            raise ValueError(
                f"max_documents {task.max_documents} exceeds the {len(documents)} documents "
                f"of {origin}"
            )
        documents = documents.select(range(task.max_documents))
    return SplitText(task.document_separator.join(documents[task.text_column]), origin)
