"""Which configurations a run trains, validates and evaluates on: the initial
training set on a budget grid and the unseen and seen evaluation configurations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coalora.quant.space import Choice, ConfigSpace, config_id

UNSEEN_STEP = 0.01
"""Budget decrement (bits) used to step off a training configuration (see :func:`unseen_config`)."""


def budget_grid(start: float, stop: float, step: float) -> list[float]:
    """Budgets ``start, start + step, ...`` up to ``stop`` inclusive (rounded to 1e-6)."""
    if step <= 0 or stop < start:
        raise ValueError(f"budget grid needs step > 0 and stop >= start, got {start}:{stop}:{step}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(count)]


def initial_training_set(space: ConfigSpace, budgets: Sequence[float]) -> list[Choice]:
    """Allocations at ``budgets`` (each must be achievable), without duplicates, in budget order."""
    budgets = space.check_budgets("budgets", budgets)
    return list(dict.fromkeys(space.allocate(b) for b in budgets))


@dataclass(frozen=True)
class EvalConfig:
    """A configuration to evaluate: its target budget, split and actual average bits."""

    target_budget: float
    split: str  # "unseen" or "seen"
    choice: Choice
    avg_bits: float

    @property
    def config_id(self) -> str:
        return config_id(self.choice)


def unseen_config(
    space: ConfigSpace, budget: float, training: Sequence[Sequence[int]], max_steps: int = 200
) -> Choice:
    """The allocation at ``budget``; if it is a training configuration, the allocation at
    ``budget − k·UNSEEN_STEP`` for the smallest k ≥ 1 that is not (so it still meets the budget)."""
    seen = {tuple(c) for c in training}
    for k in range(max_steps + 1):
        choice = space.allocate(budget - k * UNSEEN_STEP)
        if choice not in seen:
            return choice
    raise ValueError(f"no unseen allocation within {max_steps * UNSEEN_STEP} bits below {budget}")


def nearest_seen_config(
    space: ConfigSpace, budget: float, training: Sequence[Sequence[int]]
) -> Choice:
    """The training configuration whose average bits is nearest ``budget`` (lower on ties)."""
    if not training:
        raise ValueError("the training configuration set is empty")
    return tuple(min(training, key=lambda c: (abs(space.bits(c) - budget), space.bits(c))))


def evaluation_configs(
    space: ConfigSpace,
    budgets: Sequence[float],
    training: Sequence[Sequence[int]],
    ever_trained: Sequence[Sequence[int]] | None = None,
) -> list[EvalConfig]:
    """Unseen and seen configurations at every evaluation budget.

    Seen configurations come from ``training`` (the set the model last trained on); unseen ones
    avoid every configuration in ``ever_trained`` (default: ``training``), so a configuration
    search that changed the set between epochs never leaks a trained configuration into the
    unseen split.
    """
    out = []
    for budget in budgets:
        for split, choice in (
            ("unseen", unseen_config(space, budget, ever_trained or training)),
            ("seen", nearest_seen_config(space, budget, training)),
        ):
            out.append(EvalConfig(budget, split, choice, space.bits(choice)))
    return out
