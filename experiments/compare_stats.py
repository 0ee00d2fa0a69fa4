"""The statistics of a comparison: per method and budget, the mean over seeds of the test
metric with a 95 % bootstrap interval, the paired difference CoA-LoRA − other with its interval,
and the hypervolume's mean, spread over seeds and interval.

The bootstrap draws the test examples (blocks for language modelling) and the seeds with
replacement, ``RESAMPLES`` times, and uses the same draws for every method and budget: the
differences are paired (the methods are scored on the same examples, and seed ``s`` of each
method trains on the same data split). Intervals are the 2.5 and 97.5 percentiles.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from coalora.evaluation.report import perplexity_score
from coalora.evaluation.resampling import metric_of, resample_indices
from coalora.pareto import normalized_hypervolume

RESAMPLES = 2000
LEVEL = 0.95


def interval(samples: np.ndarray) -> list[float]:
    """The central ``LEVEL`` percentile interval of ``samples`` (over the first axis)."""
    tail = (1 - LEVEL) / 2 * 100
    return np.percentile(samples, [tail, 100 - tail], axis=0).tolist()


def resampled_metrics(
    stats: np.ndarray, metric: str, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """``(resamples, methods, budgets)`` metric values, each the mean over a draw of seeds of
    the metric on a draw of test examples; ``stats`` is ``(methods, seeds, budgets, examples,
    2)`` (see :func:`coalora.evaluation.resampling.metric_of`)."""
    methods, seeds, budgets, examples, _ = stats.shape
    rng = np.random.default_rng(seed)
    rows = resample_indices(rng, examples, resamples)
    seed_draws = resample_indices(rng, seeds, resamples)  # (resamples, seeds)
    per_seed = np.empty((methods, seeds, budgets, resamples))
    for m in range(methods):
        for s in range(seeds):
            for b in range(budgets):
                per_seed[m, s, b] = metric_of(metric, stats[m, s, b][rows])
    drawn = per_seed[:, seed_draws, :, np.arange(resamples)[:, None]]  # (R, seeds, M, B)
    return drawn.mean(axis=1)


def hv_scores(values: np.ndarray, metric: str, vocab_size: int | None) -> np.ndarray:
    """What the hypervolume measures of metric values (perplexity → its score in [0, 1])."""
    if metric != "perplexity":
        return values
    return np.vectorize(lambda v: perplexity_score(max(v, 1.0), vocab_size))(values)


def comparison_stats(
    methods: list[str],
    stats: np.ndarray,
    values: np.ndarray,
    bits: np.ndarray,
    hv_per_seed: np.ndarray,
    metric: str,
    reference_method: str,
    vocab_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Per method: ``mean`` and ``interval`` per budget; ``diff`` and ``diff_interval`` of
    the reference method minus it (sign flipped for perplexity, so positive always means the
    reference method is better); ``hv`` (mean over seeds), ``hv_sd`` (their standard
    deviation), ``hv_interval`` and, against the reference, ``hv_diff`` and its interval.

    ``values`` are the reported test metrics ``(methods, seeds, budgets)``, ``bits`` the mean
    average bits ``(methods, budgets)``, ``hv_per_seed`` ``(methods, seeds)``."""
    boot = resampled_metrics(stats, metric)
    sign = -1.0 if metric == "perplexity" else 1.0
    scores = hv_scores(boot, metric, vocab_size)
    hv_boot = np.array(
        [
            [normalized_hypervolume(bits[m], scores[r, m]) for m in range(len(methods))]
            for r in range(len(boot))
        ]
    )
    ref = methods.index(reference_method)
    means = values.mean(axis=1)
    out = {}
    for m, method in enumerate(methods):
        diff_boot = sign * (boot[:, ref] - boot[:, m])
        hv = hv_per_seed[m].tolist()
        out[method] = {
            "mean": means[m].tolist(),
            "interval": np.array(interval(boot[:, m])).T.tolist(),
            "diff": (sign * (means[ref] - means[m])).tolist(),
            "diff_interval": np.array(interval(diff_boot)).T.tolist(),
            "hv": statistics.mean(hv),
            "hv_sd": statistics.stdev(hv) if len(hv) > 1 else 0.0,
            "hv_interval": interval(hv_boot[:, m]),
            "hv_diff": statistics.mean(hv_per_seed[ref]) - statistics.mean(hv),
            "hv_diff_interval": interval(hv_boot[:, ref] - hv_boot[:, m]),
        }
    return out
