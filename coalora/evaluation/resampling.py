"""Metrics recomputed from per-example statistics, for bootstrap intervals.

A run saves, for every scored configuration, one row per test example (per block for language
modelling): ``(predicted class, target class)`` for classification, ``(summed negative
log-likelihood, scored tokens)`` for perplexity (the tasks' ``example_stats``).
:func:`metric_of` turns such rows, or many resamples of them at once, back into the metric
the run reported.
"""

from __future__ import annotations

import numpy as np

RESAMPLED_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "perplexity")


def metric_of(metric: str, stats: np.ndarray) -> np.ndarray:
    """The metric of ``stats`` of shape ``(..., examples, 2)``, over the last-but-one axis.

    ``accuracy``: share of rows whose prediction equals the target; ``f1``: binary F1 of
    class 1; ``matthews``: the multiclass Matthews correlation (0 where it is undefined, as
    torchmetrics reports it); ``perplexity``: ``exp(Σ nll / Σ tokens)``.
    """
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim < 2 or stats.shape[-1] != 2:
        raise ValueError(f"stats must have shape (..., examples, 2), got {stats.shape}")
    first, second = stats[..., 0], stats[..., 1]
    if metric == "accuracy":
        return (first == second).mean(-1)
    if metric == "f1":
        tp = ((first == 1) & (second == 1)).sum(-1)
        wrong = (first != second).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tp > 0, tp / (tp + 0.5 * wrong), 0.0)
    if metric == "matthews":
        return _matthews(first.astype(np.int64), second.astype(np.int64))
    if metric == "perplexity":
        return np.exp(first.sum(-1) / second.sum(-1))
    raise ValueError(f"metric {metric!r} cannot be resampled; accepted: {RESAMPLED_METRICS}")


def _matthews(preds: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Multiclass MCC = (c·s − Σ p_k t_k) / √((s² − Σ p_k²)(s² − Σ t_k²)), with c the correct
    count, s the total and p_k, t_k the predicted and true counts of class k."""
    classes = int(max(preds.max(), target.max())) + 1
    p = np.stack([(preds == k).sum(-1) for k in range(classes)], -1).astype(np.float64)
    t = np.stack([(target == k).sum(-1) for k in range(classes)], -1).astype(np.float64)
    s = np.float64(preds.shape[-1])
    c = (preds == target).sum(-1)
    denominator = np.sqrt((s**2 - (p**2).sum(-1)) * (s**2 - (t**2).sum(-1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (c * s - (p * t).sum(-1)) / denominator, 0.0)


def resample_indices(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """``(resamples, size)`` indices drawn with replacement from ``range(size)``."""
    return rng.integers(0, size, size=(resamples, size))
