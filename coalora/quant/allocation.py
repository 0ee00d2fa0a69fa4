"""Budget allocation: the minimum-error option per matrix under an average bit-width budget.

A multiple-choice knapsack, solved exactly by a dynamic program over the Pareto
frontier of (storage, error) of partial choices, pruned by the linear-programming relaxation of
the matrices still to choose (Dudziński & Walukiewicz 1987; Pisinger 1995). Storage is counted
in integer units: every option's bits per parameter is a dyadic fraction, so the budget test
is exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from coalora.quant.options import Option

BUDGET_TOLERANCE = 1e-9
"""Slack (bits) allowed when checking that a solution meets the budget."""

PRUNE_TOLERANCE = 1e-9
"""Relative slack (of the cheapest choice's error) before a partial choice is discarded as
worse than a known solution; it only absorbs float rounding in the bounds."""


def efficient_options(errors: np.ndarray, bpp: np.ndarray) -> np.ndarray:
    """Mask of options not dominated (cheaper-or-equal and lower-or-equal error) by another.

    Dropping dominated options never changes the optimum of the knapsack, and it shrinks the
    problem several-fold. Among exact ties the first option is kept; an option whose error is
    NaN or +inf is never kept. ``errors`` is one row of options or a ``(matrices, options)``
    table, masked row by row.
    """
    errors = np.asarray(errors, dtype=np.float64)
    by_bits = np.broadcast_to(np.asarray(bpp, dtype=np.float64), errors.shape)
    order = np.lexsort((errors, by_bits), axis=-1)  # by bits, then error; stable
    ranked = np.take_along_axis(errors, order, axis=-1)
    best_before = np.fmin.accumulate(ranked, axis=-1)[..., :-1]
    best_before = np.concatenate([np.full_like(ranked[..., :1], np.inf), best_before], axis=-1)
    keep = np.empty(errors.shape, dtype=bool)
    np.put_along_axis(keep, order, ranked < best_before, axis=-1)
    return keep


def allocate_budget(
    errors: np.ndarray | Sequence[Sequence[float]],
    numels: Sequence[int],
    budget: float,
    options: Sequence[Option],
) -> list[int]:
    """Choose one option per matrix minimising total error with average bits ≤ ``budget``.

    Args:
        errors: ``(matrices, options)`` table of quantization errors (e.g. ``ErrorTable.errors``);
            ``+inf`` marks an option that cannot be used for that matrix.
        numels: weights per matrix; the average is weighted by them.
        budget: target average bits per parameter.
        options: the quantization options, one per column of ``errors``.

    Returns:
        The chosen option index for every matrix (an optimal choice; among equal totals any).

    Raises:
        TypeError: if ``budget`` is not a real number.
        ValueError: on inconsistent shapes, NaN or -inf errors, a matrix without a usable
            option, or a budget outside the achievable range (the message states the range).
    """
    table = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(numels)
    if table.ndim != 2 or table.shape != (len(sizes), len(options)):
        raise ValueError(
            f"errors has shape {table.shape}; expected (len(numels), len(options)) = "
            f"({len(sizes)}, {len(options)})"
        )
    if (
        len(sizes) == 0
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in numels)
        or (sizes <= 0).any()
    ):
        raise ValueError(f"numels must be a non-empty list of positive ints, got {list(numels)}")
    bad_rows = np.flatnonzero((np.isnan(table) | (table == -np.inf)).any(axis=1)).tolist()
    if bad_rows:
        raise ValueError(
            f"errors has NaN or -inf entries in rows {bad_rows} (one row per matrix); "
            "errors must be finite, or +inf for an unusable option"
        )
    unusable_rows = np.flatnonzero(np.isinf(table).all(axis=1)).tolist()
    if unusable_rows:
        raise ValueError(f"every option has error +inf (unusable) in rows {unusable_rows}")
    bpp = [Fraction(o.bits_per_param) for o in options]  # dyadic, so exact
    unit = math.lcm(*(b.denominator for b in bpp))  # storage is counted in 1/unit bits
    cost = sizes.astype(np.int64)[:, None] * np.array([int(b * unit) for b in bpp])
    total = int(sizes.sum())
    low, high = (float(Fraction(int(c.sum()), total * unit)) for c in (cost.min(1), cost.max(1)))
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool):
        raise TypeError(
            f"budget must be a number of bits per parameter in the achievable range "
            f"[{low:.4f}, {high:.4f}], got {budget!r} of type {type(budget).__name__}"
        )
    if not low - BUDGET_TOLERANCE <= budget <= high + BUDGET_TOLERANCE:
        raise ValueError(
            f"budget={budget} bits is outside the achievable range [{low:.4f}, {high:.4f}] "
            "for these matrices and options"
        )

    capacity = math.floor((Fraction(float(budget)) + Fraction(BUDGET_TOLERANCE)) * total * unit)
    keep = efficient_options(table, np.array([float(b) for b in bpp]))
    candidates = []  # per matrix: its efficient options by rising storage (falling error)
    for i, row in enumerate(keep):
        usable = np.flatnonzero(row)
        candidates.append(usable[np.argsort(cost[i, usable])])
    cheapest = sum(int(cost[i, c[0]]) for i, c in enumerate(candidates))
    if cheapest > capacity:
        raise ValueError(
            f"budget={budget} bits is below {cheapest / (total * unit):.4f} bits, the lowest "
            f"average of the usable options ({int(np.isinf(table).sum())} entries of errors "
            "are +inf, marking options unusable for their matrix)"
        )
    # The order only affects speed. Largest matrices first, and among equal sizes those whose
    # error varies least: then the bound on the matrices left, whose choice matters most,
    # discards most partial choices (fastest on MiniLM and synthetic RoBERTa-large tables).
    spread = [table[i, c[0]] - table[i, c[-1]] for i, c in enumerate(candidates)]
    order = np.lexsort((spread, -sizes))
    picks = _frontier_search(
        [cost[i, candidates[i]] for i in order], [table[i, candidates[i]] for i in order], capacity
    )
    choice = [0] * len(sizes)
    for i, p in zip(order, picks, strict=True):
        choice[i] = int(candidates[i][p])
    return choice


def _lower_hull(storage: list[int], error: list[float]) -> list[int]:
    """Indices of the lower convex hull of points sorted by rising storage and falling error."""
    hull: list[int] = []
    for j in range(len(storage)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when it lies on or above the segment a → j.
            if (error[b] - error[a]) * (storage[j] - storage[a]) >= (error[j] - error[a]) * (
                storage[b] - storage[a]
            ):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _relaxation_bounds(
    cost: list[np.ndarray], error: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each ``k``, the LP relaxation of choosing for matrices ``k, k+1, …``.

    Returned as breakpoints ``(storage, error, slope after each)`` of the piecewise-linear,
    convex minimum error as a function of the storage left. The relaxation takes each matrix's
    cheapest option and then the segments of the matrices' lower convex hulls in order of
    falling error per storage unit; stopping before a breakpoint's segment gives an integral
    choice, so the breakpoints are also achievable totals.
    """
    matrix, d_storage, d_error, slope = [], [], [], []
    for k, (s, e) in enumerate(zip(cost, error, strict=True)):
        hull = _lower_hull(s.tolist(), e.tolist())
        matrix.append(np.full(len(hull) - 1, k))
        d_storage.append(np.diff(s[hull]))
        d_error.append(np.diff(e[hull]))
        # Rising along the hull; the running maximum keeps a matrix's segments in order even
        # where rounding makes three points look not quite convex.
        slope.append(np.maximum.accumulate(d_error[-1] / d_storage[-1]))
    slope = np.concatenate(slope)
    by_slope = np.argsort(slope, kind="stable")
    matrix = np.concatenate(matrix)[by_slope]
    d_storage = np.concatenate(d_storage)[by_slope]
    d_error = np.concatenate(d_error)[by_slope]
    slope = slope[by_slope]
    base_storage = np.cumsum([0] + [int(s[0]) for s in reversed(cost)])[::-1]
    base_error = np.cumsum([0.0] + [float(e[0]) for e in reversed(error)])[::-1]
    bounds = []
    for k in range(len(cost) + 1):
        rest = matrix >= k
        bounds.append(
            (
                base_storage[k] + np.concatenate([[0], np.cumsum(d_storage[rest])]),
                base_error[k] + np.concatenate([[0.0], np.cumsum(d_error[rest])]),
                np.append(slope[rest], 0.0),
            )
        )
    return bounds


def _frontier_search(cost: list[np.ndarray], error: list[np.ndarray], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack: one entry of each ``cost[k]`` with total ≤ ``capacity``.

    Partial choices of matrices ``0..k`` are kept only if no other is cheaper-or-equal and
    better-or-equal (Pareto frontier) and if their LP-relaxation bound for the rest does not
    exceed the best complete choice known (found from the bound's integral breakpoints).

    Returns:
        Position in ``cost[k]`` of each matrix's choice, minimising the total error.
    """
    bounds = _relaxation_bounds(cost, error)
    tolerance = PRUNE_TOLERANCE * sum(float(np.abs(e).max()) for e in error)
    best_known = np.inf
    storage, total = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents = []
    for k, (s, e) in enumerate(zip(cost, error, strict=True)):
        rest_storage, rest_error, rest_slope = bounds[k + 1]
        grown_storage = (storage[:, None] + s).ravel()
        grown_total = (total[:, None] + e).ravel()
        room = capacity - grown_storage
        alive = np.flatnonzero(room >= rest_storage[0])
        at = np.searchsorted(rest_storage, room[alive], side="right") - 1
        reachable = grown_total[alive] + rest_error[at]
        best_known = min(best_known, reachable.min())
        lower = reachable + rest_slope[at] * (room[alive] - rest_storage[at])
        alive = alive[lower <= best_known + tolerance]
        alive = alive[np.lexsort((grown_total[alive], grown_storage[alive]))]
        frontier = grown_total[alive]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], frontier[:-1]]))
        alive = alive[frontier < best_before]
        storage, total = grown_storage[alive], grown_total[alive]
        parents.append(alive)
    state = int(np.argmin(total))
    picks = [0] * len(cost)
    for k in reversed(range(len(cost))):
        state, picks[k] = divmod(int(parents[k][state]), len(cost[k]))
    return picks
