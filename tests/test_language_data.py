"""Tests of the language-modelling data layer (coalora.data.language)."""

import logging
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torchmetrics.text import Perplexity
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from coalora.data import LanguageModelingDataModule, LanguageModelingTask, build_lm_metric
from coalora.data import language as lm

CONF = Path(__file__).resolve().parents[1] / "conf"
TASK_CONF = CONF / "task"


def task_conf(name: str, **overrides) -> LanguageModelingTask:
    return LanguageModelingTask(
        **(OmegaConf.to_container(OmegaConf.load(TASK_CONF / f"{name}.yaml")) | overrides)
    )


def text_task(tmp_path: Path, train: str | bytes, test: str | bytes) -> LanguageModelingTask:
    for name, content in (("train.txt", train), ("test.txt", test)):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return task_conf(
        "text", train_files=["train.txt"], test_file="test.txt", data_dir=str(tmp_path)
    )


def rows(split: datasets.Dataset) -> list[tuple[int, ...]]:
    return [tuple(block) for block in split[:]["input_ids"].tolist()]


def reference_blocks(tokenizer, text: str, length: int) -> np.ndarray:
    """Blocks cut by hand from the tokenised text (MiniLM adds no BOS)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // length
    return np.array(ids[: count * length]).reshape(count, length)


# Numbers are split into distinct word pieces, so every block of this text is unique.
NUMBERS = " ".join(str(i) for i in range(600))


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def wikitext_dir(shared_data_dir) -> Path:
    if not (shared_data_dir / "wikitext-2-raw").is_dir():
        pytest.skip(f"no local WikiText-2 copy at {shared_data_dir / 'wikitext-2-raw'}")
    return shared_data_dir


@pytest.fixture(scope="module")
def wikitext(wikitext_dir, minilm_dir) -> LanguageModelingDataModule:
    """The wikitext2 task and data block of the composed Hydra config, on the local copy."""
    overrides = [
        "task=wikitext2",
        f"task.data_dir={wikitext_dir}",
        f"data.tokenizer_path={minilm_dir}",
        "data.max_length=128",
        "data.val_size=16",
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    task = LanguageModelingTask(**cfg.task)
    target = "coalora.data.LanguageModelingDataModule"
    datamodule = instantiate(cfg.data, _target_=target, _partial_=True)(task=task)
    datamodule.setup()
    return datamodule


@pytest.fixture
def numbers(tmp_path, minilm_dir) -> LanguageModelingDataModule:
    """Blocks of 8 tokens: 99 of NUMBERS (6 of them val), 8 test blocks of a shorter text."""
    task = text_task(tmp_path, NUMBERS, NUMBERS[:200])
    datamodule = LanguageModelingDataModule(task, str(minilm_dir), max_length=8, val_size=6)
    datamodule.setup()
    return datamodule


# --- task specs and configs ---------------------------------------------------------------


def test_task_configs_build_specs() -> None:
    wikitext2 = task_conf("wikitext2")
    assert (wikitext2.kind, wikitext2.source, wikitext2.metric) == (
        "language_modeling", "wikitext", "perplexity",
    )  # fmt: skip
    assert wikitext2.train_files == ("wiki.train.raw", "wiki.valid.raw")
    c4 = task_conf("c4")
    assert c4.hub_data_files == {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    assert (c4.max_documents, c4.hub_test_split) == (20000, "validation")
    with pytest.raises(ValueError, match=r"needs fields \['train_files', 'test_file'\]"):
        task_conf("text")
    assert task_conf("text", train_files=["a.txt"], test_file="b.txt").train_files == ("a.txt",)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("wikitext2", {"source": "books"}, "Unknown language-modelling source 'books'"),
        ("wikitext2", {"metric": "accuracy"}, "Unknown metric 'accuracy'"),
        ("wikitext2", {"kind": "classification"}, "Unknown task kind 'classification'"),
        ("wikitext2", {"train_files": "wiki.train.raw"}, "must be a list"),
        ("wikitext2", {"train_files": []}, "train_files of task 'wikitext2' is empty"),
        ("wikitext2", {"hub_path": None}, r"needs fields \['hub_path'\]"),
        ("wikitext2", {"test_file": None}, r"needs all of .*missing \['test_file'\]"),
        ("wikitext2", {"max_documents": 0}, "max_documents must be a positive integer"),
        ("wikitext2", {"hub_test_split": "train"}, "test split must be separate"),
        ("wikitext2", {"hub_data_files": {"train": "a.json"}}, "must be the hub splits"),
        ("c4", {"data_dir": "/data"}, "has no local layout"),
        ("c4", {"text_column": ""}, "text_column must be a non-empty string"),
        ("text", {"hub_path": "allenai/c4", "max_documents": 5}, "do not apply to source 'text'"),
    ],
)
def test_task_rejects_bad_fields(name: str, change: dict, message: str) -> None:
    fields = {"train_files": ["a.txt"], "test_file": "b.txt"} if name == "text" else {}
    with pytest.raises(ValueError, match=message):
        task_conf(name, **fields, **change)


def test_metric_inputs_and_perplexity_match_mean_next_token_nll() -> None:
    task = task_conf("wikitext2")
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 3] = labels[2, 6] = lm.IGNORE_INDEX
    metric = build_lm_metric(task)
    assert isinstance(metric, Perplexity)
    metric.update(*task.metric_inputs(logits[:2], labels[:2]))
    metric.update(*task.metric_inputs(logits[2:], labels[2:]))
    log_probs = logits.double().log_softmax(-1)[:, :-1]
    targets = labels[:, 1:]
    kept = targets != lm.IGNORE_INDEX
    nll = -log_probs[kept].gather(-1, targets[kept].unsqueeze(-1))
    assert metric.compute().item() == pytest.approx(nll.mean().exp().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\(2, 7, 11\) and \(2, 6\)"):
        task.metric_inputs(logits[:2], labels[:2, :6])


# --- local WikiText-2 ---------------------------------------------------------------------


def test_wikitext2_without_train_file_trains_on_valid(wikitext_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=lm.__name__):
        corpus = lm.load_corpus(task_conf("wikitext2", data_dir=str(wikitext_dir)))
    folder = wikitext_dir / "wikitext-2-raw"
    assert corpus["train"].origin == str(folder / "wiki.valid.raw")
    assert corpus["test"].origin == str(folder / "wiki.test.raw")
    assert corpus["train"].text == (folder / "wiki.valid.raw").read_text(encoding="utf-8")
    assert f"training on {folder / 'wiki.valid.raw'}" in caplog.text


def test_wikitext2_blocks_are_consecutive_slices_of_the_token_ids(wikitext, tokenizer) -> None:
    folder = Path(wikitext.task.data_dir) / "wikitext-2-raw"
    test = reference_blocks(tokenizer, (folder / "wiki.test.raw").read_text("utf-8"), 128)
    assert torch.equal(wikitext.split("test")[:]["input_ids"], torch.from_numpy(test))
    train = reference_blocks(tokenizer, (folder / "wiki.valid.raw").read_text("utf-8"), 128)
    carved = rows(wikitext.split("train")) + rows(wikitext.split("val"))
    assert Counter(carved) == Counter(map(tuple, train.tolist()))
    assert len(wikitext.split("val")) == 16
    assert (wikitext.vocab_size, wikitext.num_labels) == (30522, None)


def test_wikitext2_batches(wikitext) -> None:
    wikitext.hparams.batch_size = 4  # restored below; the fixture is shared
    try:
        batch = next(iter(wikitext.train_dataloader()))
    finally:
        wikitext.hparams.batch_size = 32
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for value in batch.values():
        assert (value.dtype, value.shape) == (torch.int64, (4, 128))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool((batch["attention_mask"] == 1).all())
    test = torch.cat([b["input_ids"] for b in wikitext.test_dataloader()])
    assert torch.equal(test, wikitext.split("test")[:]["input_ids"])  # in order
    val = torch.cat([b["input_ids"] for b in wikitext.val_dataloader()])
    assert torch.equal(val, wikitext.split("val")[:]["input_ids"])


def test_a_tokenizer_that_adds_bos_starts_the_stream_with_one_bos(tmp_path) -> None:
    vocab = {"<s>": 0, "[UNK]": 1} | {word: i + 2 for i, word in enumerate("abcdefgh")}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]"
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    task = text_task(tmp_path, " ".join("abcdefgh" * 2), "a b c d e f g h")
    datamodule = LanguageModelingDataModule(
        task, str(tmp_path / "tokenizer"), max_length=3, val_size=1, seed=0
    )
    datamodule.setup()
    train = Counter(rows(datamodule.split("train")) + rows(datamodule.split("val")))
    assert train == Counter([(0, 2, 3), (4, 5, 6), (7, 8, 9), (2, 3, 4), (5, 6, 7)])
    assert rows(datamodule.split("test")) == [(0, 2, 3), (4, 5, 6), (7, 8, 9)]


# --- splits, seeds and sub-samples --------------------------------------------------------


def test_val_is_seeded_and_disjoint_from_train(numbers, minilm_dir) -> None:
    train, val = set(rows(numbers.split("train"))), rows(numbers.split("val"))
    assert len(val) == 6 and not train & set(val)
    task = numbers.task
    again = LanguageModelingDataModule(task, str(minilm_dir), max_length=8, val_size=6)
    other = LanguageModelingDataModule(task, str(minilm_dir), max_length=8, val_size=6, seed=1)
    again.setup()
    other.setup()
    assert rows(again.split("val")) == val
    assert set(rows(other.split("val"))) != set(val)


def test_subsampling_keeps_seeded_block_counts(numbers, minilm_dir) -> None:
    subsampled = LanguageModelingDataModule(
        numbers.task,
        str(minilm_dir),
        max_length=8,
        val_size=6,
        max_train_samples=10,
        max_eval_samples=3,
    )
    subsampled.setup()
    assert [len(subsampled.split(n)) for n in ("train", "val", "test")] == [10, 6, 3]
    assert set(rows(subsampled.split("train"))) <= set(rows(numbers.split("train")))
    assert set(rows(subsampled.split("test"))) <= set(rows(numbers.split("test")))
    assert rows(subsampled.split("val")) == rows(numbers.split("val"))
    too_many = LanguageModelingDataModule(
        numbers.task, str(minilm_dir), max_length=8, val_size=6, max_eval_samples=100
    )
    with pytest.raises(ValueError, match="Cannot take 100 samples"):
        too_many.setup()


def test_train_loader_reshuffles_each_epoch_and_covers_every_block(numbers) -> None:
    loader = numbers.train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append([tuple(r) for b in loader for r in b["input_ids"].tolist()])
    assert Counter(epochs[0]) == Counter(epochs[1]) == Counter(rows(numbers.split("train")))
    assert epochs[0] != epochs[1]


def test_heldout_batches_are_the_first_val_blocks_and_stable(numbers) -> None:
    batches = numbers.heldout_batches(5, 2)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert torch.equal(
        torch.cat([b["input_ids"] for b in batches]), numbers.split("val")[:5]["input_ids"]
    )
    again = numbers.heldout_batches(5, 2)
    assert all(
        torch.equal(a[key], b[key]) for a, b in zip(batches, again, strict=True) for key in a
    )
    with pytest.raises(ValueError, match="Cannot take 7 from 6 validation blocks"):
        numbers.heldout_batches(7, 2)


# --- sources and errors -------------------------------------------------------------------


def test_text_source_takes_absolute_paths_and_first_existing_candidate(
    tmp_path, minilm_dir, caplog
) -> None:
    (tmp_path / "b.txt").write_text(NUMBERS, encoding="utf-8")
    (tmp_path / "c.txt").write_text(NUMBERS[:200], encoding="utf-8")
    task = task_conf(
        "text",
        train_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        test_file=str(tmp_path / "c.txt"),
    )
    datamodule = LanguageModelingDataModule(task, str(minilm_dir), max_length=8, val_size=6)
    with caplog.at_level(logging.WARNING, logger=lm.__name__):
        datamodule.setup()
    assert f"training on {tmp_path / 'b.txt'}" in caplog.text
    assert len(datamodule.split("test")) == 8  # 70 tokens of "0 1 ... 69"


def test_text_dir_from_environment(monkeypatch, wikitext_dir) -> None:
    monkeypatch.setenv(lm.TEXT_DIR_ENV, str(wikitext_dir))
    corpus = lm.load_corpus(task_conf("wikitext2"))
    assert corpus["test"].origin == str(wikitext_dir / "wikitext-2-raw" / "wiki.test.raw")


def test_hub_documents_are_sliced_and_joined(monkeypatch) -> None:
    calls = []

    def load_dataset(path, name, split, data_files):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_dict({"text": [f"{split} {i}" for i in range(5)]})

    monkeypatch.delenv(lm.TEXT_DIR_ENV, raising=False)
    monkeypatch.setattr(lm.datasets, "load_dataset", load_dataset)
    c4 = task_conf("c4", max_documents=3)
    corpus = lm.load_corpus(c4)
    assert corpus["train"].text == "train 0\n\ntrain 1\n\ntrain 2"
    assert corpus["test"].text == "validation 0\n\nvalidation 1\n\nvalidation 2"
    assert calls == [
        ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
        (
            "allenai/c4",
            None,
            "validation",
            {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        ),
    ]
    with pytest.raises(ValueError, match="max_documents 6 exceeds the 5 documents"):
        lm.load_corpus(replace(c4, max_documents=6))
    with pytest.raises(ValueError, match="Column 'body' not in allenai/c4"):
        lm.load_corpus(replace(c4, text_column="body"))
    wikitext2 = lm.load_corpus(task_conf("wikitext2"))  # no data_dir: the hub
    assert wikitext2["test"].origin == "Salesforce/wikitext/wikitext-2-raw-v1 split 'test'"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("", r"Split 'train' .*train\.txt\) has 0 tokens, fewer than one block of max_length 8"),
        ("one two", r"train\.txt\) has 2 tokens, fewer than one block of max_length 8"),
        (b"fine\nbad \xff\n", r"train\.txt, line 2: byte 0xff is not UTF-8 text"),
        (NUMBERS[:100], r"val_size 6 must be smaller than the 4 training blocks of 8 tokens"),
    ],
)
def test_unusable_training_text_is_refused(tmp_path, minilm_dir, train, message) -> None:
    task = text_task(tmp_path, train, NUMBERS)
    datamodule = LanguageModelingDataModule(task, str(minilm_dir), max_length=8, val_size=6)
    with pytest.raises(ValueError, match=message):
        datamodule.setup()


def test_missing_folder_and_files_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "wikitext-2-raw")):
        lm.load_corpus(task_conf("wikitext2", data_dir=str(tmp_path)))
    (tmp_path / "wikitext-2-raw").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tried .*wiki\.train\.raw.*wiki\.valid\.raw"):
        lm.load_corpus(task_conf("wikitext2", data_dir=str(tmp_path)))
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_text("text", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"Test file .*wiki\.test\.raw"):
        lm.load_corpus(task_conf("wikitext2", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="train and test on the same file"):
        lm.load_corpus(task_conf("wikitext2", data_dir=str(tmp_path), test_file="wiki.train.raw"))
    with pytest.raises(ValueError, match="max_documents 10 slices hub data"):
        lm.load_corpus(task_conf("wikitext2", data_dir=str(tmp_path), max_documents=10))


def test_datamodule_rejects_bad_arguments(tmp_path, minilm_dir) -> None:
    task = asdict(text_task(tmp_path, NUMBERS, NUMBERS))
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        LanguageModelingDataModule(task, str(minilm_dir), max_length=1)
    with pytest.raises(ValueError, match="eval_batch_size must be a positive integer, got 0"):
        LanguageModelingDataModule(task, str(minilm_dir), eval_batch_size=0)
    with pytest.raises(RuntimeError, match="setup"):
        LanguageModelingDataModule(task, str(minilm_dir)).split("train")
