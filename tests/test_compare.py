"""The comparison report of experiments/compare.py, on synthetic finished sweeps."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # compare.py imports compare_stats beside it
spec = importlib.util.spec_from_file_location("compare", EXPERIMENTS / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

BUDGETS = [2.5, 3.0, 4.0]
EXAMPLES = 400


def correct_rows(accuracy: float, seed: int) -> np.ndarray:
    """(examples, 2) predicted/target classes with the given share of correct rows."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, EXAMPLES)
    right = np.arange(EXAMPLES) < round(accuracy * EXAMPLES)
    return np.stack([np.where(right, target, 1 - target), target], axis=-1)


def fake_job(root: Path, method: str, lr: float, seed: int, accuracy: float) -> None:
    """A finished job folder as ``coalora.run`` writes it (summary, examples, Hydra files)."""
    per_budget = method in ("qlora", "lqlora")
    split = "seen" if per_budget else "unseen"
    runs = (
        [{"name": f"budget_{b}", "budget": b, "train_seconds": 10.0 * b} for b in BUDGETS]
        if per_budget
        else [{"name": "", "budget": None, "train_seconds": 50.0}]
    )
    values = {str(b): round((accuracy + b / 100) * EXAMPLES) / EXAMPLES for b in BUDGETS}
    results = [
        {"split": split, "target_budget": b, "avg_bits": b - 0.01, "value": values[str(b)]}
        | {"num_samples": EXAMPLES}
        for b in BUDGETS
    ]
    summary = {
        "method": method,
        "task": "sst2",
        "model": "all-MiniLM-L6-v2",
        "quant": "nf",
        "metric": "accuracy",
        "compared_split": split,
        "hv": accuracy / 2 + seed / 100,
        "values": values,
        "validation": {"hv": accuracy / 2 - abs(lr - 5e-4), "values": values},
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "runs": runs,
        "results": results,
    }
    job = compare.job_dir(root, method, lr, seed)
    (job / ".hydra").mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps(summary))
    (job / "eval").mkdir()
    rows = {f"{split}/{b:g}": correct_rows(values[str(b)], seed) for b in BUDGETS}
    np.savez(job / "eval" / "examples.npz", **rows)
    for fit in [r["name"] for r in runs]:
        csv = job / fit / "csv" / "version_0"
        csv.mkdir(parents=True)
        csv.joinpath("metrics.csv").write_text(
            "epoch,step,train/loss,val/loss,val/metric\n0,9,0.5,,\n0,9,,0.4,0.7\n1,19,,0.3,0.8\n"
        )
    config = {
        "seed": seed,
        "data": {
            "max_train_samples": 1000,
            "val_size": 256,
            "max_length": 128,
            "batch_size": 32,
            "max_eval_samples": None,
        },
        "trainer": {"max_epochs": 6},
        "callbacks": {"early_stopping": {"patience": 1, "monitor": "val/loss"}},
        "method": {"rank": 16, "optimizer": {"lr": lr}},
        "eval": {"budgets": BUDGETS},
    }
    OmegaConf.save(config, job / ".hydra" / "config.yaml")
    hydra = {
        "hydra": {
            "runtime": {"choices": {"model": "minilm"}},
            "overrides": {"task": [f"method={method}", "task=sst2", f"seed={seed}"]},
        }
    }
    OmegaConf.save(hydra, job / ".hydra" / "hydra.yaml")
    # The job started at 1000 + 100·seed s and took 60 s (what the report's timing reads).
    start = 1000.0 + 100 * seed
    (job / "job.json").write_text(json.dumps({"started": start, "finished": start + 60}))


ACCURACY = {"qlora": 0.80, "lqlora": 0.81, "shared": 0.70, "coalora": 0.82}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for method in compare.METHODS:
        for lr in (2e-4, 5e-4):  # the grid, seed 0; 5e-4 wins on validation
            fake_job(root, method, lr, 0, ACCURACY[method])
        for seed in (1, 2):
            fake_job(root, method, 5e-4, seed, ACCURACY[method] + seed / 100)
    return root


def test_report_chooses_rates_on_validation_and_gives_intervals(sweep, tmp_path):
    summary = compare.write_report(compare.load_runs(sweep), tmp_path / "out", "cmd")
    methods = summary["methods"]
    assert summary["setup"]["seeds"] == [0, 1, 2] and summary["setup"]["lrs"] == [2e-4, 5e-4]
    assert {m: c["lr"] for m, c in methods.items()} == dict.fromkeys(compare.METHODS, 5e-4)
    assert summary["grid_validation_hv"]["coalora"]["0.0002"] < 0.41
    # Per-budget methods: serving n budgets costs the sum of the first n runs.
    assert methods["qlora"]["cumulative_time_s"] == pytest.approx([25.0, 55.0, 95.0])
    assert methods["coalora"]["cumulative_time_s"] == pytest.approx([50.0, 50.0, 50.0])
    # The mean over seeds 0, 1, 2 of accuracy + seed/100 + budget/100.
    assert methods["coalora"]["mean"][1] == pytest.approx(0.82 + 0.01 + 0.03, abs=1e-3)
    assert methods["coalora"]["hv"] == pytest.approx((0.41 + 0.425 + 0.44) / 3)
    for c in methods.values():
        for mean, (lo, hi) in zip(c["mean"], c["interval"], strict=True):
            assert lo <= mean <= hi and hi - lo < 0.2
    # CoA-LoRA is 12 points above Shared-LoRA on the same examples: the interval excludes 0.
    shared = methods["shared"]
    assert shared["diff"][0] == pytest.approx(0.12, abs=1e-3)
    assert all(lo > 0 for lo, _ in shared["diff_interval"])
    assert methods["coalora"]["diff_interval"] == [[0.0, 0.0]] * 3  # itself
    # 16 jobs of 60 s each; the seed-0 jobs start first (1000 s), seed 2's end last (1260 s).
    assert summary["setup"]["minutes"] == {"count": 16, "jobs": 16.0, "span": 260 / 60}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Compute: 16 jobs, 16 min of job wall time in all; 4 min from the first" in report
    assert "| CoA-LoRA | 0.0005 | 0.8550 [" in report
    assert "Above Shared-LoRA at 2.5, 3 bits with the paired interval above 0: met" in report
    assert "Training time ≤ 0.5× QLoRA's: missed (0.53×)" in report
    for name in ("metric_vs_bits", "difference_vs_bits", "time_vs_budgets", "validation_curves"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000
    assert compare.command_of(compare.load_runs(sweep)) == (
        "python experiments/compare.py --lrs 0.0002,0.0005 --seeds 0,1,2 task=sst2"
    )


def test_a_rate_chosen_at_an_edge_of_the_grid_is_flagged(sweep, tmp_path):
    for method in compare.METHODS:  # a third point above: 5e-4 is now the middle
        fake_job(sweep, method, 1e-3, 0, ACCURACY[method])
    summary = compare.write_report(compare.load_runs(sweep), tmp_path / "out", "cmd")
    assert "edge of the grid" not in (tmp_path / "out" / "report.md").read_text()
    comparison = {
        m: {**c, "lr": 2e-4 if m == "qlora" else c["lr"]} for m, c in summary["methods"].items()
    }
    comparison["shared"]["lr"] = 1e-3
    assert compare.grid_edges(comparison, [2e-4, 5e-4, 1e-3]) == (
        "QLoRA (lowest, 0.0002), Shared-LoRA (highest, 0.001)"
    )
    assert compare.grid_edges(comparison, [2e-4, 1e-3]) == ""  # two points: both are edges


def test_finished_jobs_are_collected_not_rerun(sweep, monkeypatch):
    started = []
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd, **kw: started.append(cmd))
    compare.run_sweep([], sweep, [2e-4, 5e-4], [0, 1, 2], 2)
    assert started == []
    unfinished = compare.job_dir(sweep, "shared", 5e-4, 2)
    (unfinished / "summary.json").unlink()
    compare.run_sweep(["task=sst2"], sweep, [2e-4, 5e-4], [0, 1, 2], 1)
    (command,) = started
    assert command[-1] == f"hydra.run.dir={unfinished}"
    assert "method=shared" in command and "seed=2" in command and "task=sst2" in command
    times = json.loads((unfinished / "job.json").read_text())
    assert times["started"] <= times["finished"]
    old = compare.job_dir(sweep, "qlora", 2e-4, 0) / ".hydra" / "config.yaml"
    config = OmegaConf.load(old)
    config.callbacks.early_stopping.monitor = "val/metric"  # a job under an older rule
    OmegaConf.save(config, old)
    started.clear()
    with pytest.raises(ValueError, match="the jobs differ in stop_monitor"):
        compare.run_sweep([], sweep, [2e-4, 5e-4], [0, 1, 2], 1)
    assert started == []  # refused before any job ran


def test_a_sweep_of_some_methods_trains_only_theirs(sweep, monkeypatch):
    started = []
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd, **kw: started.append(cmd))
    for method in ("qlora", "coalora"):
        (compare.job_dir(sweep, method, 5e-4, 2) / "summary.json").unlink()
    coalora_grid = compare.job_dir(sweep, "coalora", 2e-4, 0)
    (coalora_grid / "summary.json").unlink()  # its grid is incomplete: not needed here
    compare.run_sweep([], sweep, [2e-4, 5e-4], [0, 1, 2], 1, ["qlora", "shared"])
    assert [c[-1] for c in started] == [f"hydra.run.dir={compare.job_dir(sweep, 'qlora', 5e-4, 2)}"]


def test_a_stopped_per_budget_job_keeps_its_finished_fits(sweep, monkeypatch):
    started = []
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd, **kw: started.append(cmd))
    job = compare.job_dir(sweep, "qlora", 5e-4, 2)
    (job / "summary.json").unlink()
    (job / "budget_2.5" / compare.FIT_RESULT).write_bytes(b"a finished fit")
    compare.run_sweep([], sweep, [2e-4, 5e-4], [0, 1, 2], 1)
    assert len(started) == 1 and started[0][-1] == f"hydra.run.dir={job}"
    assert sorted(p.name for p in job.iterdir()) == ["budget_2.5", "job.json"]
    assert (job / "budget_2.5" / compare.FIT_RESULT).read_bytes() == b"a finished fit"
    assert (job / "budget_2.5" / "csv").is_dir()  # a finished fit's logs stay with it


def test_a_resumed_job_counts_the_time_of_the_fits_it_read(sweep):
    runs = compare.load_runs(sweep)
    before = compare.sweep_minutes(runs)["jobs"]
    fit = runs[0]["summary"]["runs"][0]
    fit |= {"loaded": True, "train_seconds": 90.0, "eval_seconds": 30.0}
    assert compare.sweep_minutes(runs)["jobs"] == pytest.approx(before + 2.0)
    setup = compare.setup_of(runs)
    assert setup["resumed_jobs"] == 1
    assert "1 job(s) resumed after a stop" in compare.resumed_note(setup)


def test_report_rejects_mixed_or_incomplete_sweeps(sweep, tmp_path):
    runs = compare.load_runs(sweep)
    runs[0]["config"].trainer.max_epochs = 3
    with pytest.raises(ValueError, match="the jobs differ in max_epochs"):
        compare.setup_of(runs)
    runs = [r for r in compare.load_runs(sweep) if r["summary"]["method"] != "shared"]
    with pytest.raises(ValueError, match="no finished shared job with seed 0"):
        compare.choose_lrs(runs, 0)
    runs = [
        r for r in compare.load_runs(sweep) if (r["summary"]["method"], r["seed"]) != ("qlora", 2)
    ]
    with pytest.raises(ValueError, match=r"qlora at lr 0.0005 lacks seeds \[2\]"):
        compare.compare(runs, compare.setup_of(runs))
    with pytest.raises(FileNotFoundError, match="no finished job"):
        compare.load_runs(tmp_path / "empty")
    (compare.job_dir(sweep, "qlora", 5e-4, 1) / "job.json").unlink()
    with pytest.raises(FileNotFoundError, match="start and end times are unknown"):
        compare.setup_of(compare.load_runs(sweep))


def test_a_reference_may_differ_between_seeds_but_not_within_one(sweep):
    runs = compare.load_runs(sweep)
    for r in runs:  # a seeded test sub-sample: each seed's reference is its own
        r["summary"]["reference"] = {"unquantized": 90.0 + r["seed"]}
    assert compare.reference_of(runs) == {"unquantized": pytest.approx(91.0)}
    runs[0]["summary"]["reference"] = {"unquantized": 50.0}
    seed = runs[0]["seed"]
    with pytest.raises(ValueError, match=rf"the jobs differ in reference \(seed {seed}\)"):
        compare.reference_of(runs)


def test_overview_gathers_the_reports_and_the_goals_across_tasks(sweep, tmp_path):
    overview_spec = importlib.util.spec_from_file_location(
        "compare_overview", EXPERIMENTS / "compare_overview.py"
    )
    overview = importlib.util.module_from_spec(overview_spec)
    overview_spec.loader.exec_module(overview)
    results = tmp_path / "results"
    for name in ("task-a", "task-b"):
        compare.write_report(compare.load_runs(sweep), results / name, "cmd")
    rows = overview.write_overview(results, ["task-a", "task-b", "task-c"])
    assert [r["name"] for r in rows] == ["task-a", "task-b"]
    assert rows[0]["best"] == "lqlora" and rows[0]["low_wins"] == [2.5, 3.0]
    assert rows[0]["hv_gap"] == pytest.approx(0.005, abs=1e-9)  # HV = accuracy / 2 + seed / 100
    text = (results / "comparison_overview.md").read_text()
    # Both reports are SST-2: one task, however many quantizers.
    assert "on at least 2 tasks: missed (1 task(s) of 1; reports: task-a, task-b)" in text
    assert "Not yet run with several seeds: task-c." in text
    assert "| [task-a](task-a/report.md) | val/loss, 1 | " in text
    assert "- task-a: mean HV ≥ the best other's met (+0.0050); time ≤ 0.5× missed" in text
    assert (results / "comparison_overview.png").stat().st_size > 10_000
    other_task = json.loads((results / "task-b" / "summary.json").read_text())
    other_task["setup"]["task"] = "mrpc"
    (results / "task-b" / "summary.json").write_text(json.dumps(other_task))
    overview.write_overview(results, ["task-a", "task-b"])
    text = (results / "comparison_overview.md").read_text()
    assert "on at least 2 tasks: met (2 task(s) of 2; reports: task-a, task-b)" in text
    other_task["setup"]["seeds"] = [0]
    (results / "task-b" / "summary.json").write_text(json.dumps(other_task))
    rows = overview.write_overview(results, ["task-a", "task-b"])
    assert [r["name"] for r in rows] == ["task-a"]
    assert (
        "Not yet run with several seeds: task-b."
        in (results / "comparison_overview.md").read_text()
    )
