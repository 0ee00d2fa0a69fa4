"""Budget allocation and error tables."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from coalora.quant import (
    ConfigSpace,
    ErrorTable,
    QuantConfig,
    allocate_budget,
    cached_error_table,
    config_space,
    diagonal_fisher,
    error_table,
)
from coalora.quant.allocation import efficient_options
from coalora.quant.space import mean_bits

SPACE = config_space("nf")
MINILM_NUMELS = [384 * 384] * 24 + [384 * 1536] * 12


def brute_force(errors, numels, budget, options):
    bpp = [o.bits_per_param for o in options]
    best, best_choice = np.inf, None
    for choice in itertools.product(range(len(options)), repeat=len(numels)):
        if mean_bits([bpp[j] for j in choice], numels) <= budget + 1e-12:
            total = sum(errors[i][j] for i, j in enumerate(choice))
            if total < best:
                best, best_choice = total, choice
    return best, best_choice


def milp_minimum(errors, numels, budget, options):
    """Reference: the minimum total error by scipy's MILP (HiGHS), +inf entries left out."""
    errors = np.asarray(errors, dtype=np.float64)
    bpp = np.array([o.bits_per_param for o in options])
    rows, cols = np.nonzero(np.isfinite(errors))
    weights = np.asarray(numels, dtype=np.float64) / np.sum(numels)
    n = len(rows)
    one_per_matrix = sp.csr_array((np.ones(n), (rows, np.arange(n))), shape=(len(numels), n))
    result = milp(
        c=errors[rows, cols],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_per_matrix, 1, 1),
            LinearConstraint((weights[rows] * bpp[cols])[None], -np.inf, budget),
        ],
        options={"mip_rel_gap": 0.0},
    )
    assert result.success, result.message
    return result.fun


def total_error(errors, choice):
    return sum(errors[i][j] for i, j in enumerate(choice))


def synthetic_errors(rng, numels, options):
    bpp = np.array([o.bits_per_param for o in options])
    scale = rng.uniform(0.5, 2.0, size=(len(numels), 1)) * np.asarray(numels)[:, None]
    return scale * 4.0 ** (-bpp) * rng.uniform(0.7, 1.3, size=(len(numels), len(options)))


@pytest.mark.parametrize("trial", range(12))
def test_allocation_equals_brute_force(trial):
    rng = np.random.default_rng(trial)
    options = [SPACE[j] for j in sorted(rng.choice(len(SPACE), size=6, replace=False))]
    numels = rng.integers(100, 5000, size=4).tolist()
    errors = synthetic_errors(rng, numels, options)
    low, high = ConfigSpace(options, numels).range
    budget = float(rng.uniform(low, high))
    choice = allocate_budget(errors, numels, budget, options)
    best, _ = brute_force(errors, numels, budget, options)
    assert sum(errors[i][j] for i, j in enumerate(choice)) == pytest.approx(best, rel=1e-9)
    assert mean_bits([options[j].bits_per_param for j in choice], numels) <= budget + 1e-9


def test_allocation_meets_budget_on_full_space():
    rng = np.random.default_rng(1)
    numels = [147456] * 24 + [589824] * 12
    errors = synthetic_errors(rng, numels, SPACE)
    previous = np.inf
    for budget in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0):
        choice = allocate_budget(errors, numels, budget, SPACE)
        reached = mean_bits([SPACE[j].bits_per_param for j in choice], numels)
        assert budget - 0.05 < reached <= budget + 1e-9
        total = sum(errors[i][j] for i, j in enumerate(choice))
        assert total < previous  # a larger budget never does worse
        previous = total


def test_allocation_at_range_ends():
    numels = [4096, 1024]
    errors = synthetic_errors(np.random.default_rng(2), numels, SPACE)
    low, high = ConfigSpace(SPACE, numels).range
    assert low == pytest.approx(2.0322, abs=1e-4) and high == pytest.approx(8.625)
    cheapest = allocate_budget(errors, numels, low, SPACE)
    assert all(SPACE[j].bits_per_param == pytest.approx(low) for j in cheapest)


@pytest.mark.parametrize("budget", [1.9, 2.03, 8.7, 12.0])
def test_allocation_out_of_range_fails_clearly(budget):
    numels = [4096, 1024]
    errors = synthetic_errors(np.random.default_rng(3), numels, SPACE)
    with pytest.raises(ValueError, match=r"outside the achievable range \[2\.0322, 8\.6250\]"):
        allocate_budget(errors, numels, budget, SPACE)


def test_allocation_rejects_bad_tables():
    numels = [4096, 1024]
    errors = synthetic_errors(np.random.default_rng(4), numels, SPACE)
    with pytest.raises(ValueError, match="expected"):
        allocate_budget(errors[:1], numels, 4.0, SPACE)
    with pytest.raises(ValueError, match="positive"):
        allocate_budget(errors, [4096, 0], 4.0, SPACE)
    bad = errors.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        allocate_budget(bad, numels, 4.0, SPACE)


def unusable_and_tied(rng, errors):
    """``errors`` rounded to two significant digits (ties) with about 15% set to +inf."""
    tied = np.round(errors / 10.0 ** np.floor(np.log10(errors)), 1) * 10.0 ** np.floor(
        np.log10(errors)
    )
    tied[rng.random(errors.shape) < 0.15] = np.inf
    tied[np.arange(len(tied)), rng.integers(0, tied.shape[1], len(tied))] = 1e9  # usable
    return tied


def usable_range(errors, numels, options):
    bpp = np.array([o.bits_per_param for o in options])
    usable = np.where(np.isfinite(errors), bpp, np.nan)
    return (
        mean_bits(np.nanmin(usable, axis=1), numels),
        mean_bits(np.nanmax(usable, axis=1), numels),
    )


def assert_optimal(errors, numels, budget, options, choice):
    bpp = [o.bits_per_param for o in options]
    assert mean_bits([bpp[j] for j in choice], numels) <= budget + 1e-9
    assert np.isfinite(total_error(errors, choice))
    expected = milp_minimum(errors, numels, budget, options)
    assert total_error(errors, choice) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("trial", range(16))
def test_allocation_equals_milp_on_random_tables(trial):
    rng = np.random.default_rng(100 + trial)
    options = [SPACE[j] for j in sorted(rng.choice(len(SPACE), size=40, replace=False))]
    numels = rng.choice([1024, 4096, 16384], size=int(rng.integers(4, 16))).tolist()
    errors = synthetic_errors(rng, numels, options)
    if trial % 2:
        errors = unusable_and_tied(rng, errors)
    low, high = usable_range(errors, numels, options)
    budget = float(rng.uniform(low, high))
    assert_optimal(
        errors, numels, budget, options, allocate_budget(errors, numels, budget, options)
    )


@pytest.mark.parametrize("budget", [2.1, 3.3, 4.6, 5.9, 7.7])
def test_allocation_equals_milp_on_minilm_sized_table(budget):
    rng = np.random.default_rng(5)
    options = SPACE[::4]
    errors = synthetic_errors(rng, MINILM_NUMELS, options)
    choice = allocate_budget(errors, MINILM_NUMELS, budget, options)
    assert_optimal(errors, MINILM_NUMELS, budget, options, choice)


@pytest.mark.slow
@pytest.mark.parametrize("unusable", [False, True])
def test_allocation_equals_milp_on_full_space_sweep(unusable):
    rng = np.random.default_rng(6)
    errors = synthetic_errors(rng, MINILM_NUMELS, SPACE)
    if unusable:
        errors = unusable_and_tied(rng, errors)
    low, high = usable_range(errors, MINILM_NUMELS, SPACE)
    for budget in np.linspace(low, high, 17):
        choice = allocate_budget(errors, MINILM_NUMELS, float(budget), SPACE)
        assert_optimal(errors, MINILM_NUMELS, float(budget), SPACE, choice)


def test_allocation_skips_unusable_options():
    numels = [4096, 4096]
    errors = synthetic_errors(np.random.default_rng(7), numels, SPACE)
    bpp = np.array([o.bits_per_param for o in SPACE])
    errors[0, bpp < 3] = np.inf  # matrix 0 cannot use 2-bit codes
    choice = allocate_budget(errors, numels, 2.6, SPACE)
    assert bpp[choice[0]] >= 3 and bpp[choice[1]] < 2.2
    assert_optimal(errors, numels, 2.6, SPACE, choice)
    with pytest.raises(
        ValueError,
        match=r"budget=2\.3 bits is below 2\.5[0-9]* bits, the lowest average of the usable",
    ):
        allocate_budget(errors, numels, 2.3, SPACE)
    errors[1] = np.inf
    with pytest.raises(
        ValueError, match=r"every option has error \+inf \(unusable\) in rows \[1\]"
    ):
        allocate_budget(errors, numels, 4.0, SPACE)


def test_allocation_names_the_nan_row():
    numels = [4096, 1024, 1024]
    errors = synthetic_errors(np.random.default_rng(8), numels, SPACE)
    errors[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or -inf entries in rows \[2\]"):
        allocate_budget(errors, numels, 4.0, SPACE)


@pytest.mark.parametrize(
    ("budget", "error", "message"),
    [
        ("3", TypeError, r"budget must be a number .* \[2\.0322, 8\.6250\], got '3' of type str"),
        (True, TypeError, r"got True of type bool"),
        (None, TypeError, r"got None of type NoneType"),
        (float("nan"), ValueError, r"budget=nan bits is outside the achievable range \[2\.0322"),
    ],
)
def test_allocation_rejects_bad_budgets(budget, error, message):
    numels = [4096, 1024]
    errors = synthetic_errors(np.random.default_rng(9), numels, SPACE)
    with pytest.raises(error, match=message):
        allocate_budget(errors, numels, budget, SPACE)


def test_allocation_accepts_numpy_and_int_budgets():
    numels = [4096, 1024]
    errors = synthetic_errors(np.random.default_rng(10), numels, SPACE)
    expected = allocate_budget(errors, numels, 4.0, SPACE)
    assert allocate_budget(errors, numels, 4, SPACE) == expected
    assert allocate_budget(errors, numels, np.float32(4.0), SPACE) == expected


def test_efficient_options_of_a_table_match_its_rows():
    rng = np.random.default_rng(11)
    bpp = np.array([o.bits_per_param for o in SPACE])
    errors = np.round(rng.uniform(0, 3, (5, len(SPACE))))  # many exact ties
    errors[rng.random(errors.shape) < 0.1] = np.inf
    errors[0, 3] = np.nan
    mask = efficient_options(errors, bpp)
    for row, kept in zip(errors, mask, strict=True):
        assert np.array_equal(efficient_options(row, bpp), kept)
        expected = np.zeros(len(bpp), dtype=bool)
        best = np.inf
        for j in np.lexsort((row, bpp)):  # the definition: first of each strict improvement
            if row[j] < best:
                expected[j], best = True, row[j]
        assert np.array_equal(kept, expected)


def test_error_table_shape_and_order(minilm_weights):
    weights = dict(list(minilm_weights.items())[:2])
    options = SPACE[::40]
    table = error_table(weights, options, progress=False)
    assert table.names == list(weights) and table.errors.shape == (2, len(options))
    assert table.numels == [w.numel() for w in weights.values()]
    # More bits with everything else fixed gives a smaller error.
    by_bits = [SPACE.index(QuantConfig(b, 8, "fp32", 64, 256)) for b in (2, 3, 4, 8)]
    full = error_table(weights, [SPACE[j] for j in by_bits], progress=False).errors
    assert (full.diff(dim=1) < 0).all()


def test_error_table_cache(tmp_path, minilm_weights):
    weights = dict(list(minilm_weights.items())[:1])
    first = cached_error_table(weights, "int", tmp_path, "org/minilm", progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("org--minilm-int-plain-")
    again = cached_error_table(weights, "int", tmp_path, "org/minilm", progress=False)
    assert torch.equal(first.errors, again.errors) and again.options == config_space("int")
    changed = {k: w * 1.5 for k, w in weights.items()}
    cached_error_table(changed, "int", tmp_path, "org/minilm", progress=False)
    assert len(list(tmp_path.iterdir())) == 2  # different weights, different entry
    loaded = ErrorTable.load(files[0])
    assert loaded.names == first.names


def test_fisher_weighting_changes_errors():
    w = torch.randn(64, 64)
    fisher = {"w": torch.zeros_like(w)}
    fisher["w"][:32] = 1.0
    plain = error_table({"w": w}, SPACE[:8], progress=False).errors
    weighted = error_table({"w": w}, SPACE[:8], fisher, progress=False).errors
    assert (weighted < plain).all() and (weighted > 0).all()
    with pytest.raises(ValueError, match="no entry"):
        error_table({"w": w, "v": w}, SPACE[:2], fisher, progress=False)


def test_diagonal_fisher_is_mean_squared_gradient():
    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1, bias=False)

        def forward(self, x, y):
            loss = (self.linear(x).squeeze(-1) - y).square().mean()
            return type("Out", (), {"loss": loss})()

    model = Regressor()
    model.linear.weight.requires_grad_(False)
    batches = [{"x": torch.randn(5, 3), "y": torch.randn(5)} for _ in range(3)]
    fisher = diagonal_fisher(model, {"w": model.linear.weight}, batches)
    expected = torch.zeros(1, 3)
    for b in batches:
        residual = b["x"] @ model.linear.weight.T - b["y"][:, None]
        expected += (2 * (residual * b["x"]).mean(0, keepdim=True)).square()
    assert torch.allclose(fisher["w"], expected / 3, rtol=1e-5)
    assert not model.linear.weight.requires_grad  # flag restored
