"""The four-method comparison across tasks: one table and one plot from the reports of
``experiments/compare.py``, and the goals that span tasks.

    python experiments/compare_overview.py                     # the default four reports
    python experiments/compare_overview.py sst2-minilm-nf mrpc-minilm-nf

Reads ``experiments/results/<report>/summary.json`` for each report named (a folder under
``experiments/results``) and writes ``experiments/results/comparison_overview.md`` and
``comparison_overview.png`` (each method's hypervolume per task, mean ± standard deviation
over seeds). A report that does not exist yet, or has one seed only, is listed as not yet run,
not skipped silently. Goals across tasks count tasks (SST-2 with NF and with int is one task).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from compare import (
    LABELS,
    LOW_BUDGETS,
    METHODS,
    RESULTS,
    best_other,
    low_budget_wins,
    time_ratios,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPORTS = ("sst2-minilm-nf", "sst2-minilm-int", "mrpc-minilm-nf", "wikitext2-smollm2-nf")
TASKS_NEEDED = 2
"""On how many tasks CoA-LoRA must beat Shared-LoRA at every low budget (paired interval > 0)."""


def load(results: Path, names: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The summaries of the named reports with two seeds or more, and the names of the others
    (absent, or one seed: not comparable with intervals over seeds)."""
    found, missing = {}, []
    for name in names:
        path = results / name / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        if summary is None or len(summary["setup"]["seeds"]) < 2:
            missing.append(name)
        else:
            found[name] = summary
    return found, missing


def task_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What the overview shows of one report."""
    methods, setup = summary["methods"], summary["setup"]
    best = best_other(methods)
    return {
        "name": name,
        "setup": setup,
        "best": best,
        "hv_gap": methods[best]["hv_diff"],
        "hv_gap_interval": methods[best]["hv_diff_interval"],
        "time_ratio": time_ratios(methods),
        "low_wins": low_budget_wins(methods, setup),
        "low_budgets": [b for b in setup["budgets"] if b in LOW_BUDGETS],
    }


def markdown(rows: list[dict[str, Any]], summaries: dict, missing: list[str]) -> str:
    lines = [
        "# The four methods across tasks",
        "",
        "Hypervolume on the test split, mean ± standard deviation over seeds (each report: "
        "learning rate chosen on validation, its seeds, 95 % paired bootstrap intervals). "
        "Gap: CoA-LoRA − the best other method, with its paired interval. Time: CoA-LoRA's "
        "training time over each per-budget method's (goal ≤ 0.5). Low budgets: where "
        "CoA-LoRA beats Shared-LoRA with the paired interval above 0 (goal: all of "
        f"{', '.join(f'{b:g}' for b in LOW_BUDGETS)} bits on at least {TASKS_NEEDED} tasks). "
        "Stops: every fit of the report stops once this has not improved for that many epochs.",
        "",
        "| task | stops | "
        + " | ".join(LABELS[m] for m in METHODS)
        + " | gap to the best other | time vs QLoRA | time vs LQ-LoRA | low budgets won |",
        "|---" * (len(METHODS) + 6) + "|",
    ]
    for row in rows:
        methods = summaries[row["name"]]["methods"]
        hvs = " | ".join(f"{methods[m]['hv']:.4f} ± {methods[m]['hv_sd']:.4f}" for m in METHODS)
        lo, hi = row["hv_gap_interval"]
        won = ", ".join(f"{b:g}" for b in row["low_wins"]) or "none"
        setup = row["setup"]
        stops = f"{setup['stop_monitor']}, {setup['patience']}"
        lines.append(
            f"| [{row['name']}]({row['name']}/report.md) | {stops} | {hvs} | {row['hv_gap']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] vs {LABELS[row['best']]} | "
            f"{row['time_ratio']['qlora']:.2f} | {row['time_ratio']['lqlora']:.2f} | {won} |"
        )
    lines += ["", "Goals:", ""]
    for row in rows:
        hv_met = row["hv_gap"] >= 0
        time_met = all(r <= 0.5 for r in row["time_ratio"].values())
        lines.append(
            f"- {row['name']}: mean HV ≥ the best other's {'met' if hv_met else 'missed'} "
            f"({row['hv_gap']:+.4f}); time ≤ 0.5× {'met' if time_met else 'missed'} "
            f"({max(row['time_ratio'].values()):.2f}× the slower ratio)."
        )
    all_low = [r for r in rows if r["low_budgets"] and r["low_wins"] == r["low_budgets"]]
    tasks = {r["setup"]["task"] for r in all_low}
    verdict = "met" if len(tasks) >= TASKS_NEEDED else "missed"
    lines.append(
        f"- Above Shared-LoRA at every low budget with the interval above 0 on at least "
        f"{TASKS_NEEDED} tasks: {verdict} ({len(tasks)} task(s) of "
        f"{len({r['setup']['task'] for r in rows})}; reports: "
        f"{', '.join(r['name'] for r in all_low) or 'none'})."
    )
    if missing:
        lines += ["", f"Not yet run with several seeds: {', '.join(missing)}."]
    lines += ["", "![hypervolume per task](comparison_overview.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summaries: dict, path: Path) -> None:
    """Grouped bars: each method's hypervolume per task, ± its standard deviation over seeds."""
    fig = Figure(figsize=(2.2 + 2.0 * len(rows), 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(METHODS)
    x = np.arange(len(rows))
    for i, method in enumerate(METHODS):
        stats = [summaries[r["name"]]["methods"][method] for r in rows]
        ax.bar(
            x + (i - (len(METHODS) - 1) / 2) * width,
            [s["hv"] for s in stats],
            width,
            yerr=[s["hv_sd"] for s in stats],
            capsize=3,
            label=LABELS[method],
        )
    ax.set_xticks(x, [r["name"] for r in rows], fontsize=8)
    ax.set_ylabel("test hypervolume (mean ± sd over seeds)")
    lows = [summaries[r["name"]]["methods"][m]["hv"] for r in rows for m in METHODS]
    ax.set_ylim(max(0.0, min(lows) - 0.1), None)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_overview(results: Path, names: list[str]) -> list[dict[str, Any]]:
    summaries, missing = load(results, names)
    if not summaries:
        raise FileNotFoundError(f"none of the reports {names} exists under {results}")
    rows = [task_row(name, summary) for name, summary in summaries.items()]
    (results / "comparison_overview.md").write_text(markdown(rows, summaries, missing))
    plot(rows, summaries, results / "comparison_overview.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="*", default=list(REPORTS), help="report folders")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the reports are")
    args = parser.parse_args()
    write_overview(args.results, args.reports)
    print(f"overview: {args.results / 'comparison_overview.md'}")


if __name__ == "__main__":
    main()
