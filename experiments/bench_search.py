"""Search benchmark: time and memory of one Pareto GP search round as the matrix count N grows.

For each N, a synthetic error table of N target matrices with the shapes of Qwen2.5-0.5B's
blocks (q 896×896, k and v 128×896, o 896×896, gate and up 4864×896, down 896×4864, repeated
block after block; N = 168 is that model's 24 blocks), every option of
``config_space("nf")`` and random positive errors falling with bits. The initial pool is
:func:`coalora.selection.initial_training_set` of ``search.initial_budgets`` as a run builds it,
and the search is :class:`coalora.search.ParetoGPSearch` with the settings of
``conf/search/pareto_gp.yaml``. A synthetic scorer stands in for the model: the loss is a
smooth function of the configuration's quantization errors (log of a sensitivity-weighted mean
relative error) plus small Gaussian noise.

One round (``search.step``) is timed after a warm-up round on a small table, each N in its own
process (resident memory is not given back to the system between sizes). Reported per N: the
round's wall time, the scorer's share, the search's own work (round minus scoring) and its
parts (building the acquisition, GP fit included; the guided walk), the added resident memory
(peak during the round minus resident before, :class:`coalora.memory.PeakMemory`), the
acquisition evaluations, the configurations scored (one model forward pass each in a run) and
the single-matrix moves of the walk, in total and per walker. Writes ``search_round.csv`` and
``search_round.json`` under ``--out``; the target at N = 168 is at most
``OWN_SECONDS_LIMIT`` seconds of own work and ``ADDED_RESIDENT_LIMIT_GIB`` added resident.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_quant import console, machine_info, print_table, write_csv
from omegaconf import OmegaConf

import coalora.search.search as search_module
from coalora.memory import MIB, PeakMemory, resident_bytes
from coalora.quant import ConfigSpace, ErrorTable, config_space
from coalora.search import ParetoGPSearch
from coalora.selection import budget_grid, initial_training_set

BLOCK_SHAPES = {
    "self_attn.q_proj": (896, 896),
    "self_attn.k_proj": (128, 896),
    "self_attn.v_proj": (128, 896),
    "self_attn.o_proj": (896, 896),
    "mlp.gate_proj": (4864, 896),
    "mlp.up_proj": (4864, 896),
    "mlp.down_proj": (896, 4864),
}
"""Target matrices of one Qwen2.5-0.5B block and their (out, in) shapes."""

SIZES = (36, 168, 224)
TARGET_SIZE = 168
OWN_SECONDS_LIMIT = 60.0
ADDED_RESIDENT_LIMIT_GIB = 0.5
WARMUP_SIZE = 7
"""Matrices of the warm-up round (imports, one-time allocations)."""
NOISE_STD = 1e-3
"""Standard deviation of the scorer's noise (the loss spans about 0.5 over the bit range)."""
CONFIG_PATH = Path(__file__).resolve().parents[1] / "conf" / "search" / "pareto_gp.yaml"


def synthetic_table(num_matrices: int, seed: int) -> ErrorTable:
    """N matrices of Qwen2.5-0.5B block shapes, error = numel · c_i · 4^(−bits) · u_ij with a
    per-matrix scale c_i ~ LogNormal(0, 0.5) and u_ij ~ U(0.8, 1.2)."""
    rng = np.random.default_rng(seed)
    options = config_space("nf")
    bits = np.array([o.bits_per_param for o in options])
    kinds = list(BLOCK_SHAPES)
    names = [f"model.layers.{i // 7}.{kinds[i % 7]}" for i in range(num_matrices)]
    numels = [int(np.prod(BLOCK_SHAPES[kinds[i % 7]])) for i in range(num_matrices)]
    scale = rng.lognormal(0.0, 0.5, num_matrices)
    noise = rng.uniform(0.8, 1.2, (num_matrices, len(options)))
    errors = np.outer(np.asarray(numels) * scale, 4.0**-bits) * noise
    return ErrorTable(names, numels, options, torch.tensor(errors))


class SyntheticScorer:
    """loss(c) = 1 + 0.1 · log(Σ_i s_i · err_i(c_i) / numel_i / 4^−4) + ε, s_i random
    sensitivities summing to 1, ε ~ N(0, ``NOISE_STD``²); counts the configurations scored
    and the time spent."""

    def __init__(self, table: ErrorTable, seed: int) -> None:
        rng = np.random.default_rng(seed + 1)
        sensitivity = rng.lognormal(0.0, 1.0, len(table.names))
        self.relative = (
            table.errors.numpy()
            / np.asarray(table.numels)[:, None]
            * (sensitivity / sensitivity.sum())[:, None]
        )
        self.noise = np.random.default_rng(seed + 2)
        self.scored = 0
        self.seconds = 0.0

    def __call__(self, configs: list[tuple[int, ...]]) -> list[float]:
        start = time.perf_counter()
        rows = np.arange(self.relative.shape[0])
        losses = [
            1.0
            + 0.1 * np.log(self.relative[rows, list(c)].sum() / 4.0**-4)
            + self.noise.normal(0.0, NOISE_STD)
            for c in configs
        ]
        self.scored += len(configs)
        self.seconds += time.perf_counter() - start
        return [float(v) for v in losses]


def search_settings(path: Path, seed: int) -> tuple[dict[str, Any], list[float]]:
    """The ``ParetoGPSearch`` arguments and initial budgets of a search config file."""
    cfg = OmegaConf.create({"search": OmegaConf.load(path), "seed": seed})
    strategy = OmegaConf.to_container(cfg.search.strategy, resolve=True)
    strategy.pop("_target_")
    return strategy, budget_grid(**cfg.search.initial_budgets)


class Timed:
    """Wraps a function of ``coalora.search.search`` and adds its wall time to ``seconds``;
    keeps the last result."""

    def __init__(self, name: str) -> None:
        self.name, self.function = name, getattr(search_module, name)
        self.seconds, self.result = 0.0, None
        setattr(search_module, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        self.result = self.function(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return self.result


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    root = CONFIG_PATH.parents[2]
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def walk_moves(walk: Any, starts: np.ndarray) -> np.ndarray:
    """Single-matrix moves of each walker: the walk's own count where it keeps one, else the
    L1 grid distance from start to end (equal to the count unless a walker moved one matrix
    both ways)."""
    if hasattr(walk, "moves"):
        return np.asarray(walk.moves)
    distinct = np.array(list(dict.fromkeys(map(tuple, starts))), dtype=np.int64)
    return np.abs(walk.points - distinct[: len(walk.points)]).sum(axis=1)


def one_round(num_matrices: int, config: Path, seed: int) -> dict[str, Any]:
    settings, budgets = search_settings(config, seed)
    table = synthetic_table(num_matrices, seed)
    space = ConfigSpace.from_table(table)
    pool = initial_training_set(space, budgets)
    search = ParetoGPSearch(space, pool, **settings)
    scorer = SyntheticScorer(table, seed)
    starts: list[np.ndarray] = []
    walk_function = search_module.guided_walk

    def recording_walk(acquisition: Any, grid: Any, walk_starts: np.ndarray, *a: Any, **k: Any):
        starts.append(np.asarray(walk_starts))
        return walk_function(acquisition, grid, walk_starts, *a, **k)

    search_module.guided_walk = recording_walk
    acquisition, walk = Timed("log_ehvi"), Timed("guided_walk")
    try:
        gc.collect()
        before = resident_bytes()
        with PeakMemory() as peak:
            start = time.perf_counter()
            result = search.step(scorer)
            round_s = time.perf_counter() - start
    finally:
        search_module.log_ehvi, search_module.guided_walk = acquisition.function, walk_function
    moves = walk_moves(walk.result, starts[-1])
    return {
        "matrices": num_matrices,
        "options": len(table.options),
        "pool": result.pool_size,
        "walkers": len(moves),
        "round_s": round_s,
        "scoring_s": scorer.seconds,
        "search_own_s": round_s - scorer.seconds,
        "acquisition_build_s": acquisition.seconds,
        "walk_s": walk.seconds,
        "added_resident_mib": peak.rss_mib - before / MIB,
        "acquisition_evaluations": result.acquisition_evaluations,
        "configurations_scored": scorer.scored,
        "proposals": len(result.configs) - result.pool_size,
        "kept": len(result.kept),
        "proposals_kept": sum(i >= result.pool_size for i in result.kept),
        "moves_total": int(moves.sum()),
        "moves_per_walker_min": int(moves.min()),
        "moves_per_walker_mean": float(moves.mean()),
        "moves_per_walker_max": int(moves.max()),
        "settings": settings,
    }


def child(num_matrices: int, config: Path, seed: int, out: Path) -> None:
    torch.set_num_threads(1)
    one_round(WARMUP_SIZE, config, seed)
    out.write_text(json.dumps(one_round(num_matrices, config, seed)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_search"))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config", type=Path, default=CONFIG_PATH, help="search config (pareto_gp.yaml)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.config, args.seed, args.child_out)
        return
    torch.set_num_threads(1)
    machine_info()
    load_before = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for n in args.sizes:
        part = args.out / f".round_{n}.json"
        command = [sys.executable, __file__, "--seed", str(args.seed), "--config", str(args.config)]
        command += ["--child", str(n)]
        subprocess.run([*command, "--child-out", str(part)], check=True, env=env)
        rows.append(json.loads(part.read_text()))
        part.unlink()
        console.print(f"N={n}: {rows[-1]['search_own_s']:.1f} s own work")
    table_rows = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
    transposed = [
        {"quantity": key, **{f"N={r['matrices']}": r[key] for r in table_rows}}
        for key in table_rows[0]
        if key != "matrices"
    ]
    print_table("one search round", transposed, {f"N={r['matrices']}": ".4g" for r in rows})
    write_csv(args.out / "search_round.csv", table_rows)
    (args.out / "search_round.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "config": shown(args.config),
                "threads": 1,
                "load_average": {"before": load_before, "after": os.getloadavg()[0]},
                "rounds": rows,
            },
            indent=1,
        )
    )
    for row in rows:
        if row["matrices"] == TARGET_SIZE:
            gib = row["added_resident_mib"] / 1024
            ok = row["search_own_s"] <= OWN_SECONDS_LIMIT and gib <= ADDED_RESIDENT_LIMIT_GIB
            console.print(
                f"N={TARGET_SIZE}: own work {row['search_own_s']:.1f} s (limit "
                f"{OWN_SECONDS_LIMIT:.0f}), added resident {gib:.2f} GiB (limit "
                f"{ADDED_RESIDENT_LIMIT_GIB}): {'met' if ok else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
