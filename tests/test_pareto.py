"""Pareto utilities against brute force and hand-computed values."""

import numpy as np
import pytest

from coalora.pareto import (
    hypervolume_2d,
    non_dominated_mask,
    normalized_hypervolume,
    segmented_pareto_filter,
)

TRIALS = range(10)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def brute_mask(points: np.ndarray) -> np.ndarray:
    n = len(points)
    return np.array(
        [not any(dominates(points[i], points[j]) for i in range(n) if i != j) for j in range(n)],
        dtype=bool,
    )


def brute_hypervolume(points: np.ndarray, reference) -> float:
    """Exact area on the grid of all point coordinates: a cell counts if a point dominates it."""
    xs = np.unique(np.concatenate([points[:, 0], [reference[0]]]))
    ys = np.unique(np.concatenate([points[:, 1], [reference[1]]]))
    area = 0.0
    for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
        for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
            inside = x1 <= reference[0] and y1 <= reference[1]
            if inside and np.any((points[:, 0] <= x0) & (points[:, 1] <= y0)):
                area += (x1 - x0) * (y1 - y0)
    return area


def random_points(trial: int, n: int = 25, m: int = 2) -> np.ndarray:
    """Small integer coordinates, so ties and duplicates occur."""
    return np.random.default_rng(trial).integers(0, 6, size=(n, m)).astype(float)


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("m", [2, 3])
def test_non_dominated_mask_equals_brute_force(trial, m):
    points = random_points(trial, m=m)
    np.testing.assert_array_equal(non_dominated_mask(points), brute_mask(points))


def test_non_dominated_mask_examples():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [2.0, 2.0], [3.0, 3.0], [1.0, 4.0], [3.0, 1.0]])
    np.testing.assert_array_equal(
        non_dominated_mask(points), [True, True, True, False, False, True]
    )
    assert non_dominated_mask(np.empty((0, 2))).shape == (0,)


@pytest.mark.parametrize("trial", TRIALS)
def test_hypervolume_equals_brute_force(trial):
    rng = np.random.default_rng(trial)
    points = np.concatenate([random_points(trial, n=12), rng.uniform(0, 6, size=(8, 2))])
    reference = (rng.uniform(3, 7), rng.uniform(3, 7))
    assert hypervolume_2d(points, reference) == pytest.approx(
        brute_hypervolume(points, reference), rel=1e-12, abs=1e-12
    )


def test_hypervolume_examples():
    assert hypervolume_2d(np.array([[1.0, 1.0]]), (3.0, 2.0)) == pytest.approx(2.0)
    staircase = np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0], [2.0, 2.0]])
    assert hypervolume_2d(staircase, (3.0, 3.0)) == pytest.approx(3 + 2 + 1)
    # On or beyond the reference in either coordinate: contributes nothing.
    assert hypervolume_2d(np.array([[3.0, 0.0], [0.0, 5.0]]), (3.0, 3.0)) == 0.0
    assert hypervolume_2d(np.empty((0, 2)), (1.0, 1.0)) == 0.0


def brute_segmented(bits, losses, low, high, segments):
    width = (high - low) / segments
    kept = []
    for j, b in enumerate(bits):
        if not low <= b <= high:
            continue
        k = min(int((b - low) // width), segments - 1)
        same = [i for i, c in enumerate(bits) if low <= c <= high]
        same = [i for i in same if min(int((bits[i] - low) // width), segments - 1) == k]
        point = np.array([b, losses[j]])
        if not any(dominates(np.array([bits[i], losses[i]]), point) for i in same):
            kept.append(j)
    return np.array(kept, dtype=np.int64)


@pytest.mark.parametrize("trial", TRIALS)
def test_segmented_filter_equals_brute_force(trial):
    rng = np.random.default_rng(trial)
    bits = np.round(rng.uniform(1.75, 7.0, size=60), 2)
    losses = np.round(rng.uniform(0.0, 1.0, size=60), 1)
    kept = segmented_pareto_filter(bits, losses, 2.25, 6.5, 17)
    np.testing.assert_array_equal(kept, brute_segmented(bits, losses, 2.25, 6.5, 17))


def test_segmented_filter_example():
    bits = np.array([2.0, 2.5, 2.9, 3.0, 3.5, 4.0, 4.5])
    losses = np.array([0.0, 1.0, 0.5, 0.9, 0.95, 0.3, 0.8])
    # Segments [2, 3) and [3, 4]; 4.5 lies outside and is never kept.
    np.testing.assert_array_equal(segmented_pareto_filter(bits, losses, 2.0, 4.0, 2), [0, 3, 5])
    # One segment: a single Pareto front over [2, 4].
    np.testing.assert_array_equal(segmented_pareto_filter(bits, losses, 2.0, 4.0, 1), [0])
    assert segmented_pareto_filter(bits, losses, 5.0, 6.0, 3).size == 0


@pytest.mark.parametrize(
    ("bits", "losses", "low", "high", "segments", "match"),
    [
        ([2.0], [1.0], 2.0, 4.0, 0, "segments"),
        ([2.0], [1.0], 2.0, 4.0, 1.5, "segments"),
        ([2.0], [1.0], 4.0, 4.0, 2, "low"),
        ([2.0, 3.0], [1.0], 2.0, 4.0, 2, "equal length"),
        ([2.0], [np.nan], 2.0, 4.0, 2, "finite"),
    ],
)
def test_segmented_filter_rejects_bad_arguments(bits, losses, low, high, segments, match):
    with pytest.raises(ValueError, match=match):
        segmented_pareto_filter(np.array(bits), np.array(losses), low, high, segments)


def test_normalized_hypervolume_examples():
    assert normalized_hypervolume([4.0], [0.9]) == pytest.approx((8 - 4) / 6 * 0.9)
    assert normalized_hypervolume([4.0], [0.9]) == pytest.approx(0.6)
    # (2.5, 0.8) and (4, 0.9): 0.8 over bits [2.5, 4) and 0.9 over [4, 8], divided by 6.
    assert normalized_hypervolume([2.5, 4.0], [0.8, 0.9]) == pytest.approx(
        (1.5 * 0.8 + 4 * 0.9) / 6
    )
    assert normalized_hypervolume([2.0], [1.0]) == pytest.approx(1.0)
    assert normalized_hypervolume([8.0], [1.0]) == 0.0
    assert normalized_hypervolume([], []) == 0.0
    # Points below the reference point (metric < 0) add nothing; above 1 is an error.
    assert normalized_hypervolume([3.0], [-0.2]) == 0.0
    assert normalized_hypervolume([2.5, 4.0], [-0.1, 0.9]) == normalized_hypervolume([4.0], [0.9])
    with pytest.raises(ValueError, match="metric value 1.5 is not a number of at most 1"):
        normalized_hypervolume([3.0], [1.5])
    assert normalized_hypervolume([3.0], [0.5], bits_range=(2.0, 4.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("trial", TRIALS)
def test_normalized_hypervolume_equals_brute_force(trial):
    rng = np.random.default_rng(trial)
    bits, metric = rng.uniform(2, 8, size=10), rng.uniform(0, 1, size=10)
    expected = brute_hypervolume(np.stack([(bits - 2) / 6, -metric], axis=1), (1.0, 0.0))
    assert normalized_hypervolume(bits, metric) == pytest.approx(expected, rel=1e-12)
    assert 0.0 <= normalized_hypervolume(bits, metric) <= 1.0


@pytest.mark.parametrize(
    ("bits", "metric", "kwargs", "match"),
    [
        ([1.5], [0.5], {}, "1.5"),
        ([8.5], [0.5], {}, "8.5"),
        ([4.0], [1.2], {}, "1.2"),
        ([4.0], [np.nan], {}, "nan"),
        ([4.0, 5.0], [0.5], {}, "equal length"),
        ([4.0], [0.5], {"bits_range": (8.0, 2.0)}, "bits_range"),
    ],
)
def test_normalized_hypervolume_rejects_bad_values(bits, metric, kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalized_hypervolume(bits, metric, **kwargs)
