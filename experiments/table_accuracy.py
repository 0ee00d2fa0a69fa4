"""Sampled against exact error tables: build time and the allocations they lead to.

For one model (MiniLM, SmolLM2-135M, or random weights with the target shapes of
Qwen2.5-0.5B) it builds the exact error table over ``config_space(fmt)`` and a sampled one
for each ``--fractions`` (``error_table(..., sample_fraction=f)``), allocates every
``--budgets`` budget on each, and scores each allocation by the *exact* table: a sampled
table is good enough when its allocations are the exact optimum's, or their exact total
error is within ``--tolerance`` (relative) of it. Prints a table and writes
``<model>-<fmt>.csv`` under ``--out``.

The exact table of a large model takes a while: ``--exact-table PATH`` loads it from PATH
when that exists (its build time from ``PATH.json``), and otherwise saves it there; run the
exact one once in the background and the sampled ones against it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_quant import console, machine_info, print_table, write_csv
from omegaconf import OmegaConf

from coalora.model.hub import load_backbone, package_path
from coalora.model.targets import find_targets, target_weights
from coalora.quant import ErrorTable, allocate_budget, config_space, error_table
from coalora.quant.space import mean_bits

CONF_MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"
MODELS = ("minilm", "smollm2", "qwen2.5-0.5b-random")
BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
FRACTIONS = ("1/8", "1/16")
TOLERANCE = 1e-3
"""Largest relative excess of a sampled allocation's exact error over the exact optimum."""
RANDOM_SCALE = 0.02
"""Standard deviation of the random weights (about that of trained LLM projections)."""


def qwen25_05b_config() -> Any:
    """Qwen2.5-0.5B's published architecture (its target shapes; no weights are read)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )


def load_weights(model: str, seed: int) -> dict[str, torch.Tensor]:
    """The target matrices of ``model`` (random N(0, 0.02²) ones for the Qwen shapes)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if model == "qwen2.5-0.5b-random":
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(qwen25_05b_config())
        generator = torch.Generator().manual_seed(seed)
        return {
            t.name: torch.randn(skeleton.get_submodule(t.name).weight.shape, generator=generator)
            * RANDOM_SCALE
            for t in find_targets(skeleton)
        }
    OmegaConf.register_new_resolver("package_path", package_path, replace=True)
    cfg = OmegaConf.load(CONF_MODELS / f"{model}.yaml")
    backbone = load_backbone(cfg, num_labels=2)
    return target_weights(backbone, find_targets(backbone, cfg.module_types))


def timed_table(
    weights: dict[str, torch.Tensor], fmt: str, fraction: float | None, seed: int
) -> tuple[ErrorTable, dict[str, float]]:
    """The table and its build time: wall seconds and this process's CPU seconds (which
    other processes on the cores inflate less)."""
    wall, cpu = time.perf_counter(), time.process_time()
    table = error_table(
        weights, config_space(fmt), progress=False, sample_fraction=fraction, seed=seed
    )
    return table, {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def exact_table(
    weights: dict[str, torch.Tensor], fmt: str, path: Path | None
) -> tuple[ErrorTable, dict[str, float]]:
    """The exact table, loaded from ``path`` if it exists, else built (and saved there, its
    build time in ``PATH.json``)."""
    sidecar = None if path is None else path.with_name(path.name + ".json")
    if path is not None and path.exists():
        table = ErrorTable.load(path)
        if table.names != list(weights) or table.options != config_space(fmt):
            raise ValueError(f"{path} holds a table for other matrices or options")
        unknown = {"seconds": float("nan"), "cpu_seconds": float("nan")}
        times = json.loads(sidecar.read_text()) if sidecar.exists() else unknown
        console.print(f"loaded the exact table from {path}")
        return table, times
    table, times = timed_table(weights, fmt, None, 0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
        sidecar.write_text(json.dumps(times))
    return table, times


def allocation_rows(
    model: str,
    exact: ErrorTable,
    sampled: dict[str, tuple[ErrorTable, dict[str, float]]],
    exact_times: dict[str, float],
    budgets: Sequence[float],
    tolerance: float,
) -> list[dict[str, Any]]:
    """One row per (table, budget): agreement of its allocation with the exact optimum's."""
    truth = exact.errors.numpy()
    rows_of = np.arange(len(exact.names))
    options = exact.options
    rows = []
    for budget in budgets:
        best = allocate_budget(truth, exact.numels, budget, options)
        optimum = truth[rows_of, best].sum()
        tables = {"exact": (exact, exact_times), **sampled}
        for name, (table, times) in tables.items():
            choice = (
                best
                if name == "exact"
                else allocate_budget(table.errors.numpy(), table.numels, budget, options)
            )
            total = truth[rows_of, choice].sum()
            relative = np.abs(table.errors.numpy() / truth - 1)
            estimated = relative.max(axis=1) > 0  # the matrices not done exactly
            rows.append(
                dict(
                    model=model,
                    table=name,
                    **times,
                    sampled_matrices=int(estimated.sum()),
                    median_rel_entry_error=float(np.median(relative[estimated]))
                    if estimated.any()
                    else 0.0,
                    budget=budget,
                    average_bits=mean_bits(
                        [options[j].bits_per_param for j in choice], exact.numels
                    ),
                    identical=choice == best,
                    matrices_differing=int(np.sum(np.array(choice) != np.array(best))),
                    exact_error=float(total),
                    excess_over_optimum=float(total / optimum - 1),
                    within_tolerance=bool(total <= optimum * (1 + tolerance)),
                )
            )
    return rows


def parse_fraction(text: str) -> float:
    value = float(Fraction(text))
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"fraction {text!r} is outside (0, 1]")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--fmt", choices=("nf", "int"), default="nf")
    parser.add_argument("--fractions", nargs="+", default=list(FRACTIONS), help="e.g. 1/8 0.0625")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--seed", type=int, default=0, help="chunk draw (and random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--exact-table", type=Path, default=None, help="load or save it here")
    parser.add_argument("--exact-only", action="store_true", help="build the exact table, stop")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/table_accuracy"))
    args = parser.parse_args(argv)
    try:
        args.fractions = [parse_fraction(f) for f in args.fractions]
    except (ValueError, ZeroDivisionError, argparse.ArgumentTypeError) as exc:
        parser.error(f"--fractions: {exc}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine_info()
    weights = load_weights(args.model, args.seed)
    numel = sum(w.numel() for w in weights.values())
    console.print(f"{args.model}: {len(weights)} target matrices, {numel / 1e6:.1f}M weights")
    exact, exact_times = exact_table(weights, args.fmt, args.exact_table)
    console.print(f"exact table: {exact_times}")
    if args.exact_only:
        return
    sampled = {}
    for fraction in args.fractions:
        name = str(Fraction(fraction).limit_denominator(1000))
        sampled[name] = timed_table(weights, args.fmt, fraction, args.seed)
        console.print(f"table sampled at {name}: {sampled[name][1]}")
    rows = allocation_rows(args.model, exact, sampled, exact_times, args.budgets, args.tolerance)
    shown = ("table", "seconds", "cpu_seconds", "sampled_matrices", "median_rel_entry_error")
    shown += ("budget", "matrices_differing", "excess_over_optimum")
    print_table(
        f"{args.model} ({args.fmt}, {len(weights)} matrices): allocations of each table, "
        "scored by the exact one",
        [{k: r[k] for k in shown} for r in rows],
        {
            "seconds": ".1f",
            "cpu_seconds": ".1f",
            "median_rel_entry_error": ".2e",
            "budget": ".1f",
            "average_bits": ".4f",
            "excess_over_optimum": ".2e",
        },
    )
    write_csv(args.out / f"{args.model}-{args.fmt}.csv", rows)
    worst = max(r["excess_over_optimum"] for r in rows)
    verdict = "PASS" if all(r["within_tolerance"] for r in rows) else "FAIL"
    console.print(
        f"every allocation within {args.tolerance:.1%} of the optimum: {verdict} "
        f"(largest excess {worst:.2e})"
    )


if __name__ == "__main__":
    main()
