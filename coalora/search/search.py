"""The configuration search run between epochs, with everything it keeps across epochs.

A round: re-score the pool (the current training set) with the current model, propose new
configurations, score them, and keep the union of the per-segment Pareto fronts of
(pool + proposals) as the next training set and pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coalora.pareto import hypervolume_2d, non_dominated_mask, segmented_pareto_filter
from coalora.quant import Choice, ConfigSpace
from coalora.search.encoding import OptionGrid
from coalora.search.gp import ACQ_BATCH_SIZE, guided_walk, log_ehvi, reference_point

HV_BITS_RANGE = (2.0, 8.0)
"""Average bits mapped to [0, 1] in the pool hypervolume, as in the evaluation."""

Scorer = Callable[[list[Choice]], Sequence[float]]
"""Held-out loss of each configuration under the current model (adapters and θ included)."""


@dataclass(frozen=True)
class SearchRound:
    """What one round saw and chose.

    Attributes:
        configs: the pool (first ``pool_size``) followed by the proposals.
        bits: average bits of each.
        losses: held-out loss of each, all under the same (current) model.
        pool_size: how many of ``configs`` were the pool.
        kept: indices into ``configs`` of the next training set.
        pool_hypervolume: hypervolume of the pool, see :meth:`ParetoGPSearch.pool_hypervolume`.
        acquisition_evaluations: acquisition evaluations spent by the walk (0 for random).
        seconds: wall time of the round, scoring included.
        scoring_seconds: the part of ``seconds`` spent scoring configurations (forward
            passes of the model in a run); the rest is the search's own work.
    """

    configs: list[Choice]
    bits: list[float]
    losses: list[float]
    pool_size: int
    kept: list[int]
    pool_hypervolume: float
    acquisition_evaluations: int
    seconds: float
    scoring_seconds: float

    def to_dict(self) -> dict[str, Any]:
        def rows(indices: Sequence[int]) -> list[dict[str, Any]]:
            return [
                {"config": list(self.configs[i]), "bits": self.bits[i], "loss": self.losses[i]}
                for i in indices
            ]

        return {
            "pool": rows(range(self.pool_size)),
            "proposals": rows(range(self.pool_size, len(self.configs))),
            "training_set": rows(self.kept),
            "pool_hypervolume": self.pool_hypervolume,
            "acquisition_evaluations": self.acquisition_evaluations,
            "seconds": self.seconds,
            "scoring_seconds": self.scoring_seconds,
        }


class ParetoGPSearch:
    """Pareto search with a GP surrogate, qLogEHVI and a guided walk on the option grid.

    Proposals: a GP of the held-out loss is fitted to the freshly scored pool
    (:func:`coalora.search.gp.log_ehvi`); walkers start at the pool's non-dominated
    configurations and climb qLogEHVI over ±1 moves of one matrix
    (:func:`coalora.search.gp.guided_walk`); the distinct endpoints not already in the pool,
    best first, are the proposals (at most ``num_proposals``).

    The walk's budget is per walker, so it does not shrink as the number of matrices N grows:
    each walker makes up to ``moves_per_walker`` moves, and before each move scores
    ``candidates_per_move`` of its 2·N neighbours, drawn uniformly at random when it has more
    (all of them otherwise). A round thus spends at most ``walkers · (1 + moves_per_walker ·
    min(candidates_per_move, 2·N))`` acquisition evaluations, walkers being the pool's
    non-dominated configurations; ``max_acq_evals``, if set, caps that total (the
    lower-valued walkers then stop first). Candidates are scored ``acq_batch_size`` at a time
    without gradients, which bounds the acquisition's memory.

    The next training set is :func:`coalora.pareto.segmented_pareto_filter` of pool +
    proposals over ``segments`` segments of ``[bits_low, bits_high]``; it becomes the pool of
    the next round. Losses are never carried over: the model changes between rounds, so the
    whole pool is re-scored every round and its old losses are replaced.

    Randomness (GP fitting restarts, the acquisition's Monte-Carlo samples, the walk's subsets
    of neighbours, the random ablation) comes from ``generator``, which is part of
    :meth:`state_dict`; the global torch RNG is left as it was.

    Args:
        space: the configuration space, with its error table.
        configs: the initial pool (the initial training set).
        num_proposals: new configurations per round, at most.
        moves_per_walker: most single-matrix moves of one walker per round (≥ 1).
        candidates_per_move: neighbours a walker scores before each move (≥ 1), a random
            subset when it has more; None scores all 2·N.
        max_acq_evals: optional cap on the acquisition evaluations of a round (≥ 1); None
            leaves the walk to the per-walker budget.
        acq_batch_size: most candidates per acquisition call (≥ 1).
        segments: number of bit-width segments U.
        bits_low: lower edge of the first segment.
        bits_high: upper edge of the last segment.
        reference_margin: relative margin of the reference point (see ``reference_point``).
        reference_floor: absolute floor of that margin.
        mc_samples: quasi-Monte-Carlo samples of qLogEHVI.
        seed: seed of ``generator``.
    """

    def __init__(
        self,
        space: ConfigSpace,
        configs: Sequence[Sequence[int]],
        num_proposals: int = 16,
        moves_per_walker: int = 16,
        candidates_per_move: int | None = 32,
        max_acq_evals: int | None = None,
        acq_batch_size: int = ACQ_BATCH_SIZE,
        segments: int = 17,
        bits_low: float = 2.25,
        bits_high: float = 6.5,
        reference_margin: float = 0.1,
        reference_floor: float = 1e-3,
        mc_samples: int = 64,
        seed: int = 0,
    ) -> None:
        if num_proposals < 0 or min(moves_per_walker, acq_batch_size, mc_samples) < 1:
            raise ValueError(
                f"need num_proposals >= 0 and moves_per_walker, acq_batch_size and mc_samples "
                f">= 1, got {num_proposals}, {moves_per_walker}, {acq_batch_size} and "
                f"{mc_samples}"
            )
        for name, value in (
            ("candidates_per_move", candidates_per_move),
            ("max_acq_evals", max_acq_evals),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not configs:
            raise ValueError("the initial pool of configurations is empty")
        if isinstance(segments, bool) or segments < 1 or not bits_low < bits_high:
            raise ValueError(
                f"need segments >= 1 and bits_low < bits_high, got {segments}, {bits_low}, "
                f"{bits_high}"
            )
        self.space = space
        self.grid = OptionGrid.from_space(space)
        self.num_proposals = num_proposals
        self.moves_per_walker = moves_per_walker
        self.candidates_per_move = candidates_per_move
        self.max_acq_evals = max_acq_evals
        self.acq_batch_size = acq_batch_size
        self.segments, self.bits_low, self.bits_high = segments, bits_low, bits_high
        self.reference_margin, self.reference_floor = reference_margin, reference_floor
        self.mc_samples = mc_samples
        self.configs: list[Choice] = self._checked(configs)
        self.losses: list[float] = []  # held-out losses of the pool from the last round
        self.generator = torch.Generator().manual_seed(seed)

    def _checked(self, configs: Sequence[Sequence[int]]) -> list[Choice]:
        self.grid.positions(configs)  # raises on a wrong length or option index
        return [tuple(int(j) for j in c) for c in configs]

    def bits(self, configs: Sequence[Sequence[int]]) -> np.ndarray:
        return np.array([self.space.bits(c) for c in configs])

    def propose(self, bits: np.ndarray, losses: np.ndarray) -> tuple[list[Choice], int]:
        """New configurations (not in the pool) and the acquisition evaluations spent, given
        the average bits and fresh losses of the pool (``self.configs``)."""
        positions = self.grid.positions(self.configs)
        acquisition = log_ehvi(
            self.grid,
            self.grid.encode(positions),
            torch.as_tensor(bits),
            torch.as_tensor(losses),
            self.reference_margin,
            self.reference_floor,
            self.mc_samples,
        )

        def score(points: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return acquisition(self.grid.encode(points).unsqueeze(1)).numpy()

        front = non_dominated_mask(np.stack([bits, losses], axis=1))
        # The subsets of neighbours come from the round's seeded torch RNG, like the rest.
        rng = np.random.default_rng(int(torch.randint(2**62, (1,))))
        walk = guided_walk(
            score,
            self.grid,
            positions[front],
            self.moves_per_walker,
            self.candidates_per_move,
            self.max_acq_evals,
            self.acq_batch_size,
            rng,
        )
        pool = set(map(tuple, positions))
        best_first = np.argsort(-walk.values, kind="stable")
        endpoints = dict.fromkeys(tuple(walk.points[w]) for w in best_first)
        new = [p for p in endpoints if p not in pool][: self.num_proposals]
        return self._choices(new), walk.evaluations

    def _choices(self, points: Sequence[tuple[int, ...]]) -> list[Choice]:
        return self.grid.choices(
            np.array(points, dtype=np.int64).reshape(-1, self.grid.num_matrices)
        )

    def pool_hypervolume(self, bits: np.ndarray, losses: np.ndarray) -> float:
        """Hypervolume of the pool's (x, loss), both minimised, with x the average bits mapped
        linearly from ``HV_BITS_RANGE`` = [2, 8] to [0, 1] and the reference point the
        observed-data rule (:func:`coalora.search.gp.reference_point`) on those points. The
        loss has no natural bound, so the value compares configurations scored by one model
        and is not comparable across rounds."""
        lo, hi = HV_BITS_RANGE
        points = np.stack([(bits - lo) / (hi - lo), losses], axis=1)
        ref = reference_point(points, self.reference_margin, self.reference_floor)
        return hypervolume_2d(points, ref)

    def step(self, score: Scorer) -> SearchRound:
        """Run one round and make its result the pool; returns what the round saw and chose."""
        start = time.perf_counter()
        bits = self.bits(self.configs)
        scoring_start = time.perf_counter()
        losses = self._scores(score, self.configs)
        scoring = time.perf_counter() - scoring_start
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            proposals, evaluations = self.propose(bits, losses)
        configs = self.configs + proposals
        bits = np.concatenate([bits, self.bits(proposals)])
        scoring_start = time.perf_counter()
        losses = np.concatenate([losses, self._scores(score, proposals)])
        scoring += time.perf_counter() - scoring_start
        kept = segmented_pareto_filter(
            bits, losses, self.bits_low, self.bits_high, self.segments
        ).tolist()
        if not kept:
            raise ValueError(
                f"no configuration has average bits in [{self.bits_low}, {self.bits_high}]: "
                f"the pool spans {bits.min():.4f} to {bits.max():.4f} bits"
            )
        pool_hv = self.pool_hypervolume(bits[: len(self.configs)], losses[: len(self.configs)])
        result = SearchRound(
            configs,
            bits.tolist(),
            losses.tolist(),
            len(self.configs),
            kept,
            pool_hv,
            evaluations,
            time.perf_counter() - start,
            scoring,
        )
        self.configs = [configs[i] for i in kept]
        self.losses = [float(losses[i]) for i in kept]
        return result

    @staticmethod
    def _scores(score: Scorer, configs: list[Choice]) -> np.ndarray:
        losses = np.asarray(score(configs) if configs else [], dtype=np.float64)
        if losses.shape != (len(configs),) or not np.isfinite(losses).all():
            raise ValueError(
                f"score must return one finite loss per configuration ({len(configs)}), "
                f"got {losses.tolist()}"
            )
        return losses

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and tensors only (checkpoints load with ``weights_only=True``)."""
        return {
            "configs": [list(c) for c in self.configs],
            "losses": list(self.losses),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.configs = self._checked(state["configs"])
        self.losses = [float(v) for v in state["losses"]]
        self.generator.set_state(state["generator"])


class RandomWalkSearch(ParetoGPSearch):
    """The random-extension ablation: the same rounds, with random proposals.

    Each proposal starts at a pool configuration drawn uniformly and takes ``walk_steps``
    uniformly random ±1 moves on the option grid; ``num_proposals`` distinct configurations
    not in the pool are drawn (fewer only if ``attempts_per_proposal · num_proposals`` draws
    do not find them), then the same segmented filtering applies.

    Args:
        walk_steps: random moves per proposal (≥ 1).
        attempts_per_proposal: bound on the draws, per proposal wanted.
        **kwargs: as :class:`ParetoGPSearch` (the walk's settings, ``moves_per_walker`` to
            ``acq_batch_size``, are unused).
    """

    def __init__(
        self, *args: Any, walk_steps: int = 8, attempts_per_proposal: int = 20, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if walk_steps < 1 or attempts_per_proposal < 1:
            raise ValueError(
                f"need walk_steps >= 1 and attempts_per_proposal >= 1, got {walk_steps} and "
                f"{attempts_per_proposal}"
            )
        self.walk_steps = walk_steps
        self.attempts_per_proposal = attempts_per_proposal

    def propose(self, bits: np.ndarray, losses: np.ndarray) -> tuple[list[Choice], int]:
        positions = self.grid.positions(self.configs)
        pool = set(map(tuple, positions))
        found: dict[tuple[int, ...], None] = {}
        for _ in range(self.attempts_per_proposal * self.num_proposals):
            if len(found) == self.num_proposals:
                break
            point = positions[self._draw(len(positions))]
            for _ in range(self.walk_steps):
                moves = self.grid.neighbours(point)
                point = moves[self._draw(len(moves))]
            if tuple(point) not in pool:
                found[tuple(point)] = None
        return self._choices(list(found)), 0

    def _draw(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))
