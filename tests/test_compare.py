"""The comparison report of experiments/compare.py, on synthetic finished sweeps."""

import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compare.py"
spec = importlib.util.spec_from_file_location("compare", SCRIPT)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

BUDGETS = [2.5, 3.0, 4.0]


def fake_job(root: Path, n: int, method: str, seed: int, accuracy: float) -> None:
    """A finished job folder as ``coalora.run`` writes it (summary and Hydra files)."""
    per_budget = method in ("qlora", "lqlora")
    split = "seen" if per_budget else "unseen"
    runs = (
        [{"name": f"budget_{b}", "budget": b, "train_seconds": 10.0 * b} for b in BUDGETS]
        if per_budget
        else [{"name": "", "budget": None, "train_seconds": 50.0}]
    )
    results = [
        {"split": split, "target_budget": b, "avg_bits": b - 0.01, "value": accuracy + b / 100}
        | {"num_samples": 872}
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
        "values": {str(b): accuracy + b / 100 for b in BUDGETS},
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "runs": runs,
        "results": results,
    }
    job = root / str(n)
    (job / ".hydra").mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps(summary))
    config = {
        "seed": seed,
        "data": {"max_train_samples": 4000, "max_length": 128, "batch_size": 32},
        "trainer": {"max_epochs": 2},
        "method": {"rank": 16, "optimizer": {"lr": 5e-4}},
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


@pytest.fixture
def sweep(tmp_path) -> Path:
    accuracy = {"qlora": 0.80, "lqlora": 0.81, "shared": 0.78, "coalora": 0.82}
    n = 0
    for seed in (0, 1):
        for method in compare.METHODS:
            fake_job(tmp_path / "sweep", n, method, seed, accuracy[method] + seed / 50)
            n += 1
    return tmp_path / "sweep"


def test_report_averages_seeds_and_sums_per_budget_runs(sweep, tmp_path):
    summary = compare.write_report(compare.load_runs(sweep), tmp_path / "out", "cmd")
    methods = summary["methods"]
    assert summary["setup"]["seeds"] == [0, 1] and summary["setup"]["model"] == "minilm"
    # Per-budget methods: serving n budgets costs the sum of the first n runs.
    assert methods["qlora"]["cumulative_time_s"] == pytest.approx([25.0, 55.0, 95.0])
    assert methods["qlora"]["total_time_s"] == pytest.approx(95.0)
    # One run serves every budget.
    assert methods["coalora"]["cumulative_time_s"] == pytest.approx([50.0, 50.0, 50.0])
    assert methods["coalora"]["metric"]["3.0"] == pytest.approx(0.82 + 0.01 + 0.03)
    assert methods["coalora"]["hv"] == pytest.approx((0.41 + 0.43) / 2)
    assert methods["qlora"]["split"] == "seen" and methods["shared"]["split"] == "unseen"
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| CoA-LoRA | 0.8550 | 0.8600 | 0.8700 |" in report
    assert "| QLoRA | +0.0200 | +0.0200 | +0.0200 |" in report
    for name in ("metric_vs_bits.png", "time_vs_budgets.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    assert compare.command_of(compare.load_runs(sweep)) == (
        "python experiments/compare.py task=sst2 seed=0,1"
    )


def test_report_rejects_mixed_or_incomplete_sweeps(sweep, tmp_path):
    runs = compare.load_runs(sweep)
    runs[0]["config"].trainer.max_epochs = 3
    with pytest.raises(ValueError, match="the jobs differ in epochs"):
        compare.setup_of(runs)
    runs = [r for r in compare.load_runs(sweep) if r["summary"]["method"] != "shared"]
    with pytest.raises(ValueError, match=r"lacks methods \['shared'\]"):
        compare.compare(runs, BUDGETS)
    with pytest.raises(ValueError, match=r"more than once: \[\('coalora', 0\)"):
        compare.compare(compare.load_runs(sweep, sweep), BUDGETS)
    with pytest.raises(FileNotFoundError, match="no finished job"):
        compare.load_runs(tmp_path / "empty")
