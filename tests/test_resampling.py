"""Per-example statistics reproduce each task's metric, so bootstrap intervals resample what
a run reported; θ's numeric inputs."""

import numpy as np
import pytest
import torch

from coalora.data import build_metric
from coalora.data.language import LanguageModelingTask
from coalora.data.task import TaskSpec
from coalora.evaluation.resampling import metric_of, resample_indices
from coalora.model.config_net import ConfigAwareNetwork, field_numbers
from coalora.quant import QuantConfig


def classification_task(metric: str, labels: int = 2) -> TaskSpec:
    names = [f"c{i}" for i in range(labels)]
    return TaskSpec("t", "sentiment", ("text",), tuple(names), metric)


@pytest.mark.parametrize(("metric", "labels"), [("accuracy", 3), ("f1", 2), ("matthews", 3)])
def test_classification_statistics_reproduce_the_metric(metric, labels):
    task = classification_task(metric, labels)
    torch.manual_seed(0)
    logits, target = torch.randn(200, labels), torch.randint(0, labels, (200,))
    logits[target == 1, 1] += 0.8  # better than chance, so every metric is informative
    expected = build_metric(task)(*task.metric_inputs(logits, target)).item()
    stats = task.example_stats(logits, target).numpy()
    assert stats.shape == (200, 2)
    assert metric_of(metric, stats) == pytest.approx(expected, abs=1e-6)


def test_perplexity_statistics_reproduce_the_metric():
    task = LanguageModelingTask(
        name="lm",
        kind="language_modeling",
        metric="perplexity",
        source="text",
        train_files=("a.txt",),
        test_file="b.txt",
        data_dir="/x",
    )
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 9, 11), torch.randint(0, 11, (4, 9))
    labels[1, 3:] = -100  # a padded block scores fewer tokens
    expected = build_metric(task)(*task.metric_inputs(logits, labels)).item()
    stats = task.example_stats(logits, labels).numpy()
    assert stats[:, 1].tolist() == [8, 2, 8, 8]
    assert metric_of("perplexity", stats) == pytest.approx(expected, rel=1e-5)


def test_metrics_of_resamples_are_computed_at_once():
    rng = np.random.default_rng(0)
    stats = np.stack([rng.integers(0, 2, 50), rng.integers(0, 2, 50)], axis=-1)
    rows = resample_indices(rng, 50, 7)
    batched = metric_of("f1", stats[rows])
    assert batched.shape == (7,)
    assert batched == pytest.approx([float(metric_of("f1", stats[r])) for r in rows])
    with pytest.raises(ValueError, match="cannot be resampled"):
        metric_of("bleu", stats)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., examples, 2\)"):
        metric_of("accuracy", stats[:, 0])


def test_numeric_inputs_order_each_field_and_widen_theta():
    bits = field_numbers(QuantConfig.FIELD_CHOICES[0])
    assert bits[0] == 0 and bits[-1] == 1 and torch.all(bits[1:] > bits[:-1])
    dtypes = field_numbers(("bf16", "fp16", "fp32"))  # by significand bits: 8 < 11 < 24
    assert torch.all(dtypes[1:] > dtypes[:-1])
    plain = ConfigAwareNetwork(4, 7, 6, embed_dim=8, hidden_dim=16)
    numeric = ConfigAwareNetwork(4, 7, 6, embed_dim=8, hidden_dim=16, numeric_inputs=True)
    assert numeric.mlp[1].in_features == plain.mlp[1].in_features + 5
    features = torch.tensor([[0, 0, 0, 0, 0, 1, 2], [3, 3, 2, 2, 2, 0, 5]])
    assert torch.equal(numeric(features), torch.zeros(2, 4, 4))  # U starts at 0
    torch.nn.init.normal_(numeric.mlp[-1].weight)
    u = numeric(features)
    assert u.shape == (2, 4, 4) and not torch.equal(u[0], u[1])
