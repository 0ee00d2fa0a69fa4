"""Surrogate, acquisition and guided walk of the Pareto configuration search.

Both objectives are minimised by the rest of the package (average bits, held-out loss);
botorch maximises, so the models here output ``(−bits, −loss)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.models.model import ModelList
from botorch.sampling import ListSampler, SobolQMCNormalSampler
from botorch.sampling.index_sampler import IndexSampler
from botorch.utils.multi_objective.box_decompositions.non_dominated import (
    FastNondominatedPartitioning,
)
from gpytorch.mlls import ExactMarginalLogLikelihood

from coalora.search.encoding import OptionGrid


def reference_point(points: np.ndarray, margin: float = 0.1, floor: float = 1e-3) -> np.ndarray:
    """A hypervolume reference point slightly worse than every observed point.

    Objectives are minimised: per objective, the worst (largest) observed value plus
    ``max(margin · observed range, floor)``. The floor keeps the point strictly worse when
    all observations agree (zero range), where a purely relative margin would vanish.

    Args:
        points: ``(n, m)`` observed objective values, n ≥ 1.
        margin: fraction of each objective's observed range added.
        floor: smallest absolute margin (> 0).
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or not len(p) or not np.isfinite(p).all():
        raise ValueError(f"points must be a finite non-empty (n, m) array, got shape {p.shape}")
    if margin < 0 or floor <= 0:
        raise ValueError(f"need margin >= 0 and floor > 0, got margin={margin}, floor={floor}")
    worst, best = p.max(axis=0), p.min(axis=0)
    return worst + np.maximum(margin * (worst - best), floor)


def fit_loss_surrogate(x: torch.Tensor, losses: torch.Tensor) -> SingleTaskGP:
    """A GP of ``−loss`` on encoded configurations, hyperparameters fitted by marginal likelihood.

    Kernel: botorch's ``SingleTaskGP`` default, checked in botorch 0.18.1: an ARD RBF kernel
    without output scale whose lengthscales have the dimension-scaled prior
    ``LogNormal(√2 + log(d)/2, √3)`` of Hvarfner et al. (2024, "Vanilla Bayesian optimization
    performs great in high dimensions"), a Gaussian likelihood with a ``LogNormal(−4, 1)``
    noise prior, and standardised outcomes. The prior puts lengthscales near ``√d``, so with
    far fewer observations than per-matrix dimensions the model stays smooth instead of
    interpolating, while ARD can still single out matrices whose choice matters. The inputs
    are ordinal positions in ``[0, 1]``, so a stationary kernel on them is meaningful.

    Args:
        x: ``(n, d)`` float64 encodings (:meth:`OptionGrid.encode`).
        losses: ``(n,)`` held-out losses.
    """
    gp = SingleTaskGP(x, -losses.reshape(-1, 1).to(x))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    return gp


def log_ehvi(
    grid: OptionGrid,
    x: torch.Tensor,
    bits: torch.Tensor,
    losses: torch.Tensor,
    margin: float = 0.1,
    floor: float = 1e-3,
    mc_samples: int = 64,
) -> qLogExpectedHypervolumeImprovement:
    """qLogEHVI of (−bits, −loss) over the observed configurations.

    The average bits of a configuration are known exactly, so they are a
    ``GenericDeterministicModel`` next to the loss GP in a ``ModelList``: the two objectives
    never share hyperparameters. The reference point is :func:`reference_point` of the
    observed (bits, loss), negated; the front is partitioned with
    ``FastNondominatedPartitioning``. The loss posterior is sampled with ``mc_samples``
    scrambled Sobol points (seeded from the global torch RNG), the same base samples for
    every candidate, so candidates are compared under common random numbers.

    Args:
        grid: the option grid that encoded ``x``.
        x: ``(n, d)`` encodings of the observed configurations.
        bits: ``(n,)`` their average bits.
        losses: ``(n,)`` their held-out losses.
        margin, floor: see :func:`reference_point`.
        mc_samples: quasi-Monte-Carlo samples of the loss posterior.
    """
    observed = torch.stack([-bits, -losses], dim=-1).to(x)
    shape = torch.Size([mc_samples])
    ref = -torch.as_tensor(reference_point(-observed.numpy(), margin, floor)).to(x)
    model = ModelList(
        GenericDeterministicModel(lambda z: -grid.average_bits(z), num_outputs=1),
        fit_loss_surrogate(x, losses),
    )
    return qLogExpectedHypervolumeImprovement(
        model,
        ref_point=ref.tolist(),
        partitioning=FastNondominatedPartitioning(ref_point=ref, Y=observed),
        sampler=ListSampler(IndexSampler(shape), SobolQMCNormalSampler(shape)),
    )


ACQ_BATCH_SIZE = 256
"""Default most candidates per acquisition call of :func:`guided_walk`. qLogEHVI holds about
0.3 MB per candidate with a 40-point front and 64 Monte-Carlo samples, so a call stays under
about 100 MB whatever the number of matrices and walkers."""


@dataclass(frozen=True)
class WalkResult:
    """Where the walkers of :func:`guided_walk` stopped.

    Attributes:
        points: ``(w, d)`` final grid position of each walker.
        values: ``(w,)`` acquisition value there.
        moves: ``(w,)`` single-matrix moves each walker made.
        evaluations: acquisition evaluations spent (points scored).
    """

    points: np.ndarray
    values: np.ndarray
    moves: np.ndarray
    evaluations: int


def guided_walk(
    acquisition: Callable[[np.ndarray], np.ndarray],
    grid: OptionGrid,
    starts: np.ndarray,
    moves_per_walker: int,
    candidates_per_move: int | None = None,
    max_evals: int | None = None,
    batch_size: int = ACQ_BATCH_SIZE,
    rng: np.random.Generator | None = None,
) -> WalkResult:
    """Finite-difference hill climbing of ``acquisition`` on the integer option grid.

    One walker per distinct start. At each step every active walker scores its candidate
    moves: its ±1 neighbours (one matrix one position up or down, in :meth:`OptionGrid.moves`
    order), or, when it has more than ``candidates_per_move`` of them, a uniformly random
    subset of that many (drawn from ``rng``, kept in that order). It moves to its best
    candidate if that beats its current value, else it stops (with a subset, the unscored
    neighbours are not tried). Walkers that meet continue as one (the one ranked higher by
    current value). A walker stops after ``moves_per_walker`` moves, so the walk's cost per
    walker, ``1 + moves_per_walker · min(candidates_per_move, 2·d)`` evaluations, does not grow
    with the number of matrices d once ``2·d`` exceeds ``candidates_per_move``.

    ``max_evals``, when given, caps the points scored in total, starts included: when the
    candidates of all active walkers do not fit, the best walkers (by current value) that fit
    take the step and the others stop; walkers may then make fewer than ``moves_per_walker``
    moves.

    The candidates of a step are scored in calls of at most ``batch_size`` points, built one
    call at a time, so memory does not grow with the number of walkers or matrices. Chunking
    does not change the moves: the scores are those of one call over all candidates (exactly
    so for qLogEHVI with q = 1, whose candidates are independent t-batches sharing the same
    base samples).

    Args:
        acquisition: ``(n, d)`` grid positions → ``(n,)`` values (higher is better).
        grid: the option grid.
        starts: ``(s, d)`` starting positions.
        moves_per_walker: most moves of one walker (≥ 1).
        candidates_per_move: most neighbours scored per walker and step (≥ 1); None scores
            all of them.
        max_evals: cap on acquisition evaluations (≥ 1), or None for no cap.
        batch_size: most points per ``acquisition`` call (≥ 1).
        rng: source of the random subsets; needed only when ``candidates_per_move`` is below
            ``2·d``.
    """
    if moves_per_walker < 1 or batch_size < 1:
        raise ValueError(
            f"need moves_per_walker >= 1 and batch_size >= 1, got {moves_per_walker} and "
            f"{batch_size}"
        )
    if candidates_per_move is not None and candidates_per_move < 1:
        raise ValueError(f"candidates_per_move must be >= 1 or None, got {candidates_per_move}")
    if max_evals is not None and max_evals < 1:
        raise ValueError(f"max_evals must be >= 1 or None, got {max_evals}")
    subsets = candidates_per_move is not None and candidates_per_move < 2 * grid.num_matrices
    if subsets and rng is None:
        raise ValueError(
            f"candidates_per_move={candidates_per_move} is below the {2 * grid.num_matrices} "
            "neighbours of a point: pass rng to draw the subsets"
        )
    cap = np.inf if max_evals is None else max_evals
    distinct = list(dict.fromkeys(map(tuple, np.asarray(starts, dtype=np.int64))))
    current = np.array(distinct[: int(min(cap, len(distinct)))], dtype=np.int64)
    current = current.reshape(-1, grid.num_matrices)
    values = _chunked(acquisition, current, batch_size)
    evaluations = len(current)
    moves = np.zeros(len(current), dtype=np.int64)
    active = np.ones(len(current), dtype=bool)
    while active.any():
        walkers, blocks, pending = [], [], 0
        for w in sorted(np.flatnonzero(active), key=lambda w: -values[w]):
            block = grid.moves(current[w])
            if subsets and len(block) > candidates_per_move:
                keep = rng.choice(len(block), candidates_per_move, replace=False)
                block = block[np.sort(keep)]
            if evaluations + pending + len(block) > cap:
                break
            walkers.append(w)
            blocks.append(block)
            pending += len(block)
        active[:] = False
        if not walkers:
            break
        owner = np.repeat(np.array(walkers), [len(b) for b in blocks])
        scores = _score_moves(acquisition, current, owner, np.concatenate(blocks), batch_size)
        evaluations += pending
        starts_at = np.cumsum([0, *map(len, blocks)])
        met = set()
        for w, block, lo in zip(walkers, blocks, starts_at, strict=False):
            best = int(np.argmax(scores[lo : lo + len(block)]))
            matrix, step = block[best]
            point = current[w].copy()
            point[matrix] += step
            if scores[lo + best] > values[w] and tuple(point) not in met:
                current[w], values[w] = point, scores[lo + best]
                moves[w] += 1
                active[w] = moves[w] < moves_per_walker
                met.add(tuple(point))
    return WalkResult(current, values, moves, evaluations)


def _chunked(
    acquisition: Callable[[np.ndarray], np.ndarray], points: np.ndarray, batch_size: int
) -> np.ndarray:
    """``acquisition`` of ``points`` in calls of at most ``batch_size`` points."""
    parts = [
        np.asarray(acquisition(points[lo : lo + batch_size]))
        for lo in range(0, len(points), batch_size)
    ]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def _score_moves(
    acquisition: Callable[[np.ndarray], np.ndarray],
    current: np.ndarray,
    owner: np.ndarray,
    moves: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Values of the points ``current[owner[k]]`` moved by ``moves[k]`` (matrix, ±1), built and
    scored at most ``batch_size`` at a time."""
    parts = []
    for lo in range(0, len(moves), batch_size):
        points = current[owner[lo : lo + batch_size]]  # a copy (fancy indexing)
        chunk = moves[lo : lo + batch_size]
        points[np.arange(len(chunk)), chunk[:, 0]] += chunk[:, 1]
        parts.append(np.asarray(acquisition(points)))
    return np.concatenate(parts).astype(np.float64)
