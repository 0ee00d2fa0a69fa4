"""Collect a search ablation sweep into a report (markdown, JSON, plot).

Expects Hydra multirun folders of `python -m coalora.run --multirun search=pareto_gp,random,frozen
seed=...`, each run holding `summary.json` and, for searching runs, `config_set/epoch_<k>.json`.
``--cost-run`` adds the search time per epoch of one more searching run (e.g. a larger one).

    python experiments/collect_search_ablation.py multirun/ablation \\
        --cost-run outputs/<run> --out experiments/results/search-ablation-sst2-minilm
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

BUDGETS = (2.5, 3.0, 3.5, 4.0)


def epochs_trained(run_dir: Path) -> int:
    """How many epochs the run trained (its CSV log's last epoch + 1; early stopping may end a
    run before ``trainer.max_epochs``)."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open(newline="") as handle:
        return 1 + max(int(row["epoch"]) for row in csv.DictReader(handle) if row["epoch"])


def load_run(run_dir: Path) -> dict:
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(p.read_text()) for p in sorted(run_dir.glob("config_set/epoch_*.json"))]
    search_seconds = sum(r["seconds"] for r in rounds)
    epochs = epochs_trained(run_dir)
    unseen = {r["target_budget"]: r["value"] for r in summary["results"] if r["split"] == "unseen"}
    return {
        "search": config.search.name,
        "seed": config.seed,
        "unseen": {b: unseen[b] for b in BUDGETS},
        "hv": summary["hypervolume"]["unseen"],
        "search_seconds_per_epoch": search_seconds / epochs,
        "train_seconds_per_epoch": (summary["train_seconds"] - search_seconds) / epochs,
        "round_seconds": [r["seconds"] for r in rounds],
        "setup": {
            "train_samples": config.data.max_train_samples,
            "epochs": epochs,
            "max_epochs": config.trainer.max_epochs,
            "batch_size": config.data.batch_size,
            "max_length": config.data.max_length,
            "heldout_size": config.search.get("heldout_size"),
            "num_proposals": config.search.get("num_proposals"),
            "max_acq_evals": config.search.get("max_acq_evals"),
            "test_samples": summary["results"][0]["num_samples"],
        },
    }


def sweep_command(run_dirs: list[Path]) -> str:
    """One multirun command line covering the runs (values of each override joined)."""
    values: dict[str, list[str]] = defaultdict(list)
    for run_dir in run_dirs:
        for override in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"):
            key, value = override.split("=", 1)
            if not key.startswith(("paths.", "hydra.")) and value not in values[key]:
                values[key].append(value)
    joined = [f"{key}={','.join(sorted(v))}" for key, v in values.items()]
    return " ".join(["python -m coalora.run --multirun", *joined])


def header(runs: list[dict], run_dirs: list[Path]) -> list[str]:
    setup = next(r["setup"] for r in runs if r["search"] == "pareto_gp")
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in runs}))
    return [
        "# Search ablation: SST-2, MiniLM, NF",
        "",
        f"Command: `{sweep_command(run_dirs)}`, then `experiments/collect_search_ablation.py`.",
        "",
        f"Setup: {setup['train_samples']} training sentences, at most {setup['max_epochs']} epochs "
        f"(a search between epochs), seeds {seeds}, batch {setup['batch_size']}, max length "
        f"{setup['max_length']}; search: {setup['num_proposals']} proposals, "
        f"{setup['max_acq_evals']} acquisition evaluations, {setup['heldout_size']} held-out "
        f"sentences; test set: {setup['test_samples']} dev sentences. Accuracy is on unseen "
        "configurations; HV is the unseen hypervolume (bits over [2, 8], reference (8, 0)). "
        '"search / train" is search seconds over the rest of the training seconds of the '
        "same runs.",
        "",
    ]


def verdict(summary: dict, test_samples: int) -> list[str]:
    """Which search has the best mean HV and the best mean accuracy per budget, next to the
    test set's binomial standard error at the mean accuracy."""
    best_hv = max(summary, key=lambda s: summary[s]["mean_hv"])
    accuracies = [a for entry in summary.values() for a in entry["mean_unseen"].values()]
    p = statistics.mean(accuracies)
    stderr = (p * (1 - p) / test_samples) ** 0.5

    def best_at(b: float) -> str:
        top = max(entry["mean_unseen"][b] for entry in summary.values())
        return " = ".join(
            s for s, entry in summary.items() if entry["mean_unseen"][b] >= top - 1e-6
        )

    per_budget = ", ".join(f"{b:g}: {best_at(b)}" for b in BUDGETS)
    return [
        "",
        f"Best mean HV: **{best_hv}** ({summary[best_hv]['mean_hv']:.4f}). Best mean accuracy "
        f"per budget: {per_budget}. One accuracy on {test_samples} test sentences has a "
        f"standard error of about {stderr:.3f}.",
    ]


def command_of(run_dir: Path) -> str:
    """The run's command line, less machine-specific path and Hydra overrides."""
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    kept = [o for o in overrides if not o.startswith(("paths.", "hydra."))]
    return " ".join(["python -m coalora.run", *kept])


def cost_section(run: dict, run_dir: Path) -> list[str]:
    rounds = ", ".join(f"{s:.1f}" for s in run["round_seconds"])
    fraction = run["search_seconds_per_epoch"] / run["train_seconds_per_epoch"]
    return [
        "",
        f"## Search cost at {run['setup']['train_samples']} training sentences per epoch",
        "",
        f"`{command_of(run_dir)}` (search={run['search']}, seed {run['seed']}, "
        f"{run['setup']['epochs']} epochs): search rounds took {rounds} s; training took "
        f"{run['train_seconds_per_epoch']:.1f} s per epoch besides the search: "
        f"**{fraction:.1%}** of the training time. Unseen accuracy at "
        + ", ".join(f"{b:g}: {run['unseen'][b]:.4f}" for b in BUDGETS)
        + f"; HV {run['hv']:.4f}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--cost-run", type=Path, help="one more searching run to time")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_dirs = [p.parent for sweep in args.sweeps for p in sorted(sweep.glob("*/summary.json"))]
    runs = [load_run(d) for d in run_dirs]
    by_search: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r["search"], r["seed"])):
        by_search[run["search"]].append(run)

    lines = header(runs, run_dirs) + [
        "| search | seeds | " + " | ".join(f"acc@{b:g}" for b in BUDGETS) + " | HV (unseen) |"
        " search s/epoch | train s/epoch | search / train |",
        "|---" * (len(BUDGETS) + 6) + "|",
    ]
    summary = {}
    for search, rs in by_search.items():
        mean = {b: statistics.mean(r["unseen"][b] for r in rs) for b in BUDGETS}
        hv = statistics.mean(r["hv"] for r in rs)
        s_ep = statistics.mean(r["search_seconds_per_epoch"] for r in rs)
        t_ep = statistics.mean(r["train_seconds_per_epoch"] for r in rs)
        summary[search] = {"runs": rs, "mean_unseen": mean, "mean_hv": hv}
        lines.append(
            f"| {search} | {','.join(str(r['seed']) for r in rs)} | "
            + " | ".join(f"{mean[b]:.4f}" for b in BUDGETS)
            + f" | {hv:.4f} | {s_ep:.1f} | {t_ep:.1f} | {s_ep / t_ep:.1%} |"
        )
        for r in rs:
            lines.append(
                f"| {search} seed {r['seed']} | | "
                + " | ".join(f"{r['unseen'][b]:.4f}" for b in BUDGETS)
                + f" | {r['hv']:.4f} | {r['search_seconds_per_epoch']:.1f} | "
                f"{r['train_seconds_per_epoch']:.1f} | |"
            )
    lines += verdict(summary, runs[0]["setup"]["test_samples"])
    if args.cost_run:
        cost = load_run(args.cost_run)
        summary["search_cost_run"] = cost
        lines += cost_section(cost, args.cost_run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for search in by_search:
        entry = summary[search]
        ax.plot(BUDGETS, [entry["mean_unseen"][b] for b in BUDGETS], marker="o", label=search)
    ax.set(xlabel="average bits (unseen configurations)", ylabel="accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out / "accuracy_vs_bits.png", dpi=120, bbox_inches="tight")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
