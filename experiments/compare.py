"""The side-by-side comparison of QLoRA, LQ-LoRA, Shared-LoRA and CoA-LoRA (DESIGN §7-8).

Trains every method on the same backbone, task, data, epochs and seed(s) with one Hydra
multirun, then writes ``<out>/report.md``, ``<out>/summary.json``, ``<out>/metric_vs_bits.png``
and ``<out>/time_vs_budgets.png``. Every argument that is not an option is a Hydra override:

    python experiments/compare.py experiment=compare_minilm task=sst2 quant=nf
    python experiments/compare.py experiment=compare_minilm task=sst2 seed=0,1   # two seeds
    python experiments/compare.py --collect multirun/compare-sst2-minilm-nf       # report only
    python experiments/compare.py --collect <seed-0 sweep> <seed-1 sweep>        # seeds pooled

The default output folder is ``experiments/results/<task>-<model>-<quant>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

METHODS = ("qlora", "lqlora", "shared", "coalora")
LABELS = {"qlora": "QLoRA", "lqlora": "LQ-LoRA", "shared": "Shared-LoRA", "coalora": "CoA-LoRA"}
SCORED_ON = {"seen": "own allocation", "unseen": "unseen configurations"}
LOWER_IS_BETTER = {"perplexity"}
RESULTS = Path(__file__).resolve().parent / "results"


def run_sweep(overrides: list[str], sweep_dir: Path) -> None:
    """Train and evaluate every method: one ``coalora.run`` multirun job per method and seed."""
    command = [
        sys.executable,
        "-m",
        "coalora.run",
        "--multirun",
        f"method={','.join(METHODS)}",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def load_runs(*sweep_dirs: Path) -> list[dict[str, Any]]:
    """Every finished job of the sweeps: its summary, composed config, group choices and
    command-line overrides."""
    runs = []
    paths = [p for d in sweep_dirs for p in sorted(Path(d).glob("*/summary.json"))]
    for summary_path in paths:
        job = summary_path.parent
        hydra = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
        runs.append(
            {
                "summary": json.loads(summary_path.read_text()),
                "config": OmegaConf.load(job / ".hydra" / "config.yaml"),
                "choices": dict(hydra.runtime.choices),
                "overrides": list(hydra.overrides.task),
            }
        )
    if not runs:
        raise FileNotFoundError(
            f"no finished job (*/summary.json) under {', '.join(map(str, sweep_dirs))}"
        )
    return runs


def command_of(runs: list[dict[str, Any]]) -> str:
    """The comparison command that reproduces the sweep (its overrides, less the method)."""
    overrides = [o for o in runs[0]["overrides"] if not o.startswith(("method=", "seed="))]
    seeds = ",".join(str(s) for s in sorted({r["config"].seed for r in runs}))
    return " ".join(["python experiments/compare.py", *overrides, f"seed={seeds}"])


def setup_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What every job shares (task, model, quantization, data, epochs); raises if jobs differ."""
    fields = {
        "task": lambda r: r["summary"]["task"],
        "model": lambda r: r["choices"]["model"],
        "model_name": lambda r: r["summary"]["model"],
        "quant": lambda r: r["summary"]["quant"],
        "metric": lambda r: r["summary"]["metric"],
        "train_samples": lambda r: r["config"].data.max_train_samples,
        "max_length": lambda r: r["config"].data.max_length,
        "epochs": lambda r: r["config"].trainer.max_epochs,
        "batch_size": lambda r: r["config"].data.batch_size,
        "rank": lambda r: r["config"].method.rank,
        "lr": lambda r: r["config"].method.optimizer.lr,
        "test_samples": lambda r: r["summary"]["results"][0]["num_samples"],
        "budgets": lambda r: list(r["config"].eval.budgets),
        "hv_of": lambda r: r["summary"].get("hv_of", r["summary"]["metric"]),
        "reference": lambda r: r["summary"].get("reference", {}),
    }
    setup = {}
    for name, get in fields.items():
        values = {json.dumps(get(r)) for r in runs}
        if len(values) != 1:
            raise ValueError(f"the jobs differ in {name}: {sorted(values)}; compare like with like")
        setup[name] = json.loads(values.pop())
    setup["seeds"] = sorted({r["config"].seed for r in runs})
    return setup


def compare(runs: list[dict[str, Any]], budgets: list[float]) -> dict[str, dict[str, Any]]:
    """Per method, means over seeds: ``hv``, ``total_time_s``, the metric and average bits per
    budget, the cumulative training time per number of budgets served, and per-seed values."""
    jobs = Counter((r["summary"]["method"], r["config"].seed) for r in runs)
    repeated = sorted(job for job, n in jobs.items() if n > 1)
    if repeated:
        raise ValueError(f"(method, seed) jobs found more than once: {repeated}")
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_method[r["summary"]["method"]].append(r["summary"])
    missing = [m for m in METHODS if m not in by_method]
    if missing:
        raise ValueError(f"the sweep lacks methods {missing}; expected all of {METHODS}")
    out = {}
    for method in METHODS:
        summaries = by_method[method]
        points = defaultdict(list)  # budget -> [(bits, value)] over seeds
        for s in summaries:
            for rec in s["results"]:
                if rec["split"] == s["compared_split"]:
                    points[rec["target_budget"]].append((rec["avg_bits"], rec["value"]))
        absent = [b for b in budgets if b not in points]
        if absent:
            raise ValueError(f"{method} has no result at budgets {absent}")
        out[method] = {
            "split": summaries[0]["compared_split"],
            "hv": statistics.mean(s["hv"] for s in summaries),
            "total_time_s": statistics.mean(s["train_seconds"] for s in summaries),
            "peak_rss_mib": max(
                (s.get("memory", {}).get("peak_rss_mib") or 0.0 for s in summaries), default=0.0
            ),
            "metric": {str(b): statistics.mean(v for _, v in points[b]) for b in budgets},
            "avg_bits": {str(b): statistics.mean(x for x, _ in points[b]) for b in budgets},
            "cumulative_time_s": cumulative_time(summaries, budgets),
            "seeds": [
                {
                    "hv": s["hv"],
                    "total_time_s": s["train_seconds"],
                    "metric": {str(b): v for b, v in s["values"].items()},
                }
                for s in summaries
            ],
        }
    return out


def cumulative_time(summaries: list[dict[str, Any]], budgets: list[float]) -> list[float]:
    """Mean training seconds to serve the first n budgets, n = 1..len(budgets): the sum of the
    first n per-budget runs, or the one run's time for methods that serve every budget."""
    series = []
    for s in summaries:
        if s["runs"][0]["budget"] is None:  # one run serves every budget
            series.append([s["train_seconds"]] * len(budgets))
            continue
        seconds = {r["budget"]: r["train_seconds"] for r in s["runs"]}
        total, row = 0.0, []
        for b in budgets:
            total += seconds[b]
            row.append(total)
        series.append(row)
    return [statistics.mean(col) for col in zip(*series, strict=True)]


def plot_lines(
    lines: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    integer_x: bool = False,
    reference: dict[str, float] | None = None,
    log_y: bool = False,
) -> None:
    """One line with markers per label; ``reference`` values as dashed horizontal lines."""
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="grey", label=f"{label} ({value:.4g})")
    if log_y:
        ax.set_yscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_comparison(comparison: dict, setup: dict, out_dir: Path) -> None:
    """``metric_vs_bits.png`` and ``time_vs_budgets.png``."""
    title = f"{setup['task']} · {setup['model']} · {setup['quant']}"
    metric = {
        f"{LABELS[m]} ({SCORED_ON[c['split']]})": (
            list(c["avg_bits"].values()),
            list(c["metric"].values()),
        )
        for m, c in comparison.items()
    }
    plot_lines(
        metric,
        "average bits per parameter",
        setup["metric"],
        title,
        out_dir / "metric_vs_bits.png",
        reference=setup["reference"],
        log_y=setup["metric"] in LOWER_IS_BETTER,
    )
    time = {
        LABELS[m]: (
            list(range(1, len(c["cumulative_time_s"]) + 1)),
            [t / 60 for t in c["cumulative_time_s"]],
        )
        for m, c in comparison.items()
    }
    plot_lines(
        time,
        "number of budgets served",
        "cumulative training time (min)",
        title,
        out_dir / "time_vs_budgets.png",
        integer_x=True,
    )


def table_header(cells: list[str]) -> list[str]:
    """A markdown table's header row and separator."""
    return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]


def markdown(comparison: dict, setup: dict, command: str) -> str:
    budgets = [str(b) for b in setup["budgets"]]
    seeds = ", ".join(map(str, setup["seeds"]))
    samples = setup["train_samples"] or "all"
    lower = setup["metric"] in LOWER_IS_BETTER
    unit = f"blocks of {setup['max_length']} tokens" if lower else "examples"
    score = setup["hv_of"] if setup["hv_of"] != setup["metric"] else setup["metric"]
    reference = "".join(
        f" Reference: the {label} pre-trained model scores {value:.4f} on the same test set."
        for label, value in setup["reference"].items()
    )
    lines = [
        f"# {setup['task']} · {setup['model_name']} · {setup['quant'].upper()} quantization",
        "",
        f"Command: `{command}`",
        "",
        f"Setup: {samples} training {unit}, {setup['epochs']} epochs, seed(s) {seeds}, "
        f"batch {setup['batch_size']}, max length {setup['max_length']}, rank {setup['rank']}, "
        f"lr {setup['lr']}; test set: {setup['test_samples']} {unit}. "
        "Each method trains on the same data, epochs and seed.",
        "",
        f"{setup['metric'].capitalize()} per average-bit budget "
        f"({'lower' if lower else 'higher'} is better).{reference} QLoRA and LQ-LoRA train one "
        "adapter per budget and are scored on that budget's own allocation; Shared-LoRA and "
        "CoA-LoRA train once and are scored on unseen configurations (allocations never in "
        f"their training sets). HV: hypervolume of the (bits, {score}) points, bits mapped "
        "from [2, 8] to [0, 1], reference point (8 bits, 0); points below 0 add nothing. "
        "Time: total training wall time to serve all budgets (per-budget methods: the sum of "
        "their runs), LoRA initialisation and configuration search included, evaluation "
        "excluded; the jobs ran one after another, so compare times within a report. Memory: "
        "peak resident memory of a job's training and evaluation.",
        "",
        *table_header(["method", *budgets, "HV", "time (min)", "peak memory (GiB)"]),
    ]
    for method, c in comparison.items():
        values = " | ".join(f"{c['metric'][b]:.4f}" for b in budgets)
        time_min, memory = c["total_time_s"] / 60, c["peak_rss_mib"] / 1024
        lines.append(
            f"| {LABELS[method]} | {values} | {c['hv']:.4f} | {time_min:.1f} | {memory:.2f} |"
        )
    ours = comparison["coalora"]
    sign = -1 if lower else 1
    lines += [
        "",
        "CoA-LoRA's advantage over each method (difference in the metric, positive where "
        "CoA-LoRA is better, negative where it loses), and CoA-LoRA's training time over the "
        "method's:",
        "",
        *table_header(["vs", *budgets, "HV", "time ratio"]),
    ]
    for method, c in comparison.items():
        if method == "coalora":
            continue
        diffs = " | ".join(f"{sign * (ours['metric'][b] - c['metric'][b]):+.4f}" for b in budgets)
        ratio = ours["total_time_s"] / c["total_time_s"]
        lines.append(f"| {LABELS[method]} | {diffs} | {ours['hv'] - c['hv']:+.4f} | {ratio:.2f} |")
    if len(setup["seeds"]) > 1:
        lines += ["", "Per seed (HV / time in min):", ""]
        for method, c in comparison.items():
            per_seed = ", ".join(
                f"{s['hv']:.4f} / {s['total_time_s'] / 60:.1f}" for s in c["seeds"]
            )
            lines.append(f"- {LABELS[method]}: {per_seed}")
    lines += ["", "![metric](metric_vs_bits.png) ![time](time_vs_budgets.png)", ""]
    return "\n".join(lines)


def write_report(runs: list[dict[str, Any]], out_dir: Path, command: str) -> dict[str, Any]:
    setup = setup_of(runs)
    comparison = compare(runs, setup["budgets"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"setup": setup, "methods": comparison}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(comparison, setup, command))
    plot_comparison(comparison, setup, out_dir)
    return summary


def default_sweep_dir(overrides: list[str]) -> Path:
    """``multirun/compare-<task>-<quant>-<seed>`` from the overrides (``default`` if unset)."""
    choices = dict(o.split("=", 1) for o in overrides if "=" in o)
    tag = "-".join(choices.get(k, "default") for k in ("task", "quant", "seed"))
    return Path("multirun") / f"compare-{tag}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every job")
    parser.add_argument(
        "--collect", type=Path, nargs="+", help="report on finished sweeps; train nothing"
    )
    parser.add_argument("--sweep-dir", type=Path, help="where the jobs run (default: multirun/)")
    parser.add_argument("--out", type=Path, help="report folder (default: results/<name>)")
    args = parser.parse_args()
    if args.collect:
        runs = load_runs(*args.collect)
    else:
        sweep_dir = args.sweep_dir or default_sweep_dir(args.overrides)
        run_sweep(args.overrides, sweep_dir)
        runs = load_runs(sweep_dir)
    setup = setup_of(runs)
    out = args.out or RESULTS / f"{setup['task']}-{setup['model']}-{setup['quant']}"
    summary = write_report(runs, out, command_of(runs))
    for method, c in summary["methods"].items():
        print(f"{LABELS[method]:12s} hv {c['hv']:.4f}  time {c['total_time_s'] / 60:.1f} min")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
