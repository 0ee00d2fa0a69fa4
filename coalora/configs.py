"""Configuration sets: the initial training set and the evaluation configurations (DESIGN §5, §8).

A configuration is one option index per target matrix (see :data:`coalora.model.backbone.Choice`).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from coalora.quant import ErrorTable, achievable_range, allocate_budget, average_bits

UNSEEN_STEP = 0.01
"""Budget decrement (bits) used to step off a training configuration (see :func:`unseen_config`)."""


def config_id(choice: Sequence[int]) -> str:
    """A short stable name of a configuration: 12 hex digits of a hash of its option indices."""
    return hashlib.sha1(",".join(str(int(j)) for j in choice).encode()).hexdigest()[:12]


def config_set_id(configs: Sequence[Sequence[int]]) -> str:
    """A short stable name of an ordered configuration set: 12 hex digits of a hash of its
    members' :func:`config_id` in order (the order matters: the sampler draws by position)."""
    return hashlib.sha1("|".join(config_id(c) for c in configs).encode()).hexdigest()[:12]


def budget_grid(start: float, stop: float, step: float) -> list[float]:
    """Budgets ``start, start + step, ...`` up to ``stop`` inclusive (rounded to 1e-6)."""
    if step <= 0 or stop < start:
        raise ValueError(f"budget grid needs step > 0 and stop >= start, got {start}:{stop}:{step}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(count)]


def allocate(table: ErrorTable, budget: float) -> tuple[int, ...]:
    """The minimum-error configuration of ``table`` within ``budget`` average bits."""
    return tuple(allocate_budget(table.errors.numpy(), table.numels, budget, table.options))


def config_bits(table: ErrorTable, choice: Sequence[int]) -> float:
    """Average bits per weight of a configuration."""
    return average_bits(table.numels, [table.options[j].bits_per_param for j in choice])


def check_budgets(name: str, budgets: object, table: ErrorTable) -> list[float]:
    """``budgets`` (the config key ``name``) as floats: a non-empty list of numbers, each within
    the table's achievable range of average bits."""
    low, high = achievable_range(table.numels, table.options)
    accepted = f"a list of bit-widths within the achievable range [{low:.4f}, {high:.4f}]"
    if isinstance(budgets, str | bytes) or not isinstance(budgets, Iterable):
        raise ValueError(f"{name}={budgets!r} is not a list; give {accepted}")
    values = list(budgets)
    not_numbers = [b for b in values if isinstance(b, bool) or not isinstance(b, numbers.Real)]
    if not values or not_numbers:
        what = "is empty" if not values else f"holds {not_numbers}, which are not numbers"
        raise ValueError(f"{name}={values!r} {what}; give {accepted}")
    outside = [b for b in values if not low <= b <= high]
    if outside:
        raise ValueError(
            f"{name}: budgets {outside} are outside the achievable range [{low:.4f}, {high:.4f}]"
        )
    return [float(b) for b in values]


def initial_training_set(table: ErrorTable, budgets: Sequence[float]) -> list[tuple[int, ...]]:
    """Allocations at ``budgets`` (each must be achievable), without duplicates, in budget order."""
    budgets = check_budgets("budgets", budgets, table)
    return list(dict.fromkeys(allocate(table, b) for b in budgets))


@dataclass(frozen=True)
class EvalConfig:
    """A configuration to evaluate: its target budget, split and actual average bits."""

    target_budget: float
    split: str  # "unseen" or "seen"
    choice: tuple[int, ...]
    avg_bits: float

    @property
    def config_id(self) -> str:
        return config_id(self.choice)


def unseen_config(
    table: ErrorTable, budget: float, training: Sequence[Sequence[int]], max_steps: int = 200
) -> tuple[int, ...]:
    """The allocation at ``budget``; if it is a training configuration, the allocation at
    ``budget − k·UNSEEN_STEP`` for the smallest k ≥ 1 that is not (so it still meets the budget)."""
    seen = {tuple(c) for c in training}
    for k in range(max_steps + 1):
        choice = allocate(table, budget - k * UNSEEN_STEP)
        if choice not in seen:
            return choice
    raise ValueError(f"no unseen allocation within {max_steps * UNSEEN_STEP} bits below {budget}")


def nearest_seen_config(
    table: ErrorTable, budget: float, training: Sequence[Sequence[int]]
) -> tuple[int, ...]:
    """The training configuration whose average bits is nearest ``budget`` (lower on ties)."""
    if not training:
        raise ValueError("the training configuration set is empty")
    return tuple(
        min(training, key=lambda c: (abs(config_bits(table, c) - budget), config_bits(table, c)))
    )


def evaluation_configs(
    table: ErrorTable,
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
            ("unseen", unseen_config(table, budget, ever_trained or training)),
            ("seen", nearest_seen_config(table, budget, training)),
        ):
            out.append(EvalConfig(budget, split, choice, config_bits(table, choice)))
    return out
