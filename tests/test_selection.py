"""Which configurations a run trains, validates and evaluates on."""

import pytest

from coalora.selection import (
    budget_grid,
    evaluation_configs,
    initial_training_set,
    nearest_seen_config,
    unseen_config,
)


def test_budget_grid():
    assert budget_grid(2.25, 6.5, 0.25)[:3] == [2.25, 2.5, 2.75]
    assert budget_grid(2.25, 6.5, 0.1)[-1] == 6.45
    assert len(budget_grid(2.5, 6.5, 1.0)) == 5
    with pytest.raises(ValueError, match="step > 0"):
        budget_grid(3, 2, 0.1)


def test_initial_set_is_deduplicated_and_within_budgets(space):
    budgets = budget_grid(2.25, 6.5, 0.05)
    configs = initial_training_set(space, budgets)
    assert len(configs) == len(set(configs)) <= len(budgets)
    assert configs[0] == space.allocate(2.25)
    assert all(space.bits(c) <= 6.5 + 1e-9 for c in configs)
    with pytest.raises(ValueError, match=r"\[1\.0\] are outside the achievable range"):
        initial_training_set(space, [1.0, 3.0])


def test_unseen_config_steps_off_the_training_set(space):
    training = [space.allocate(3.0), space.allocate(2.99)]
    choice = unseen_config(space, 3.0, training)
    assert choice not in training and space.bits(choice) <= 3.0
    assert choice == space.allocate(2.98)
    assert unseen_config(space, 4.0, training) == space.allocate(4.0)


def test_seen_config_is_the_nearest_training_configuration(space):
    training = [space.allocate(b) for b in (2.5, 3.5, 5.0)]
    assert nearest_seen_config(space, 3.4, training) == training[1]
    assert nearest_seen_config(space, 6.0, training) == training[2]
    with pytest.raises(ValueError, match="empty"):
        nearest_seen_config(space, 3.0, [])


def test_evaluation_configs_cover_every_budget_and_split(space):
    training = initial_training_set(space, budget_grid(2.25, 6.5, 0.5))
    configs = evaluation_configs(space, [2.5, 4.0], training)
    assert [(c.target_budget, c.split) for c in configs] == [
        (2.5, "unseen"), (2.5, "seen"), (4.0, "unseen"), (4.0, "seen"),
    ]  # fmt: skip
    for c in configs:
        assert c.avg_bits == pytest.approx(space.bits(c.choice))
        assert (c.choice in training) == (c.split == "seen")
