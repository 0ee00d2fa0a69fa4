"""Target-layer discovery on BERT (MiniLM), RoBERTa and LLaMA models."""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    RobertaConfig,
)

from coalora.model.targets import (
    MODULE_TYPES,
    Target,
    find_targets,
    num_blocks,
    parse_module_name,
    target_weights,
)

BERT_TYPES = ["query", "key", "value", "attn_out", "ffn_up", "ffn_down"]
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
)


@pytest.fixture(scope="module")
def llama_model() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def roberta_model() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(RobertaConfig(**TINY, num_labels=2))


def test_minilm_targets(minilm_model):
    targets = find_targets(minilm_model)
    assert len(targets) == 36
    assert num_blocks(targets) == 6
    for block in range(6):
        in_block = [t for t in targets if t.block_index == block]
        assert [t.module_type for t in in_block] == BERT_TYPES
    assert targets[3] == Target("bert.encoder.layer.0.attention.output.dense", "attn_out", 0)
    assert targets[5] == Target("bert.encoder.layer.0.output.dense", "ffn_down", 0)
    names = {t.name for t in targets}
    assert "bert.pooler.dense" not in names and "classifier" not in names


def test_minilm_weights_are_the_encoder_linears(minilm_model, minilm_weights):
    weights = target_weights(minilm_model, find_targets(minilm_model))
    assert list(weights) == list(minilm_weights)
    for name, w in weights.items():
        assert w.data_ptr() == minilm_weights[name].data_ptr()
        assert not w.requires_grad
    assert weights["bert.encoder.layer.2.intermediate.dense"].shape == (1536, 384)
    assert weights["bert.encoder.layer.2.output.dense"].shape == (384, 1536)


def test_llama_targets(llama_model):
    targets = find_targets(llama_model)
    assert len(targets) == 14
    assert num_blocks(targets) == 2
    assert [t.module_type for t in targets] == list(MODULE_TYPES) * 2
    assert [t.block_index for t in targets] == [0] * 7 + [1] * 7
    assert targets[4] == Target("model.layers.0.mlp.gate_proj", "ffn_gate", 0)
    assert targets[13] == Target("model.layers.1.mlp.down_proj", "ffn_down", 1)
    assert "lm_head" not in {t.name for t in targets}
    weights = target_weights(llama_model, targets)
    assert weights["model.layers.1.mlp.down_proj"].shape == (32, 64)


def test_roberta_targets(roberta_model):
    targets = find_targets(roberta_model)
    assert [t.module_type for t in targets] == BERT_TYPES * 2
    assert [t.block_index for t in targets] == [0] * 6 + [1] * 6
    assert all(t.name.startswith("roberta.encoder.layer.") for t in targets)  # no classifier


def test_filter_by_module_types(minilm_model, llama_model):
    targets = find_targets(minilm_model, ["query", "value"])
    assert len(targets) == 12
    assert {t.module_type for t in targets} == {"query", "value"}
    gates = find_targets(llama_model, ("ffn_gate",))
    assert [t.name for t in gates] == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate_proj",
    ]


def test_parse_module_name():
    assert parse_module_name("bert.encoder.layer.11.attention.output.dense") == (
        11,
        "attention.output.dense",
    )
    assert parse_module_name("model.layers.3.mlp.up_proj") == (3, "mlp.up_proj")
    assert parse_module_name("bert.pooler.dense") is None
    assert parse_module_name("model.layers") is None


def test_unknown_module_type_raises(minilm_model):
    with pytest.raises(ValueError, match="unknown module_types \\['qkv'\\].*ffn_down"):
        find_targets(minilm_model, ["query", "qkv"])
    with pytest.raises(ValueError, match="module_types is empty"):
        find_targets(minilm_model, [])


def test_no_targets_raises(minilm_model):
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Sequential has no target linear layers"):
        find_targets(mlp)
    with pytest.raises(ValueError, match="BertForSequenceClassification .*ffn_gate"):
        find_targets(minilm_model, ["ffn_gate"])
    with pytest.raises(ValueError, match="at least one target"):
        num_blocks([])


def test_target_weights_rejects_weightless_module(minilm_model):
    bad = Target("bert.encoder.layer.0.attention.self", "query", 0)
    with pytest.raises(ValueError, match="has no weight"):
        target_weights(minilm_model, [bad])
