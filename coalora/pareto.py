"""Pareto utilities: dominance, the non-dominated mask, 2-D hypervolume and segmented filtering.

Every objective is MINIMISED here; callers negate a maximised metric (accuracy, F1). Pure
numpy, used by the configuration search and the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_points(points: np.ndarray, name: str = "points") -> np.ndarray:
    """``points`` as a finite float ``(n, m)`` array, or a ValueError naming the problem."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, m) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3]}")
    return array


def non_dominated_mask(points: np.ndarray) -> np.ndarray:
    """Mask of the points that no other point dominates (all objectives minimised).

    ``a`` dominates ``b`` when ``a ≤ b`` in every objective and ``a < b`` in at least one, so
    duplicated points never dominate each other and are all kept.

    Args:
        points: ``(n, m)`` array of ``n`` points with ``m`` objectives.

    Returns:
        Boolean array of length ``n``.
    """
    p = _as_points(points)
    mask = np.ones(len(p), dtype=bool)
    for j, point in enumerate(p):
        dominators = np.all(p <= point, axis=1) & np.any(p < point, axis=1)
        mask[j] = not dominators.any()
    return mask


def hypervolume_2d(points: np.ndarray, reference: Sequence[float] | np.ndarray) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (both objectives minimised).

    Points not strictly better than the reference in both coordinates contribute nothing.
    An ``O(n log n)`` sweep: sorted by the first objective, each point adds the rectangle
    between itself, the reference and the best second objective seen so far.

    Args:
        points: ``(n, 2)`` array.
        reference: ``(r0, r1)``, the reference (anti-ideal) point.
    """
    p = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64)
    if p.shape[1] != 2 or ref.shape != (2,) or not np.isfinite(ref).all():
        raise ValueError(
            f"hypervolume_2d needs (n, 2) points and a finite 2-vector reference, "
            f"got points of shape {p.shape} and reference {ref.tolist()}"
        )
    p = p[(p[:, 0] < ref[0]) & (p[:, 1] < ref[1])]
    if not len(p):
        return 0.0
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    best_before = np.concatenate(([ref[1]], np.minimum.accumulate(p[:-1, 1])))
    heights = np.maximum(best_before - p[:, 1], 0.0)
    return float(np.sum((ref[0] - p[:, 0]) * heights))


def segmented_pareto_filter(
    bits: np.ndarray, losses: np.ndarray, low: float, high: float, segments: int
) -> np.ndarray:
    """Union of the per-segment non-dominated (bits, loss) points.

    ``[low, high]`` is split into ``segments`` contiguous intervals of equal width,
    ``[e_k, e_{k+1})`` with the last one closed, ``[e_{U-1}, high]``. In each, the points whose
    (bits, loss) no other point of the same segment dominates are kept. Points with bits
    outside ``[low, high]`` belong to no segment and are never kept. The authors use 17
    segments of 0.25 bits over 2.25 to 6.5.

    Args:
        bits: ``(n,)`` average bits of each configuration.
        losses: ``(n,)`` loss of each configuration.
        low: lower edge of the first segment.
        high: upper edge of the last segment.
        segments: number of segments ``U`` (≥ 1).

    Returns:
        Sorted indices of the kept points.
    """
    b = np.asarray(bits, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if isinstance(segments, bool) or not isinstance(segments, int | np.integer) or segments < 1:
        raise ValueError(f"segments must be an integer ≥ 1, got {segments!r}")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low} and high={high}")
    if b.ndim != 1 or b.shape != loss.shape:
        raise ValueError(
            f"bits and losses must be 1-D of equal length, got shapes {b.shape} and {loss.shape}"
        )
    points = _as_points(np.stack([b, loss], axis=1), "(bits, losses)")
    edges = np.linspace(low, high, segments + 1)
    segment = np.minimum(np.searchsorted(edges, b, side="right") - 1, segments - 1)
    inside = (b >= low) & (b <= high)
    kept = [
        members[non_dominated_mask(points[members])]
        for k in range(segments)
        if (members := np.flatnonzero(inside & (segment == k))).size
    ]
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)


def normalized_hypervolume(
    avg_bits: Sequence[float],
    metric: Sequence[float],
    bits_range: tuple[float, float] = (2.0, 8.0),
) -> float:
    """Evaluation hypervolume of (average bits, metric) points.

    Definition: bits are normalised to ``x = (b - lo) / (hi - lo)`` over
    ``bits_range = (lo, hi)`` (default [2, 8]); the metric ``y`` is maximised and lies in
    [0, 1]. HV is the area of the region ``{(x', y') : x ≤ x' ≤ 1, 0 ≤ y' ≤ y}`` united over
    all points, i.e. the area dominated with respect to the reference point (8 bits, metric 0),
    so HV ∈ [0, 1]. A single point (4 bits, 0.9) has HV (8 − 4) / 6 · 0.9 = 0.6. Computed as
    :func:`hypervolume_2d` of ``(x, -y)`` with reference ``(1, 0)``.

    Args:
        avg_bits: average bit-width of each evaluated configuration, within ``bits_range``.
        metric: its metric (accuracy, F1, ...), at most 1. A point with a negative metric
            (a negative Matthews correlation, a perplexity worse than a uniform model's) lies
            below the reference point: it dominates no area and adds nothing.
        bits_range: ``(lo, hi)`` bits mapped to 0 and 1.
    """
    lo, hi = bits_range
    if not lo < hi:
        raise ValueError(f"bits_range must satisfy lo < hi, got {bits_range}")
    b = np.asarray(avg_bits, dtype=np.float64)
    y = np.asarray(metric, dtype=np.float64)
    if b.ndim != 1 or b.shape != y.shape:
        raise ValueError(
            f"avg_bits and metric must be 1-D of equal length, got shapes {b.shape} and {y.shape}"
        )
    for value in b:
        if not lo <= value <= hi:
            raise ValueError(f"average bits {value} outside bits_range [{lo}, {hi}]")
    for value in y:
        if not value <= 1.0:  # NaN fails too
            raise ValueError(f"metric value {value} is not a number of at most 1")
    above = y >= 0.0  # points below the reference point dominate nothing
    x = (b[above] - lo) / (hi - lo)
    return hypervolume_2d(np.stack([x, -y[above]], axis=1), (1.0, 0.0))
