"""Surrogate, acquisition and guided walk of the Pareto configuration search (DESIGN §6).

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


@dataclass(frozen=True)
class WalkResult:
    """Where the walkers of :func:`guided_walk` stopped.

    Attributes:
        points: ``(w, d)`` final grid position of each walker.
        values: ``(w,)`` acquisition value there.
        evaluations: acquisition evaluations spent (points scored).
    """

    points: np.ndarray
    values: np.ndarray
    evaluations: int


def guided_walk(
    acquisition: Callable[[np.ndarray], np.ndarray],
    grid: OptionGrid,
    starts: np.ndarray,
    max_evals: int,
) -> WalkResult:
    """Finite-difference hill climbing of ``acquisition`` on the integer option grid.

    One walker per distinct start. At each step every active walker's ±1 neighbours
    (:meth:`OptionGrid.neighbours`) are scored in ONE call, and each walker moves to its best
    neighbour if that beats its current value, else stops. Walkers that meet continue as one.
    The total number of points scored, starts included, never exceeds ``max_evals``: when the
    neighbours of all active walkers do not fit, the best walkers (by current value) that fit
    take the step and the others stop.

    Args:
        acquisition: ``(n, d)`` grid positions → ``(n,)`` values (higher is better).
        grid: the option grid.
        starts: ``(s, d)`` starting positions.
        max_evals: cap on acquisition evaluations (≥ 1).
    """
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    distinct = list(dict.fromkeys(map(tuple, np.asarray(starts, dtype=np.int64))))
    current = np.array(distinct[:max_evals], dtype=np.int64).reshape(-1, grid.num_matrices)
    values = np.asarray(acquisition(current), dtype=np.float64)
    evaluations = len(current)
    active = np.ones(len(current), dtype=bool)
    while active.any():
        walkers, blocks = [], []
        for w in sorted(np.flatnonzero(active), key=lambda w: -values[w]):
            block = grid.neighbours(current[w])
            if evaluations + sum(map(len, blocks)) + len(block) > max_evals:
                break
            walkers.append(w)
            blocks.append(block)
        active[:] = False
        if not walkers:
            break
        scores = np.asarray(acquisition(np.concatenate(blocks)), dtype=np.float64)
        evaluations += len(scores)
        starts_at = np.cumsum([0, *map(len, blocks)])
        met = set()
        for w, block, lo in zip(walkers, blocks, starts_at, strict=False):
            best = int(np.argmax(scores[lo : lo + len(block)]))
            if scores[lo + best] > values[w] and tuple(block[best]) not in met:
                current[w], values[w], active[w] = block[best], scores[lo + best], True
                met.add(tuple(block[best]))
    return WalkResult(current, values, evaluations)
