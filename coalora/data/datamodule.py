"""Lightning data module: tokenised, dynamically padded text-classification batches."""

from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, DataCollatorWithPadding

from coalora.data.sources import load_task
from coalora.data.task import TaskSpec


def subsample(
    dataset: datasets.Dataset, n: int | None, seed: int, name: str = "n"
) -> datasets.Dataset:
    """The first ``n`` examples after a shuffle seeded by ``seed``; all when ``n`` is None.
    ``name`` is the setting ``n`` came from, named in the error for an ``n`` out of range."""
    if n is None:
        return dataset
    if not 1 <= n <= len(dataset):
        raise ValueError(
            f"Cannot take {n} samples from a split of {len(dataset)} examples ({name} must be "
            f"1 to {len(dataset)}, or null for all)"
        )
    return dataset.shuffle(seed=seed).select(range(n))


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed at epoch k sees the
    same order as the uninterrupted run.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class TextClassificationDataModule(L.LightningDataModule):
    """Splits ``train``/``val``/``test`` of a task, tokenised for a sequence classifier.

    ``val`` is carved from the task's training data (``val_size`` examples, seeded), so the
    task's ``test`` split (the GLUE dev set) stays untouched by validation and by a
    configuration search.

    Args:
        task: the task, or a mapping of ``TaskSpec`` fields (a Hydra ``cfg.task``).
        tokenizer_path: name or folder passed to ``AutoTokenizer.from_pretrained``.
        max_length: tokens per example after truncation.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size.
        val_size: examples held out from the training data as ``val``.
        max_train_samples: training examples kept (seeded sub-sample); None keeps all.
        max_eval_samples: ``test`` examples kept (seeded sub-sample); None keeps all. The
            ``val`` split's size is ``val_size``.
        seed: seed of the ``val`` carve, the sub-samples and the training shuffle.
        num_workers: data-loader worker processes.
        gguf_file: GGUF file inside ``tokenizer_path`` to read the tokenizer from, or None.
    """

    def __init__(
        self,
        task: TaskSpec | Mapping[str, Any],
        tokenizer_path: str,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        val_size: int = 256,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        gguf_file: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("val_size", val_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(ignore=["task"], logger=False)
        self.task = task if isinstance(task, TaskSpec) else TaskSpec(**task)
        options = {} if gguf_file is None else {"gguf_file": gguf_file}
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, **options)
        self.collator = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        self._splits: dict[str, datasets.Dataset] | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes of the task."""
        return len(self.task.label_names)

    def setup(self, stage: str | None = None) -> None:
        """Load, split, sub-sample and tokenise all splits once (for any ``stage``)."""
        if self._splits is not None:
            return
        hp = self.hparams
        raw = load_task(self.task, self.task.data_dir)
        if hp.val_size >= len(raw["train"]):
            raise ValueError(
                f"val_size {hp.val_size} must be smaller than the {len(raw['train'])} "
                f"training examples of task {self.task.name!r}"
            )
        carved = raw["train"].train_test_split(test_size=hp.val_size, seed=hp.seed)
        splits = {
            "train": subsample(carved["train"], hp.max_train_samples, hp.seed, "max_train_samples"),
            "val": carved["test"],
            "test": subsample(raw["test"], hp.max_eval_samples, hp.seed, "max_eval_samples"),
        }
        self._splits = {name: self._tokenize(split) for name, split in splits.items()}

    def _tokenize(self, split: datasets.Dataset) -> datasets.Dataset:
        """Replace the text columns by token ids (pairs when two text fields); rename labels."""
        fields = list(self.task.text_fields)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[field] for field in fields]
            return self.tokenizer(*texts, truncation=True, max_length=self.hparams.max_length)

        encoded = split.map(encode, batched=True, remove_columns=fields)
        return encoded.rename_column("label", "labels")

    def split(self, name: str) -> datasets.Dataset:
        """The tokenised split ``train``, ``val`` or ``test`` (after ``setup``)."""
        if self._splits is None:
            raise RuntimeError("TextClassificationDataModule.setup() has not been called")
        if name not in self._splits:
            raise ValueError(f"Unknown split {name!r}; accepted: {tuple(self._splits)}")
        return self._splits[name]

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.split("train")), self.hparams.seed)
        return self._loader("train", self.hparams.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, sampler=self.by_length("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, sampler=self.by_length("test"))

    def by_length(self, name: str, n: int | None = None) -> list[int]:
        """Indices of the first ``n`` (default all) examples of a split, shortest first.

        Evaluation order does not change a metric, and batches of similar lengths carry little
        padding: on SST-2 this scores a configuration about twice as fast as the split order.
        """
        lengths = [len(ids) for ids in self.split(name)["input_ids"][:n]]
        return sorted(range(len(lengths)), key=lengths.__getitem__)

    def _loader(self, name: str, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=batch_size,
            collate_fn=self.collator,
            num_workers=self.hparams.num_workers,
            **kwargs,
        )

    def heldout_batches(self, n: int, batch_size: int) -> list[dict[str, Tensor]]:
        """The first ``n`` ``val`` examples, shortest first, in padded batches of
        ``batch_size`` (the same batches on every call)."""
        val = self.split("val")
        if not 1 <= n <= len(val):
            raise ValueError(f"Cannot take {n} from {len(val)} validation examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        order = self.by_length("val", n)
        return [
            dict(self.collator([val[i] for i in order[start : start + batch_size]]))
            for start in range(0, n, batch_size)
        ]
