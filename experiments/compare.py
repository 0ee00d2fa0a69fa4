"""The side-by-side comparison of QLoRA, LQ-LoRA, Shared-LoRA and CoA-LoRA.

Every method gets the same learning-rate grid: each grid point trains with the first seed,
and the method keeps the point with the best hypervolume on the validation split (carved
from the training data, never the test split); the other seeds then train at that point.
Training stops when the validation loss stops improving (the early-stopping callback;
``trainer.max_epochs`` caps it) and the epoch with the best validation metric is evaluated.
Then writes ``<out>/report.md``, ``<out>/summary.json`` and plots: the test metric per budget
with 95 % bootstrap intervals over test examples and seeds, the paired difference CoA-LoRA −
other, hypervolumes with their spread over seeds, the grid's validation scores and curves.

    python experiments/compare.py experiment=compare_minilm task=sst2 quant=nf
    python experiments/compare.py --lrs 5e-4 --seeds 0 experiment=compare_minilm task=rte
    python experiments/compare.py --collect multirun/compare-sst2-nf     # report only

Each job (method, learning rate, seed) runs ``coalora.run`` in its own folder
``<sweep>/<method>/lr_<lr>/seed_<seed>``; a job whose ``summary.json`` exists is collected,
not rerun, and a stopped per-budget job keeps its finished fits, so an interrupted sweep
resumes where it stopped. A job's report needs only its
small files (``summary.json``, ``job.json``, ``eval/examples.npz``, ``.hydra/``, the CSV
logs), so a sweep folder moved without its checkpoints resumes and reports elsewhere.
``--jobs 2`` runs two jobs side by side; ``--methods qlora,lqlora`` trains only those methods'
jobs (the report waits for all four). Every argument that is not an option is a Hydra
override of every job. The default output folder is ``experiments/results/<task>-<model>-<quant>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from compare_stats import LEVEL, RESAMPLES, comparison_stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from coalora.data import LOWER_IS_BETTER
from coalora.fit_results import FIT_RESULT

METHODS = ("qlora", "lqlora", "shared", "coalora")
LABELS = {"qlora": "QLoRA", "lqlora": "LQ-LoRA", "shared": "Shared-LoRA", "coalora": "CoA-LoRA"}
SCORED_ON = {"seen": "own allocation", "unseen": "unseen configurations"}
PER_BUDGET = ("qlora", "lqlora")
LOW_BUDGETS = (2.5, 3.0, 3.5)
"""The budgets where CoA-LoRA is expected to beat Shared-LoRA with a paired interval above 0."""
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LRS = (5e-4, 1e-3, 2e-3)
DEFAULT_SEEDS = (0, 1, 2)


def job_dir(sweep_dir: Path, method: str, lr: float, seed: int) -> Path:
    return sweep_dir / method / f"lr_{lr:g}" / f"seed_{seed}"


def run_job(overrides: list[str], folder: Path, method: str, lr: float, seed: int) -> Path:
    """Train and evaluate one (method, learning rate, seed) job in ``folder``, unless its
    ``summary.json`` exists; an unfinished job runs again, keeping the fits it finished
    (:func:`clear_unfinished`). Its start and end times go to ``job.json`` (what
    :func:`sweep_minutes` reads)."""
    if (folder / "summary.json").is_file():
        return folder
    clear_unfinished(folder)
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "coalora.run",
        f"method={method}",
        f"method.optimizer.lr={lr:g}",
        f"seed={seed}",
        *overrides,
        f"hydra.run.dir={folder}",
    ]
    print("running:", " ".join(command), flush=True)
    started = time.time()
    with (folder.parent / f"{folder.name}.log").open("a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    times = {"started": started, "finished": time.time()}
    (folder / "job.json").write_text(json.dumps(times) + "\n")
    return folder


def clear_unfinished(folder: Path) -> None:
    """Remove what a stopped job left in ``folder`` except its finished fits (a folder with
    ``fit_result.pt``, which ``coalora.run`` reads instead of training it again): an
    unfinished fit's logs and checkpoints start afresh."""
    if not folder.exists() or (folder / FIT_RESULT).is_file():
        return
    for entry in folder.iterdir():
        if (entry / FIT_RESULT).is_file():
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_jobs(overrides: list[str], jobs: list[tuple[str, float, int]], sweep: Path, n: int) -> None:
    """Run ``jobs`` (method, lr, seed), ``n`` at a time, the per-budget methods' first."""
    ordered = sorted(jobs, key=lambda j: j[0] not in PER_BUDGET)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(run_job, overrides, job_dir(sweep, *job), *job) for job in ordered]
        for future in futures:
            future.result()


def run_sweep(
    overrides: list[str],
    sweep: Path,
    lrs: list[float],
    seeds: list[int],
    n: int,
    methods: Sequence[str] = METHODS,
) -> None:
    """The grid with the first seed, then the other seeds at each method's chosen rate, for
    ``methods``; jobs already finished must share one setup (:func:`setup_of`) before any more
    run."""
    if any(sweep.glob("*/lr_*/seed_*/summary.json")):
        setup_of(load_runs(sweep))
    run_jobs(overrides, [(m, lr, seeds[0]) for m in methods for lr in lrs], sweep, n)
    runs = load_runs(sweep)
    setup_of(runs)
    chosen = choose_lrs(runs, seeds[0], methods)
    run_jobs(overrides, [(m, chosen[m], s) for m in methods for s in seeds[1:]], sweep, n)


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished job of the sweep: its folder, summary, composed config, group choices
    and command-line overrides."""
    runs = []
    for summary_path in sorted(Path(sweep_dir).glob("*/lr_*/seed_*/summary.json")):
        job = summary_path.parent
        hydra = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        runs.append(
            {
                "dir": job,
                "summary": json.loads(summary_path.read_text()),
                "config": config,
                "lr": float(config.method.optimizer.lr),
                "seed": int(config.seed),
                "choices": dict(hydra.runtime.choices),
                "overrides": list(hydra.overrides.task),
            }
        )
    if not runs:
        raise FileNotFoundError(f"no finished job (*/lr_*/seed_*/summary.json) under {sweep_dir}")
    return runs


def validation_hv(run: dict[str, Any]) -> float:
    """The job's hypervolume on the validation split (what its learning rate is chosen by)."""
    validation = run["summary"].get("validation") or {}
    if "hv" not in validation:
        raise ValueError(f"{run['dir']} has no validation scores (summary.json 'validation')")
    return validation["hv"]


def choose_lrs(
    runs: list[dict[str, Any]], seed: int, methods: Sequence[str] = METHODS
) -> dict[str, float]:
    """Per method, the grid's learning rate with the best validation hypervolume at ``seed``."""
    chosen = {}
    for method in methods:
        grid = [r for r in runs if r["summary"]["method"] == method and r["seed"] == seed]
        if not grid:
            raise ValueError(f"no finished {method} job with seed {seed}: the grid is incomplete")
        chosen[method] = max(grid, key=validation_hv)["lr"]
    return chosen


def command_of(runs: list[dict[str, Any]]) -> str:
    """The comparison command that reproduces the sweep."""
    skip = ("method=", "method.optimizer.lr=", "seed=")
    overrides = [o for o in runs[0]["overrides"] if not o.startswith(skip)]
    lrs = ",".join(f"{lr:g}" for lr in sorted({r["lr"] for r in runs}))
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in runs}))
    return " ".join(
        ["python experiments/compare.py", f"--lrs {lrs}", f"--seeds {seeds}", *overrides]
    )


def setup_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What every job shares (task, model, quantization, data, epochs); raises if jobs differ."""
    fields = {
        "task": lambda r: r["summary"]["task"],
        "model": lambda r: r["choices"]["model"],
        "model_name": lambda r: r["summary"]["model"],
        "quant": lambda r: r["summary"]["quant"],
        "metric": lambda r: r["summary"]["metric"],
        "train_samples": lambda r: r["config"].data.max_train_samples,
        "val_samples": lambda r: r["config"].data.val_size,
        "max_length": lambda r: r["config"].data.max_length,
        "max_epochs": lambda r: r["config"].trainer.max_epochs,
        "patience": lambda r: r["config"].callbacks.early_stopping.patience,
        "stop_monitor": lambda r: r["config"].callbacks.early_stopping.monitor,
        "batch_size": lambda r: r["config"].data.batch_size,
        "rank": lambda r: r["config"].method.rank,
        "test_samples": lambda r: r["summary"]["results"][0]["num_samples"],
        "test_subsampled": lambda r: r["config"].data.max_eval_samples is not None,
        "budgets": lambda r: list(r["config"].eval.budgets),
        "hv_of": lambda r: r["summary"].get("hv_of", r["summary"]["metric"]),
        "vocab_size": lambda r: r["summary"].get("vocab_size"),
    }
    setup = {name: shared_value(runs, name, get) for name, get in fields.items()}
    setup["seeds"] = sorted({r["seed"] for r in runs})
    setup["reference"] = reference_of(runs)
    setup["lrs"] = sorted({r["lr"] for r in runs})
    setup["minutes"] = sweep_minutes(runs)
    setup["resumed_jobs"] = sum(any(f.get("loaded") for f in r["summary"]["runs"]) for r in runs)
    return setup


def resumed_note(setup: dict[str, Any]) -> str:
    """What the memory column leaves out: fits a resumed job read instead of training."""
    count = setup.get("resumed_jobs", 0)
    if not count:
        return ""
    return (
        f" ({count} job(s) resumed after a stop read some fits from disk; their peak covers "
        "the fits they trained)"
    )


def shared_value(runs: list[dict[str, Any]], name: str, get: Callable[[dict], Any]) -> Any:
    """``get``'s value, the same for every job of ``runs``; raises naming ``name`` if not."""
    values = {json.dumps(get(r), sort_keys=True) for r in runs}
    if len(values) != 1:
        raise ValueError(f"the jobs differ in {name}: {sorted(values)}; compare like with like")
    return json.loads(values.pop())


def reference_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The reference metrics by label, averaged over seeds. A seeded test sub-sample differs
    between seeds (methods are compared within a seed, on the same examples), so the reference
    may differ between seeds but not between the jobs of one seed."""
    references = [
        shared_value(
            [r for r in runs if r["seed"] == seed],
            f"reference (seed {seed})",
            lambda r: r["summary"].get("reference", {}),
        )
        for seed in sorted({r["seed"] for r in runs})
    ]
    return {label: statistics.mean(ref[label] for ref in references) for label in references[0]}


def sweep_minutes(runs: list[dict[str, Any]]) -> dict[str, float]:
    """``count`` jobs; ``jobs``: their wall time summed, and ``span``: from the first job's
    start to the last one's end, in minutes (the sweep's wall time when it ran without a
    pause); from each job's ``job.json``. A resumed job's wall time is its last attempt's
    plus the training and evaluation time of the fits it read from earlier attempts."""
    times = []
    for r in runs:
        path = r["dir"] / "job.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the job's start and end times are unknown")
        times.append(json.loads(path.read_text()))
    starts, ends = [t["started"] for t in times], [t["finished"] for t in times]
    jobs = sum(end - start for start, end in zip(starts, ends, strict=True)) + sum(
        fit["train_seconds"] + fit["eval_seconds"]
        for r in runs
        for fit in r["summary"]["runs"]
        if fit.get("loaded")
    )
    return {"count": len(runs), "jobs": jobs / 60, "span": (max(ends) - min(starts)) / 60}


def grid_table(runs: list[dict[str, Any]], seed: int) -> dict[str, dict[str, float]]:
    """Per method, the validation hypervolume of each learning rate at ``seed``."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    for r in runs:
        if r["seed"] == seed:
            grid[r["summary"]["method"]][f"{r['lr']:g}"] = validation_hv(r)
    return dict(grid)


def grid_edges(comparison: dict[str, dict[str, Any]], lrs: list[float]) -> str:
    """The methods whose chosen learning rate is the grid's lowest or highest, as text (empty
    when none is, or with fewer than three rates)."""
    if len(lrs) < 3:
        return ""
    ends = {min(lrs): "lowest", max(lrs): "highest"}
    return ", ".join(
        f"{LABELS[m]} ({ends[c['lr']]}, {c['lr']:g})"
        for m, c in comparison.items()
        if c["lr"] in ends
    )


def examples_of(run: dict[str, Any], budgets: list[float]) -> np.ndarray:
    """``(budgets, examples, 2)`` per-example test statistics of a job's compared split."""
    split = run["summary"]["compared_split"]
    with np.load(run["dir"] / "eval" / "examples.npz") as saved:
        return np.stack([saved[f"{split}/{b:g}"] for b in budgets])


def compare(runs: list[dict[str, Any]], setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method, at its chosen learning rate over all seeds: the statistics of
    :func:`compare_stats.comparison_stats`, the chosen rate, times, memory, average bits,
    the cumulative training time per number of budgets served, and per-seed values."""
    budgets, seeds = setup["budgets"], setup["seeds"]
    chosen = choose_lrs(runs, seeds[0])
    finals = {}
    for method in METHODS:
        jobs = {
            r["seed"]: r
            for r in runs
            if r["summary"]["method"] == method and r["lr"] == chosen[method]
        }
        missing = [s for s in seeds if s not in jobs]
        if missing:
            raise ValueError(f"{method} at lr {chosen[method]:g} lacks seeds {missing}")
        finals[method] = [jobs[s] for s in seeds]
    values = np.array(
        [[[r["summary"]["values"][str(b)] for b in budgets] for r in finals[m]] for m in METHODS]
    )
    bits = np.array(
        [
            [
                statistics.mean(
                    rec["avg_bits"]
                    for r in finals[m]
                    for rec in r["summary"]["results"]
                    if rec["split"] == r["summary"]["compared_split"] and rec["target_budget"] == b
                )
                for b in budgets
            ]
            for m in METHODS
        ]
    )
    stats = np.array([[examples_of(r, budgets) for r in finals[m]] for m in METHODS])
    hv_per_seed = np.array([[r["summary"]["hv"] for r in finals[m]] for m in METHODS])
    intervals = comparison_stats(
        list(METHODS), stats, values, bits, hv_per_seed, setup["metric"], "coalora",
        setup["vocab_size"],
    )  # fmt: skip
    out = {}
    for m, method in enumerate(METHODS):
        summaries = [r["summary"] for r in finals[method]]
        out[method] = {
            "lr": chosen[method],
            "split": summaries[0]["compared_split"],
            **intervals[method],
            "total_time_s": statistics.mean(s["train_seconds"] for s in summaries),
            "peak_rss_mib": max(s.get("memory", {}).get("peak_rss_mib") or 0.0 for s in summaries),
            "avg_bits": bits[m].tolist(),
            "cumulative_time_s": cumulative_time(summaries, budgets),
            "best_epochs": [[run.get("best_epoch") for run in s["runs"]] for s in summaries],
            "seeds": [
                {
                    "seed": r["seed"],
                    "hv": r["summary"]["hv"],
                    "total_time_s": r["summary"]["train_seconds"],
                    "values": values[m, i].tolist(),
                    "validation_hv": validation_hv(r),
                }
                for i, r in enumerate(finals[method])
            ],  # fmt: skip
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
    lines: dict[str, tuple[list[float], list[float], list[list[float]] | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    integer_x: bool = False,
    reference: dict[str, float] | None = None,
    log_y: bool = False,
    zero_line: bool = False,
) -> None:
    """One line with markers per label, with error bars where an interval ``[lo, hi]`` per
    point is given; ``reference`` values as dashed horizontal lines."""
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys, bounds) in lines.items():
        if bounds is None:
            ax.plot(xs, ys, marker="o", label=label)
            continue
        errors = [
            [y - lo for y, (lo, _) in zip(ys, bounds, strict=False)],
            [hi - y for y, (_, hi) in zip(ys, bounds, strict=False)],
        ]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="grey", label=f"{label} ({value:.4g})")
    if zero_line:
        ax.axhline(0.0, color="black", linewidth=0.8)
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


def validation_curves(run: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per fit of a job (``""`` or ``budget_<b>``), its validation metric after each epoch
    (the CSV logger's ``metrics.csv``)."""
    curves = {}
    for path in sorted(run["dir"].glob("**/csv/*/metrics.csv")):
        fit = path.parent.parent.parent.relative_to(run["dir"]).as_posix()
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        curves[fit if fit != "." else ""] = [
            (int(row["epoch"]) + 1, float(row["val/metric"])) for row in rows if row["val/metric"]
        ]
    return curves


def plot_validation_curves(
    runs: list[dict[str, Any]], comparison: dict, setup: dict, path: Path
) -> None:
    """One panel per method: the validation metric per epoch of each fit at the chosen
    learning rate and first seed."""
    fig = Figure(figsize=(11, 7.5))
    FigureCanvasAgg(fig)
    for i, method in enumerate(METHODS):
        ax = fig.add_subplot(2, 2, i + 1)
        (run,) = [
            r for r in runs
            if r["summary"]["method"] == method and r["lr"] == comparison[method]["lr"]
            and r["seed"] == setup["seeds"][0]
        ]  # fmt: skip
        for fit, points in validation_curves(run).items():
            ax.plot(
                *zip(*points, strict=False),
                marker="o",
                label=fit.replace("budget_", "") + " bits" if fit else "validation budgets",
            )
        ax.set_title(
            f"{LABELS[method]} (lr {comparison[method]['lr']:g}, seed {setup['seeds'][0]})"
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {setup['metric']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_comparison(
    runs: list[dict[str, Any]], comparison: dict, setup: dict, out_dir: Path
) -> None:
    """``metric_vs_bits.png``, ``difference_vs_bits.png``, ``time_vs_budgets.png`` and
    ``validation_curves.png``."""
    title = f"{setup['task']} · {setup['model']} · {setup['quant']} · seeds {len(setup['seeds'])}"
    metric = {
        f"{LABELS[m]} ({SCORED_ON[c['split']]})": (c["avg_bits"], c["mean"], c["interval"])
        for m, c in comparison.items()
    }
    plot_lines(
        metric,
        "average bits per parameter",
        f"{setup['metric']} (mean, {LEVEL:.0%} interval)",
        title,
        out_dir / "metric_vs_bits.png",
        reference=setup["reference"],
        log_y=setup["metric"] in LOWER_IS_BETTER,
    )
    difference = {
        f"CoA-LoRA − {LABELS[m]}": (setup["budgets"], c["diff"], c["diff_interval"])
        for m, c in comparison.items()
        if m != "coalora"
    }
    plot_lines(
        difference,
        "bit budget",
        f"paired difference in {setup['metric']} (> 0: CoA-LoRA better)",
        title,
        out_dir / "difference_vs_bits.png",
        zero_line=True,
    )
    time = {
        LABELS[m]: (
            list(range(1, len(c["cumulative_time_s"]) + 1)),
            [t / 60 for t in c["cumulative_time_s"]],
            None,
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
    plot_validation_curves(runs, comparison, setup, out_dir / "validation_curves.png")


def table_header(cells: list[str]) -> list[str]:
    """A markdown table's header row and separator."""
    return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]


def cell(value: float, bounds: list[float], sign: bool = False) -> str:
    """``value [lo, hi]``, four decimals (signed for differences)."""
    f = "+.4f" if sign else ".4f"
    return f"{value:{f}} [{bounds[0]:{f}}, {bounds[1]:{f}}]"


def low_budget_wins(comparison: dict, setup: dict) -> list[float]:
    """The budgets of ``LOW_BUDGETS`` where CoA-LoRA beats Shared-LoRA with the paired
    interval above 0."""
    intervals = comparison["shared"]["diff_interval"]
    return [
        b for b, (lo, _) in zip(setup["budgets"], intervals, strict=True)
        if b in LOW_BUDGETS and lo > 0
    ]  # fmt: skip


def best_other(comparison: dict) -> str:
    """The method other than CoA-LoRA with the highest mean hypervolume."""
    return max((m for m in METHODS if m != "coalora"), key=lambda m: comparison[m]["hv"])


def time_ratios(comparison: dict) -> dict[str, float]:
    """CoA-LoRA's training time over each per-budget method's."""
    ours = comparison["coalora"]["total_time_s"]
    return {m: ours / comparison[m]["total_time_s"] for m in PER_BUDGET}


def goals(comparison: dict, setup: dict) -> list[str]:
    """The comparison's goals, each met or missed by how much."""
    ours = comparison["coalora"]
    best = best_other(comparison)
    gap, (lo, hi) = comparison[best]["hv_diff"], comparison[best]["hv_diff_interval"]
    lines = [
        f"- Mean HV ≥ the best other method's ({LABELS[best]} {comparison[best]['hv']:.4f}): "
        f"{'met' if gap >= 0 else 'missed'}, CoA-LoRA {ours['hv']:.4f}, difference {gap:+.4f} "
        f"(paired interval [{lo:+.4f}, {hi:+.4f}]).",
    ]
    for method, ratio in time_ratios(comparison).items():
        lines.append(
            f"- Training time ≤ 0.5× {LABELS[method]}'s: {'met' if ratio <= 0.5 else 'missed'} "
            f"({ratio:.2f}×)."
        )
    shared, budgets = comparison["shared"], setup["budgets"]
    low = [i for i, b in enumerate(budgets) if b in LOW_BUDGETS]
    above = low_budget_wins(comparison, setup)
    lines.append(
        f"- Above Shared-LoRA at {', '.join(f'{budgets[i]:g}' for i in low)} bits with the paired "
        f"interval above 0: {'met' if len(above) == len(low) else 'missed'} (interval above 0 at "
        f"{', '.join(f'{b:g}' for b in above) or 'none'}; differences "
        + ", ".join(cell(shared["diff"][i], shared["diff_interval"][i], True) for i in low)
        + ")."
    )
    return lines


def markdown(comparison: dict, setup: dict, grid: dict, command: str) -> str:
    budgets = [f"{b:g}" for b in setup["budgets"]]
    seeds = ", ".join(map(str, setup["seeds"]))
    samples = setup["train_samples"] or "all"
    lower = setup["metric"] in LOWER_IS_BETTER
    unit = f"blocks of {setup['max_length']} tokens" if lower else "examples"
    score = setup["hv_of"] if setup["hv_of"] != setup["metric"] else setup["metric"]
    subsampled = setup["test_subsampled"]
    drawn = " (a sub-sample drawn with each seed; methods compare on the same one)"
    reference = "".join(
        f" Reference: the {label} pre-trained model scores {value:.4f} on the same test "
        f"{'sets (mean over seeds)' if subsampled else 'set'}."
        for label, value in setup["reference"].items()
    )
    lrs = ", ".join(f"{lr:g}" for lr in setup["lrs"])
    names = {"val/loss": "validation loss", "val/metric": f"validation {setup['metric']}"}
    monitored = names.get(setup["stop_monitor"], setup["stop_monitor"])
    lines = [
        f"# {setup['task']} · {setup['model_name']} · {setup['quant'].upper()} quantization",
        "",
        f"Command: `{command}`",
        "",
        f"Setup: {samples} training {unit} and {setup['val_samples']} validation {unit} carved "
        f"from the training data, seeds {seeds}, batch {setup['batch_size']}, max length "
        f"{setup['max_length']}, rank {setup['rank']}; test set: {setup['test_samples']} {unit}"
        f"{drawn if subsampled else ''}. "
        f"Protocol: every method gets the learning-rate grid {{{lrs}}}, each point trained with "
        f"seed {setup['seeds'][0]}; the method keeps the point with the best hypervolume on the "
        "validation split, and the other seeds train at it. Every fit trains until its "
        f"{monitored} has not improved for {setup['patience']} "
        f"epoch(s) (at most {setup['max_epochs']} epochs), and the epoch with its best "
        f"validation {setup['metric']} is evaluated. "
        f"Compute: {setup['minutes']['count']} jobs, {setup['minutes']['jobs']:.0f} min of "
        f"job wall time in all; {setup['minutes']['span']:.0f} min from the first job's start "
        "to the last one's end.",
        "",
        f"Test {setup['metric']} per average-bit budget ({'lower' if lower else 'higher'} is "
        f"better): the mean over seeds with a {LEVEL:.0%} bootstrap interval ({RESAMPLES} "
        f"resamples of the test examples and of the seeds).{reference} QLoRA and LQ-LoRA "
        "train one adapter per budget and are scored on that budget's own allocation; "
        "Shared-LoRA and CoA-LoRA train once and are scored on unseen configurations "
        f"(allocations never in their training sets). HV: hypervolume of the (bits, {score}) "
        "points, bits mapped from [2, 8] to [0, 1], reference point (8 bits, 0), as mean ± "
        "standard deviation over seeds. Time: mean training wall time to serve all budgets "
        "(per-budget methods: the sum of their runs), LoRA initialisation and configuration "
        "search included, evaluation excluded; jobs ran two at a time on a shared machine, so "
        "times compare within a report. Memory: the largest peak resident memory of a job"
        f"{resumed_note(setup)}.",
        "",
        *table_header(["method", "lr", *budgets, "HV", "time (min)", "peak memory (GiB)"]),
    ]
    for method, c in comparison.items():
        values = " | ".join(cell(v, b) for v, b in zip(c["mean"], c["interval"], strict=False))
        lines.append(
            f"| {LABELS[method]} | {c['lr']:g} | {values} | {c['hv']:.4f} ± {c['hv_sd']:.4f} | "
            f"{c['total_time_s'] / 60:.1f} | {c['peak_rss_mib'] / 1024:.2f} |"
        )
    lines += [
        "",
        f"CoA-LoRA's paired advantage over each method, with its {LEVEL:.0%} interval (positive "
        "where CoA-LoRA is better), and CoA-LoRA's training time over the method's:",
        "",
        *table_header(["vs", *budgets, "HV", "time ratio"]),
    ]
    ours = comparison["coalora"]
    for method, c in comparison.items():
        if method == "coalora":
            continue
        diffs = " | ".join(
            cell(d, b, True) for d, b in zip(c["diff"], c["diff_interval"], strict=False)
        )
        ratio = ours["total_time_s"] / c["total_time_s"]
        lines.append(
            f"| {LABELS[method]} | {diffs} | {cell(c['hv_diff'], c['hv_diff_interval'], True)} "
            f"| {ratio:.2f} |"
        )
    lines += ["", "Goals:", "", *goals(comparison, setup), ""]
    lines += [
        f"Learning-rate grid: validation HV at seed {setup['seeds'][0]} (chosen in bold):",
        "",
        *table_header(["method", *[f"{lr:g}" for lr in setup["lrs"]]]),
    ]
    for method in METHODS:
        row = [
            f"**{v:.4f}**" if float(lr) == comparison[method]["lr"] else f"{v:.4f}"
            for lr, v in sorted(grid[method].items(), key=lambda kv: float(kv[0]))
        ]
        lines.append(f"| {LABELS[method]} | " + " | ".join(row) + " |")
    at_edge = grid_edges(comparison, setup["lrs"])
    if at_edge:
        lines += [
            "",
            f"Chosen at an edge of the grid (a better rate may lie beyond it): {at_edge}.",
        ]
    lines += [
        "",
        "Per seed (test HV / validation HV / time in min; best epochs, counting from 0):",
        "",
    ]
    for method, c in comparison.items():
        per_seed = "; ".join(
            f"seed {s['seed']}: {s['hv']:.4f} / {s['validation_hv']:.4f} / "
            f"{s['total_time_s'] / 60:.1f}; epochs {epochs}"
            for s, epochs in zip(c["seeds"], c["best_epochs"], strict=True)
        )
        lines.append(f"- {LABELS[method]}: {per_seed}")
    lines += [
        "",
        "![metric](metric_vs_bits.png) ![difference](difference_vs_bits.png)",
        "![time](time_vs_budgets.png) ![validation](validation_curves.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(runs: list[dict[str, Any]], out_dir: Path, command: str) -> dict[str, Any]:
    setup = setup_of(runs)
    comparison = compare(runs, setup)
    grid = grid_table(runs, setup["seeds"][0])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"setup": setup, "grid_validation_hv": grid, "methods": comparison}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(comparison, setup, grid, command))
    plot_comparison(runs, comparison, setup, out_dir)
    return summary


def default_sweep_dir(overrides: list[str]) -> Path:
    """``multirun/compare-<task>-<quant>`` from the overrides (``default`` if unset)."""
    choices = dict(o.split("=", 1) for o in overrides if "=" in o)
    tag = "-".join(choices.get(k, "default") for k in ("task", "quant"))
    return Path("multirun") / f"compare-{tag}"


def numbers(text: str, kind: type) -> list:
    """A comma-separated command-line list as numbers of ``kind``."""
    return [kind(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every job")
    parser.add_argument("--collect", type=Path, help="report on a finished sweep; train nothing")
    parser.add_argument("--sweep-dir", type=Path, help="where the jobs run (default: multirun/)")
    parser.add_argument("--out", type=Path, help="report folder (default: results/<name>)")
    parser.add_argument(
        "--lrs", type=lambda t: numbers(t, float), default=list(DEFAULT_LRS),
        help="the learning-rate grid, comma-separated (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=lambda t: numbers(t, int), default=list(DEFAULT_SEEDS),
        help="seeds, comma-separated; the grid trains with the first (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("COMPARE_JOBS", "1")),
                        help="jobs run side by side (default: $COMPARE_JOBS or 1)")  # fmt: skip
    parser.add_argument(
        "--methods", type=lambda t: t.split(","), default=list(METHODS),
        help="train only these methods' jobs, comma-separated; the report waits for all four "
        "(default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    sweep_dir = args.collect or args.sweep_dir or default_sweep_dir(args.overrides)
    if not args.collect:
        run_sweep(args.overrides, sweep_dir, args.lrs, args.seeds, args.jobs, args.methods)
        if set(args.methods) != set(METHODS):
            print(f"trained {', '.join(args.methods)}; the report needs all four methods")
            return
    runs = load_runs(sweep_dir)
    setup = setup_of(runs)
    out = args.out or RESULTS / f"{setup['task']}-{setup['model']}-{setup['quant']}"
    summary = write_report(runs, out, command_of(runs))
    for method, c in summary["methods"].items():
        print(
            f"{LABELS[method]:12s} lr {c['lr']:g}  hv {c['hv']:.4f} ± {c['hv_sd']:.4f}  "
            f"time {c['total_time_s'] / 60:.1f} min"
        )
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
