"""Collect a search ablation sweep into a report (markdown, JSON, plot).

Expects Hydra multirun folders of `python -m coalora.run --multirun search=pareto_gp,random,frozen
seed=...`, each run holding `summary.json` and, for searching runs, `config_set/epoch_<k>.json`.

    python experiments/collect_search_ablation.py /tmp/abl/seed0 /tmp/abl/seed1 \\
        --out experiments/results/search-ablation-sst2-minilm
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

BUDGETS = (2.5, 3.0, 3.5, 4.0)


def load_run(run_dir: Path) -> dict:
    overrides = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(p.read_text()) for p in sorted(run_dir.glob("config_set/epoch_*.json"))]
    search_seconds = sum(r["seconds"] for r in rounds)
    epochs = overrides.trainer.max_epochs
    unseen = {r["target_budget"]: r["value"] for r in summary["results"] if r["split"] == "unseen"}
    return {
        "search": overrides.search.name,
        "seed": overrides.seed,
        "unseen": {b: unseen[b] for b in BUDGETS},
        "hv": summary["hypervolume"]["unseen"],
        "search_seconds_per_epoch": search_seconds / epochs,
        "train_seconds_per_epoch": (summary["train_seconds"] - search_seconds) / epochs,
        "final_set_size": summary["training_configurations"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [load_run(p.parent) for sweep in args.sweeps for p in sweep.glob("*/summary.json")]
    by_search: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r["search"], r["seed"])):
        by_search[run["search"]].append(run)

    lines = [
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for search, entry in summary.items():
        ax.plot(BUDGETS, [entry["mean_unseen"][b] for b in BUDGETS], marker="o", label=search)
    ax.set(xlabel="average bits (unseen configurations)", ylabel="accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(args.out / "accuracy_vs_bits.png", dpi=120, bbox_inches="tight")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
