"""The ablation report of experiments/ablate.py, on synthetic finished jobs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # ablate.py imports compare beside it
spec = importlib.util.spec_from_file_location("ablate", EXPERIMENTS / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)


def fake_job(
    sweep: Path,
    variant: str,
    seed: int,
    validation_hv: float,
    stop_on: str = "val/loss",
    shared: tuple[str, ...] = ("task=sst2",),
) -> None:
    values = {"3": validation_hv + 0.05, "4": validation_hv + 0.06}
    summary = {
        "validation": {"hv": validation_hv, "values": values},
        "hv": validation_hv - 0.01,
        "train_seconds": 120.0,
    }
    folder = sweep / variant / f"seed_{seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    config = {
        "task": {"name": "sst2"},
        "quant": {"fmt": "nf"},
        "data": {"max_train_samples": 1000, "val_size": 256, "max_length": 128},
        "trainer": {"max_epochs": 6},
        "callbacks": {"early_stopping": {"monitor": stop_on, "patience": 1}},
    }
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    own = ["method=coalora", "method.optimizer.lr=0.0005", f"seed={seed}"]
    overrides = [*own, *shared, *ablate.VARIANTS[variant]]
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")


def test_a_variant_is_adopted_only_when_its_paired_gain_is_above_zero(tmp_path):
    sweep = tmp_path / "sweep"
    baseline = [0.70, 0.74, 0.72]
    for seed, hv in enumerate(baseline):
        fake_job(sweep, "baseline", seed, hv)
        fake_job(sweep, "weight_decay", seed, hv + 0.02 + 0.001 * seed)  # consistent gain
        fake_job(sweep, "k1", seed, hv + (0.06 if seed == 0 else -0.02))  # one lucky seed
    fake_job(sweep, "rank64", 0, 0.80)  # one seed: never adopted

    summary = ablate.report(ablate.load(sweep), tmp_path / "out", ["python experiments/ablate.py"])

    assert summary["adopted"] == ["weight_decay"]
    gain = summary["variants"]["weight_decay"]["vs_baseline"]
    assert gain["mean"] == pytest.approx(0.021)
    assert gain["interval"][0] > 0
    k1 = summary["variants"]["k1"]["vs_baseline"]
    assert k1["mean"] == pytest.approx(0.02 / 3)
    assert k1["interval"][0] < 0 < k1["interval"][1]
    assert summary["variants"]["rank64"]["vs_baseline"]["interval"] is None
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Adopted (paired interval above 0): **weight_decay**" in text
    assert "| +0.1000 (one seed) |" in text
    assert (tmp_path / "out" / "validation_hv.png").stat().st_size > 0


def test_variants_pair_against_the_named_baseline(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, hv in enumerate([0.70, 0.74, 0.72]):
        fake_job(sweep, "baseline", seed, hv - 0.05)  # older defaults, far below
        fake_job(sweep, "svd_init_3bit", seed, hv)
        fake_job(sweep, "residual_r16", seed, hv + 0.01 + 0.001 * seed)
    summary = ablate.report(ablate.load(sweep), tmp_path / "out", ["cmd"], "svd_init_3bit")
    gain = summary["variants"]["residual_r16"]["vs_baseline"]
    assert gain["mean"] == pytest.approx(0.011) and gain["interval"][0] > 0
    assert summary["variants"]["svd_init_3bit"]["vs_baseline"] is None
    assert summary["variants"]["baseline"]["vs_baseline"]["mean"] == pytest.approx(-0.05)
    assert summary["adopted"] == ["residual_r16"] and summary["baseline"] == "svd_init_3bit"
    assert "| vs svd_init_3bit |" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="baseline 'k1' has no finished job"):
        ablate.report(ablate.load(sweep), tmp_path / "out", ["cmd"], "k1")
    other = tmp_path / "without-baseline"  # the default baseline may be absent: no pairing
    fake_job(other, "rank64", 0, 0.8)
    summary = ablate.report(ablate.load(other), tmp_path / "out2", ["cmd"])
    assert summary["variants"]["rank64"]["vs_baseline"] is None and summary["adopted"] == []


def test_jobs_under_another_protocol_are_refused(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "baseline", 0, 0.70)
    fake_job(sweep, "k1", 0, 0.71, stop_on="val/metric")  # an older stopping rule
    with pytest.raises(ValueError, match="differ in their protocol"):
        ablate.load(sweep)


def test_the_report_names_the_commands_that_train_its_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1, 2):
        fake_job(sweep, "svd_init_3bit", seed, 0.70)
        fake_job(sweep, "residual_r16", seed, 0.72)
    fake_job(sweep, "k1", 0, 0.71)
    out = tmp_path / "out"
    commands = ablate.commands_of(sweep, ablate.load(sweep), "residual_r16", out)
    assert commands == [  # the baseline's jobs first: the others pair against them
        f"python experiments/ablate.py --variants residual_r16,svd_init_3bit --seeds 0,1,2 "
        f"--baseline residual_r16 --sweep-dir {sweep} --out {out} task=sst2",
        f"python experiments/ablate.py --variants k1 --seeds 0 --baseline residual_r16 "
        f"--sweep-dir {sweep} --out {out} task=sst2",
    ]
    ablate.report(ablate.load(sweep), out, commands, "residual_r16")
    assert f"    {commands[1]}" in (out / "report.md").read_text()
    fake_job(sweep, "k1", 1, 0.71, shared=("task=mrpc",))
    with pytest.raises(ValueError, match="ran with different overrides"):
        ablate.commands_of(sweep, ablate.load(sweep), "residual_r16", out)
