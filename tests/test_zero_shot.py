"""Zero-shot evaluation through lm-evaluation-harness on a tiny local multiple-choice task."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from coalora.evaluation.zero_shot import evaluate_zero_shot

TASK_DIR = Path(__file__).resolve().parent / "data" / "zero_shot"
TASK = "coalora_tiny_mc"


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.eos_token = tokenizer.sep_token  # the harness's fallback prefix token
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """The task YAML with its data file made absolute (the harness resolves data_files against
    the working directory)."""
    config = yaml.safe_load((TASK_DIR / "tiny_mc.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / "questions.jsonl")
    (tmp_path / "tiny_mc.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


@torch.no_grad()
def expected_accuracies(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm computed directly: the choice with the largest summed log-likelihood of
    " " + choice after the prompt (divided by the choice's characters for acc_norm)."""
    docs = [json.loads(line) for line in (TASK_DIR / "questions.jsonl").read_text().splitlines()]
    hits, norm_hits = 0, 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        lls = []
        for choice in doc["choices"]:
            ids = tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids
            assert ids[: len(context_ids)] == context_ids
            logprobs = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
            positions = range(len(context_ids), len(ids))
            lls.append(sum(logprobs[i - 1, ids[i]].item() for i in positions))
        lls = np.array(lls)
        norm = lls / np.array([len(choice) for choice in doc["choices"]])
        for scores in (lls, norm):  # no near-ties, so batching noise cannot flip an argmax
            top = np.sort(scores)[::-1]
            assert top[0] - top[1] > 1e-3
        hits += int(np.argmax(lls) == doc["answer"])
        norm_hits += int(np.argmax(norm) == doc["answer"])
    return hits / len(docs), norm_hits / len(docs)


def test_accuracy_matches_summed_log_likelihoods(lm_eval, tiny_llama, tokenizer, task_dir):
    results = evaluate_zero_shot(
        tiny_llama,
        tokenizer,
        [TASK],
        batch_size=4,
        include_path=task_dir,
        add_special_tokens=False,
    )
    metrics = results[TASK]
    acc, acc_norm = expected_accuracies(tiny_llama, tokenizer)
    assert isinstance(metrics["acc"], float) and 0.0 <= metrics["acc"] <= 1.0
    assert metrics["acc"] == pytest.approx(acc, abs=1e-9)
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert metrics["acc_stderr"] == pytest.approx(np.sqrt(acc * (1 - acc) / 7), abs=1e-9)


def test_unknown_task_names_the_task_and_how_to_list_tasks(lm_eval, tiny_llama, tokenizer):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['no_such_task'\].*lm-eval ls tasks"):
        evaluate_zero_shot(tiny_llama, tokenizer, ["no_such_task"])


def test_empty_task_list_is_refused(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="tasks is empty"):
        evaluate_zero_shot(tiny_llama, tokenizer, [])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        (
            {"limit": 1.5},
            ValueError,
            r"limit must be None, an int >= 1 or a fraction in \(0, 1\), got 1.5",
        ),
        (
            {"include_path": "/no/such/folder"},
            FileNotFoundError,
            "'/no/such/folder' is not a folder",
        ),
    ],
)
def test_bad_arguments_are_named(tiny_llama, tokenizer, kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate_zero_shot(tiny_llama, tokenizer, [TASK], **kwargs)


def test_missing_harness_names_the_extra(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'coalora\[zeroshot\]'"):
        evaluate_zero_shot(tiny_llama, tokenizer, ["hellaswag"])
