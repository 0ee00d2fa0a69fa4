"""Ablation of CoA-LoRA's options, judged on the validation split (carved from the training
data; the test split is never looked at to choose).

Each variant is CoA-LoRA with a few overrides on top of the shared ones; every variant trains
with the same seeds and is scored by its hypervolume over the evaluation budgets on the
validation split. Writes ``<out>/report.md``, ``<out>/summary.json`` and
``<out>/validation_hv.png``:

    python experiments/ablate.py experiment=compare_minilm task=sst2 quant=nf
    python experiments/ablate.py --variants baseline,rank64 --seeds 0,1 experiment=...
    python experiments/ablate.py --collect experiments/sweeps/ablate-sst2-nf \
        --out experiments/results/ablation-sst2-nf

Jobs run in ``<sweep>/<variant>/seed_<seed>``; finished ones are collected, not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compare import RESULTS, numbers, plot_lines, run_job, table_header
from omegaconf import OmegaConf
from scipy.stats import t as t_dist

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "standard_init": ["method/init=standard", "method.residual_rank=0"],
    "svd_init_4bit": [
        "method/init=svd",
        "method.init.reference_budget=4.0",
        "method.residual_rank=0",
    ],
    "svd_init_3bit": [
        "method/init=svd",
        "method.init.reference_budget=3.0",
        "method.residual_rank=0",
    ],
    "svd_init_2.5bit": [
        "method/init=svd",
        "method.init.reference_budget=2.5",
        "method.residual_rank=0",
    ],
    "svd_init_3bit_frozen": [
        "method/init=svd",
        "method.init.reference_budget=3",
        "method.residual_rank=0",
        "search=frozen",
    ],
    "k1": ["method.configs_per_step=1"],
    "numeric_inputs": ["method.numeric_inputs=true"],
    "theta_hidden64": ["method.hidden_dim=64"],
    "weight_decay": ["method.optimizer.weight_decay=0.01"],
    "low_budget_set": ["search.initial_budgets.stop=4.5"],
    "frozen_grid": ["search=frozen"],
    "search_every_2": ["search.callback.interval=2"],
    "heldout_32": ["search.heldout_size=32"],
    "residual_r16": ["method/init=standard", "method.residual_rank=16"],
    "rank8_residual8": [
        "method/init=standard",
        "method.rank=8",
        "method.alpha=8",
        "method.residual_rank=8",
    ],  # the served rank of the defaults: 16
    "rank64": ["method.rank=64", "method.alpha=64"],
    "weight_decay_numeric": ["method.optimizer.weight_decay=0.01", "method.numeric_inputs=true"],
    "theta_lr_0.25": ["method.theta_lr_scale=0.25"],
    "factors_lr_2e-3": ["method.optimizer.lr=0.002", "method.theta_lr_scale=0.25"],
}
"""Each candidate as overrides of the ``coalora`` method (``baseline``: the defaults;
``standard_init``: no SVD, no residual correction, the classification defaults); one that sets
``method.optimizer.lr`` trains at that rate instead of :data:`LR`."""
LR = 5e-4


def run_ablation(overrides: list[str], sweep: Path, variants: list[str], seeds: list[int], n: int):
    jobs = [(v, s) for s in seeds for v in variants]

    def one(job: tuple[str, int]) -> Path:
        variant, seed = job
        folder = sweep / variant / f"seed_{seed}"
        return run_job([*overrides, *VARIANTS[variant]], folder, "coalora", LR, seed)

    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(one, jobs))


def protocol_of(job: Path) -> str:
    """What every variant must share: task, data sizes, epochs and stopping rule."""
    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    shared = {
        "task": config.task.name,
        "quant": config.quant.fmt,
        "data": {k: config.data[k] for k in ("max_train_samples", "val_size", "max_length")},
        "max_epochs": config.trainer.max_epochs,
        "early_stopping": config.callbacks.get("early_stopping"),
    }
    return json.dumps(OmegaConf.to_container(OmegaConf.create(shared)), sort_keys=True)


def served_rank(job: Path) -> int | None:
    """The rank of a job's adapters as served: LoRA rank plus residual rank (None when its
    configuration does not say)."""
    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    rank = OmegaConf.select(config, "method.rank")
    return (
        None if rank is None else rank + OmegaConf.select(config, "method.residual_rank", default=0)
    )


def load(sweep: Path) -> dict[str, dict[int, dict]]:
    """Per variant, the summaries of its finished seeds, by seed; raises if the jobs differ in
    their protocol (:func:`protocol_of`), e.g. an old job under another stopping rule."""
    found: dict[str, dict[int, dict]] = {}
    protocols: dict[str, list[str]] = {}
    for path in sorted(sweep.glob("*/seed_*/summary.json")):
        seed = int(path.parent.name.removeprefix("seed_"))
        summary = json.loads(path.read_text())
        summary["served_rank"] = served_rank(path.parent)
        found.setdefault(path.parent.parent.name, {})[seed] = summary
        protocols.setdefault(protocol_of(path.parent), []).append(str(path.parent))
    if not found:
        raise FileNotFoundError(f"no finished job (*/seed_*/summary.json) under {sweep}")
    if len(protocols) > 1:
        groups = "; ".join(f"{p}: {', '.join(jobs)}" for p, jobs in protocols.items())
        raise ValueError(f"the jobs under {sweep} differ in their protocol: {groups}")
    return found


def shared_overrides(job: Path, variant: str) -> list[str]:
    """The overrides a job shares with every variant: its recorded ones less its method,
    learning rate, seed and the variant's own."""
    recorded = OmegaConf.load(job / ".hydra" / "overrides.yaml")
    own = ("method=", "method.optimizer.lr=", "seed=")
    return [o for o in recorded if not o.startswith(own) and o not in VARIANTS[variant]]


def commands_of(
    sweep: Path, found: dict[str, dict[int, dict]], baseline: str, out: Path
) -> list[str]:
    """The ablation commands that train the jobs ``found`` under ``sweep`` and report to
    ``out``: one per set of seeds the variants ran with, the baseline's first (the others
    pair against it); raises if the jobs differ in their shared overrides."""
    shared = {
        " ".join(shared_overrides(sweep / variant / f"seed_{seed}", variant))
        for variant, seeds in found.items()
        for seed in seeds
    }
    if len(shared) > 1:
        raise ValueError(f"the jobs under {sweep} ran with different overrides: {sorted(shared)}")
    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for variant in sorted([v for v in VARIANTS if v in found], key=lambda v: v != baseline):
        by_seeds.setdefault(tuple(sorted(found[variant])), []).append(variant)
    against = "" if baseline == "baseline" else f" --baseline {baseline}"
    (overrides,) = shared
    return [
        f"python experiments/ablate.py --variants {','.join(variants)} "
        f"--seeds {','.join(map(str, seeds))}{against} --sweep-dir {sweep} --out {out} "
        f"{overrides}".rstrip()
        for seeds, variants in by_seeds.items()
    ]


def paired_gain(variant: dict[int, dict], baseline: dict[int, dict]) -> dict | None:
    """The variant's validation HV minus the baseline's on the seeds both finished: mean, 95 %
    t-interval over seeds (None with fewer than two), and ``adopt``: the interval above 0."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    gains = [variant[s]["validation"]["hv"] - baseline[s]["validation"]["hv"] for s in seeds]
    mean, bounds = statistics.mean(gains), None
    if len(gains) > 1:
        t_quantile = float(t_dist.ppf(0.975, len(gains) - 1))
        half = t_quantile * statistics.stdev(gains) / math.sqrt(len(gains))
        bounds = [mean - half, mean + half]
    adopt = bounds is not None and bounds[0] > 0
    return {"seeds": seeds, "gains": gains, "mean": mean, "interval": bounds, "adopt": adopt}


def report(
    found: dict[str, dict[int, dict]], out: Path, commands: list[str], baseline: str = "baseline"
) -> dict:
    """The variants by validation HV (mean ± sd over seeds) and their paired gain over the
    variant ``baseline`` (the defaults unless named), with test HV and time beside; a variant
    is adopted when its gain's interval is above zero."""
    if baseline != "baseline" and baseline not in found:
        raise ValueError(f"baseline {baseline!r} has no finished job; finished: {sorted(found)}")
    rows = {}
    for variant in [v for v in VARIANTS if v in found]:
        summaries = list(found[variant].values())
        val = [s["validation"]["hv"] for s in summaries]
        rows[variant] = {
            "overrides": VARIANTS[variant],
            "seeds": sorted(found[variant]),
            "validation_hv": statistics.mean(val),
            "validation_hv_sd": statistics.stdev(val) if len(val) > 1 else 0.0,
            "validation_values": {
                b: statistics.mean(s["validation"]["values"][b] for s in summaries)
                for b in summaries[0]["validation"]["values"]
            },
            "vs_baseline": paired_gain(found[variant], found[baseline])
            if baseline in found and variant != baseline
            else None,
            "test_hv": statistics.mean(s["hv"] for s in summaries),
            "train_min": statistics.mean(s["train_seconds"] for s in summaries) / 60,
            "served_rank": summaries[0].get("served_rank"),
        }
    adopted = [v for v, r in rows.items() if r["vs_baseline"] and r["vs_baseline"]["adopt"]]
    defaults = "the defaults" if baseline == "baseline" else f"`{baseline}`"
    budgets = list(next(iter(rows.values()))["validation_values"])
    lines = [
        "# Ablation of CoA-LoRA's options (validation split)",
        "",
        "Commands (one per set of seeds; jobs already finished are collected, not rerun):",
        "",
        *[f"    {command}" for command in commands],
        "",
        "Each variant is CoA-LoRA with the overrides shown, trained with the same data, seeds "
        f"and learning rate ({LR:g}, unless its overrides set another) and scored by the "
        "hypervolume of its unseen configurations on the validation split carved from the "
        "training data (per budget: the mean over seeds; HV: mean ± standard deviation over "
        f"seeds). *vs {baseline}* is the paired difference from {defaults} on the same seeds "
        "(the same validation split and initial weights): its mean and 95 % t-interval over "
        "seeds. A variant is adopted as the default only when that interval lies above 0. "
        "The test HV is shown for reference only; it chose nothing. *Served rank*: the rank "
        "of the adapter a served configuration carries (LoRA rank plus residual rank; the "
        "adapters are float32 and count in no method's bits).",
        "",
        *table_header(["variant", "overrides", "seeds", *budgets, "validation HV",
                       f"vs {baseline}", "test HV", "train (min)", "served rank"]),
    ]  # fmt: skip
    for variant, r in rows.items():
        values = " | ".join(f"{r['validation_values'][b]:.4f}" for b in budgets)
        name = f"**{variant}**" if variant in adopted else variant
        lines.append(
            f"| {name} | {' '.join(r['overrides']) or '(defaults)'} | "
            f"{','.join(map(str, r['seeds']))} | {values} | "
            f"{r['validation_hv']:.4f} ± {r['validation_hv_sd']:.4f} | "
            f"{gain_cell(r['vs_baseline'])} | {r['test_hv']:.4f} | {r['train_min']:.1f} | "
            f"{r['served_rank'] or '?'} |"
        )
    verdict = ", ".join(adopted) if adopted else "none (the defaults stay)"
    lines += ["", f"Adopted (paired interval above 0): **{verdict}**.", "",
              "![hv](validation_hv.png)", ""]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    summary = {"commands": commands, "baseline": baseline, "adopted": adopted, "variants": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    names = list(rows)
    plot_lines(
        {"validation HV": (list(range(len(names))), [rows[v]["validation_hv"] for v in names],
                           [[rows[v]["validation_hv"] - rows[v]["validation_hv_sd"],
                             rows[v]["validation_hv"] + rows[v]["validation_hv_sd"]]
                            for v in names])},
        "variant: " + ", ".join(f"{i} {v}" for i, v in enumerate(names)),
        "validation HV (± sd over seeds)",
        "CoA-LoRA ablation",
        out / "validation_hv.png",
        integer_x=True,
    )  # fmt: skip
    return summary


def gain_cell(gain: dict | None) -> str:
    """``+mean [lo, hi]`` of a paired gain (``n/a`` for the baseline itself)."""
    if gain is None:
        return "n/a"
    if gain["interval"] is None:
        return f"{gain['mean']:+.4f} (one seed)"
    lo, hi = gain["interval"]
    return f"{gain['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every job")
    parser.add_argument("--variants", type=lambda t: t.split(","), default=list(VARIANTS))
    parser.add_argument("--seeds", type=lambda t: numbers(t, int), default=[0])
    parser.add_argument("--collect", type=Path, help="report on a finished sweep; train nothing")
    parser.add_argument("--sweep-dir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("COMPARE_JOBS", "1")))
    parser.add_argument(
        "--baseline", default="baseline",
        help="the variant the others are paired against: the defaults' own where they are "
        "not `baseline`'s (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    unknown = [v for v in [*args.variants, args.baseline] if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    choices = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    tag = "-".join(choices.get(k, "default") for k in ("task", "quant"))
    sweep = args.collect or args.sweep_dir or Path("multirun") / f"ablate-{tag}"
    finished = any((sweep / args.baseline).glob("seed_*/summary.json"))
    if args.baseline != "baseline" and args.baseline not in args.variants and not finished:
        raise SystemExit(
            f"--baseline {args.baseline} is neither in --variants nor finished under {sweep}"
        )
    if not args.collect:
        run_ablation(args.overrides, sweep, args.variants, args.seeds, args.jobs)
    out = args.out or RESULTS / f"ablation-{tag}"
    found = load(sweep)
    summary = report(found, out, commands_of(sweep, found, args.baseline, out), args.baseline)
    adopted = ", ".join(summary["adopted"]) or "none"
    print(f"adopted on validation: {adopted}; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
