"""Training methods as objects, built by Hydra from ``conf/method/*.yaml``.

A method is a :class:`TrainingPlan` (which fits it makes, which configurations each fit trains,
validates and is evaluated on, which split the methods are compared on) and a
:class:`LoraInit` (how its LoRA factors start), plus the model settings of its YAML file
(``config_aware``, ``rank``, ...). A new method is a new plan or initialisation class and one
YAML file naming it with ``_target_``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from coalora.model.backbone import QuantizedLoRAModel
from coalora.quant import Choice, ConfigSpace
from coalora.selection import (
    EvalConfig,
    budget_grid,
    evaluation_configs,
    initial_training_set,
    nearest_seen_config,
)


@dataclass(frozen=True)
class TrainingRun:
    """One fit: its initial training configurations and, for per-budget methods, the budget
    it serves (evaluated on its own allocation only), which also names its folder."""

    name: str
    train_configs: list[Choice]
    budget: float | None = None


class TrainingPlan(ABC):
    """Which fits a method makes and which configurations each one uses."""

    searchable: ClassVar[bool] = False
    """Whether a configuration search may change the training set between epochs."""
    compared_split: ClassVar[str] = "unseen"
    """The evaluation split the method's hypervolume is computed on."""

    def check_budgets(self, space: ConfigSpace) -> None:  # noqa: B027 (optional hook)
        """Refuse budgets of the plan's own settings outside the space's range."""

    def check_residual_rank(self, residual_rank: int) -> None:  # noqa: B027 (optional hook)
        """Refuse ``method.residual_rank`` where the plan's fits cannot keep corrections."""

    def check_search(self, method: str, search: str, has_callback: bool) -> None:
        """Refuse a search (or search callback settings) for a plan whose set is fixed."""
        if has_callback and not self.searchable:
            wrong = (
                "search.callback settings (set them only for a search)"
                if search == "frozen"
                else f"search={search}"
            )
            raise ValueError(
                f"method={method} trains a fixed set of configurations; run it with "
                f"search=frozen, not {wrong}"
            )

    @abstractmethod
    def runs(self, space: ConfigSpace, eval_budgets: Sequence[float]) -> list[TrainingRun]:
        """The fits to make, in order."""

    def val_configs(
        self, space: ConfigSpace, run: TrainingRun, val_budgets: Sequence[float]
    ) -> list[Choice]:
        """The configurations validated after every epoch: the training configuration
        nearest each validation budget."""
        return [nearest_seen_config(space, b, run.train_configs) for b in val_budgets]

    def eval_configs(
        self,
        space: ConfigSpace,
        run: TrainingRun,
        eval_budgets: Sequence[float],
        epoch_configs: Sequence[Choice],
        trained_configs: Sequence[Choice],
    ) -> list[EvalConfig]:
        """Unseen and seen configurations at every budget (see
        :func:`coalora.selection.evaluation_configs`)."""
        return evaluation_configs(space, eval_budgets, epoch_configs, trained_configs)

    def lora_reference(self, space: ConfigSpace, run: TrainingRun, budget: float) -> Choice:
        """The configuration an initialisation fits the LoRA factors to: ``budget``'s
        allocation."""
        return space.allocate(budget)

    def fixed_configuration(self, run: TrainingRun) -> Choice | None:
        """The one configuration a fit trains, if it trains exactly one (its model then keeps
        only that configuration's packed weights); None otherwise."""
        return None

    def resumable(self, method: str, eval_budgets: Sequence[float]) -> str | None:
        """Why ``ckpt_path`` cannot resume ``method``'s fits at ``eval_budgets`` (None: it can)."""
        return None


class SearchedSet(TrainingPlan):
    """One fit on the allocations of a budget grid, which a search (``search=pareto_gp``) may
    change between epochs: CoA-LoRA.

    Args:
        initial_budgets: ``start``, ``stop`` and ``step`` of the grid (``search.initial_budgets``).
    """

    searchable = True

    def __init__(self, initial_budgets: dict[str, float]) -> None:
        self.budgets = budget_grid(**initial_budgets)

    def runs(self, space: ConfigSpace, eval_budgets: Sequence[float]) -> list[TrainingRun]:
        return [TrainingRun("", initial_training_set(space, self.budgets))]


class FixedSet(TrainingPlan):
    """One fit on the allocations of fixed budgets, one configuration sampled per step:
    Shared-LoRA.

    Args:
        budgets: the training budgets (``method.plan.budgets``).
    """

    def __init__(self, budgets: Sequence[float]) -> None:
        self.budgets = budgets

    def check_budgets(self, space: ConfigSpace) -> None:
        space.check_budgets("method.plan.budgets", self.budgets)

    def runs(self, space: ConfigSpace, eval_budgets: Sequence[float]) -> list[TrainingRun]:
        return [TrainingRun("", initial_training_set(space, list(self.budgets)))]


class PerBudget(TrainingPlan):
    """One fit per evaluation budget, each on that budget's allocation only, written to
    ``budget_<b>/`` and evaluated on it (the ``seen`` split): QLoRA, LQ-LoRA."""

    compared_split = "seen"

    def runs(self, space: ConfigSpace, eval_budgets: Sequence[float]) -> list[TrainingRun]:
        return [TrainingRun(f"budget_{b}", [space.allocate(b)], float(b)) for b in eval_budgets]

    def val_configs(
        self, space: ConfigSpace, run: TrainingRun, val_budgets: Sequence[float]
    ) -> list[Choice]:
        return list(run.train_configs)

    def eval_configs(
        self,
        space: ConfigSpace,
        run: TrainingRun,
        eval_budgets: Sequence[float],
        epoch_configs: Sequence[Choice],
        trained_configs: Sequence[Choice],
    ) -> list[EvalConfig]:
        choice = run.train_configs[0]
        return [EvalConfig(run.budget, "seen", choice, space.bits(choice))]

    def lora_reference(self, space: ConfigSpace, run: TrainingRun, budget: float) -> Choice:
        return run.train_configs[0]

    def fixed_configuration(self, run: TrainingRun) -> Choice | None:
        return run.train_configs[0]

    def check_residual_rank(self, residual_rank: int) -> None:
        if residual_rank:
            raise ValueError(
                f"method.residual_rank={residual_rank}: a per-budget fit keeps only its "
                "configuration's packed weights, from which no option's residual can be "
                "computed; set method.residual_rank=0"
            )

    def resumable(self, method: str, eval_budgets: Sequence[float]) -> str | None:
        if len(eval_budgets) > 1:
            return (
                f"ckpt_path resumes one run, but method={method} trains {len(eval_budgets)}: "
                "resume one budget at a time with eval.budgets=[<budget>]"
            )
        return None


class LoraInit:
    """The standard LoRA initialisation: ``A`` random, ``B = 0`` (what the layers start with)."""

    def apply(
        self, model: QuantizedLoRAModel, space: ConfigSpace, plan: TrainingPlan, run: TrainingRun
    ) -> None:
        """Initialise ``model``'s LoRA factors for ``run``."""

    def check_residual_rank(self, residual_rank: int) -> None:  # noqa: B027 (optional hook)
        """Refuse ``method.residual_rank`` where this initialisation would conflict with it."""


class SVDInit(LoraInit):
    """LQ-LoRA's initialisation: ``scale · B A`` = the rank-r SVD of ``W − Q(W)``, at the run's
    own allocation for a per-budget fit, else at ``reference_budget``'s.

    Args:
        reference_budget: the budget whose allocation a multi-configuration fit starts from.
        iterations: rounds of LQ-LoRA's alternating fit (> 1: its iterative variant, which
            then quantizes ``W − scale · B A``).
    """

    def __init__(self, reference_budget: float = 4.0, iterations: int = 1) -> None:
        self.reference_budget = reference_budget
        self.iterations = iterations

    def apply(
        self, model: QuantizedLoRAModel, space: ConfigSpace, plan: TrainingPlan, run: TrainingRun
    ) -> None:
        self.check_residual_rank(model.residual_rank)
        choice = plan.lora_reference(space, run, self.reference_budget)
        model.init_lora_from_residual(choice, self.iterations)

    def check_residual_rank(self, residual_rank: int) -> None:
        if residual_rank:
            raise ValueError(
                f"method.residual_rank={residual_rank} already corrects every option's "
                "residual; method/init=svd would correct the reference allocation's a second "
                "time: use method/init=standard, or set method.residual_rank=0"
            )
