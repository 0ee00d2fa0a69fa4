"""The language-modelling data module: a corpus's splits tokenised whole, cut into blocks of
``max_length`` token ids and batched for a causal LM."""

import logging
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor

from coalora.data.datamodule import TokenizedDataModule
from coalora.data.language import LanguageModelingTask, SplitText, load_corpus

log = logging.getLogger(__name__)


class LanguageModelingDataModule(TokenizedDataModule):
    """Splits ``train``/``val``/``test`` of a corpus as blocks of ``max_length`` token ids.

    Each split's text is tokenised whole, without special tokens, except that a tokenizer
    which starts its encodings with BOS (Llama's) gets one BOS at the start of the split:
    the ids are those of ``tokenizer(text)`` for such tokenizers, and
    ``tokenizer(text, add_special_tokens=False)`` for the others (no CLS/SEP/EOS). The ids
    are cut into consecutive blocks of exactly ``max_length`` tokens; the remainder is
    dropped (and logged). ``val`` is ``val_size`` blocks carved from the training blocks
    (seeded), so ``test`` stays untouched by validation and a configuration search.

    Batches hold ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (equal to
    ``input_ids``; the model shifts them), int64 tensors of shape ``(batch, max_length)``.

    Args:
        task: the corpus, or a mapping of ``LanguageModelingTask`` fields (a Hydra
            ``cfg.task``).
        tokenizer_path: name or folder passed to ``AutoTokenizer.from_pretrained``.
        **settings: the shared settings of
            :class:`coalora.data.datamodule.TokenizedDataModule`; ``max_length`` is the
            block length, and sample counts count blocks.
    """

    @property
    def unit(self) -> str:
        return f"blocks of {self.hparams.max_length} tokens"

    def __init__(
        self, task: LanguageModelingTask | Mapping[str, Any], tokenizer_path: str, **settings: Any
    ) -> None:
        max_length = settings.get("max_length", 128)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one next-token target), got {max_length}")
        super().__init__(tokenizer_path, **settings)
        self.task = task if isinstance(task, LanguageModelingTask) else LanguageModelingTask(**task)

    @property
    def num_labels(self) -> None:
        """None: language modelling has no classes (the classification module's count)."""
        return None

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer, added tokens included."""
        return len(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenise, block, split and sub-sample all splits once (for any ``stage``)."""
        if self._splits is not None:
            return
        corpus = load_corpus(self.task)
        self.set_splits(
            self._blocks(corpus["train"], "train"), self._blocks(corpus["test"], "test")
        )
        self._splits = {name: split.with_format("torch") for name, split in self._splits.items()}

    def _token_ids(self, text: str) -> np.ndarray:
        """Token ids of ``text``: no special tokens, but a leading BOS if the tokenizer adds one."""
        ids = self.tokenizer(
            text,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_tensors="np",
            verbose=False,  # no warning that the text exceeds the model's length
        )["input_ids"][0].astype(np.int64)
        bos = self.tokenizer.bos_token_id
        if bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]:
            ids = np.concatenate([np.array([bos], dtype=np.int64), ids])
        return ids

    def _blocks(self, split: SplitText, name: str) -> datasets.Dataset:
        """Cut the tokenised text of a split into consecutive blocks of ``max_length`` ids."""
        length = self.hparams.max_length
        ids = self._token_ids(split.text)
        count = len(ids) // length
        if count == 0:
            raise ValueError(
                f"Split {name!r} of task {self.task.name!r} ({split.origin}) has {len(ids)} "
                f"tokens, fewer than one block of max_length {length}"
            )
        log.info(
            "Task %r, split %r (%s): %d tokens, %d blocks of %d, %d tokens dropped",
            self.task.name, name, split.origin, len(ids), count, length, len(ids) - count * length,
        )  # fmt: skip
        features = datasets.Features(
            {"input_ids": datasets.List(datasets.Value("int64"), length=length)}
        )
        blocks = ids[: count * length].reshape(count, length)
        return datasets.Dataset.from_dict({"input_ids": blocks}, features=features)

    def collate(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_blocks(rows)

    def eval_order(self, name: str, n: int | None = None) -> list[int]:
        """The split's order (every block has the same length)."""
        return list(range(len(self.split(name)) if n is None else n))


def collate_blocks(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack blocks into a batch of ``input_ids``, ``attention_mask`` (ones) and ``labels``."""
    input_ids = torch.stack([row["input_ids"] for row in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }
