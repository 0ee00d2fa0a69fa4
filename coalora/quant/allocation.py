"""Budget allocation: the minimum-error option per matrix under an average bit-width budget.

A multiple-choice knapsack (DESIGN §3), solved exactly as a mixed-integer program with
``scipy.optimize.milp`` (HiGHS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from coalora.quant.config import QuantConfig

BUDGET_TOLERANCE = 1e-9
"""Slack (bits) allowed when checking that a solution meets the budget."""


def average_bits(numels: Sequence[int], bits: Sequence[float]) -> float:
    """Numel-weighted mean of per-matrix bits per parameter."""
    n = np.asarray(numels, dtype=np.float64)
    return float(np.dot(n, np.asarray(bits, dtype=np.float64)) / n.sum())


def achievable_range(numels: Sequence[int], options: Sequence[QuantConfig]) -> tuple[float, float]:
    """The lowest and highest average bits any choice of ``options`` can reach."""
    bpp = [o.bits_per_param for o in options]
    return average_bits(numels, [min(bpp)] * len(numels)), average_bits(
        numels, [max(bpp)] * len(numels)
    )


def efficient_options(errors: np.ndarray, bpp: np.ndarray) -> np.ndarray:
    """Mask of options not dominated (cheaper-or-equal and lower-or-equal error) by another.

    Dropping dominated options never changes the optimum of the knapsack, and it shrinks the
    program several-fold. Among exact ties the first option is kept.
    """
    order = np.lexsort((errors, bpp))  # by bits, then error
    keep = np.zeros(len(bpp), dtype=bool)
    best = np.inf
    for j in order:
        if errors[j] < best:
            keep[j] = True
            best = errors[j]
    return keep


def allocate_budget(
    errors: np.ndarray | Sequence[Sequence[float]],
    numels: Sequence[int],
    budget: float,
    options: Sequence[QuantConfig],
) -> list[int]:
    """Choose one option per matrix minimising total error with average bits ≤ ``budget``.

    Args:
        errors: ``(matrices, options)`` table of quantization errors (e.g. ``ErrorTable.errors``).
        numels: weights per matrix; the average is weighted by them.
        budget: target average bits per parameter.
        options: the quantization options, one per column of ``errors``.

    Returns:
        The chosen option index for every matrix.

    Raises:
        ValueError: on inconsistent shapes, non-finite errors, or a budget outside the
            achievable range (the message states the range).
    """
    table = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(numels, dtype=np.float64)
    if table.ndim != 2 or table.shape != (len(sizes), len(options)):
        raise ValueError(
            f"errors has shape {table.shape}; expected (len(numels), len(options)) = "
            f"({len(sizes)}, {len(options)})"
        )
    if len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"numels must be a non-empty list of positive counts, got {list(numels)}")
    if not np.isfinite(table).all():
        raise ValueError("errors contains NaN or infinite values")
    low, high = achievable_range(numels, options)
    if not low - BUDGET_TOLERANCE <= budget <= high + BUDGET_TOLERANCE:
        raise ValueError(
            f"budget={budget} bits is outside the achievable range [{low:.4f}, {high:.4f}] "
            "for these matrices and options"
        )

    bpp = np.array([o.bits_per_param for o in options])
    weights = sizes / sizes.sum()
    # One block of candidate variables per matrix: its non-dominated options.
    candidates = [np.flatnonzero(efficient_options(row, bpp)) for row in table]
    rows = np.concatenate([np.full(len(c), i) for i, c in enumerate(candidates)])
    cols = np.concatenate(candidates)
    nvar = len(cols)
    one_per_matrix = sp.csr_array(
        (np.ones(nvar), (rows, np.arange(nvar))), shape=(len(sizes), nvar)
    )
    storage = (weights[rows] * bpp[cols]).reshape(1, -1)
    result = milp(
        c=table[rows, cols],
        integrality=np.ones(nvar),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_per_matrix, 1, 1),
            LinearConstraint(storage, -np.inf, budget),
        ],
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"the allocation program failed: {result.message}")
    chosen = result.x > 0.5
    choice = [-1] * len(sizes)
    for var in np.flatnonzero(chosen):
        choice[rows[var]] = int(cols[var])
    reached = average_bits(numels, bpp[choice])
    if -1 in choice or reached > budget + BUDGET_TOLERANCE:
        raise RuntimeError(
            f"the allocation program returned an infeasible choice (average {reached} bits "
            f"for budget {budget})"
        )
    return choice
