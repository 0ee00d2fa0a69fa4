"""The Hydra entry point: every config composes; a fast run trains, evaluates, reports, resumes."""

import itertools
import json
import re
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import coalora.pipeline
from coalora.evaluation import read_results
from coalora.methods import LoraInit, SVDInit
from coalora.model.backbone import QuantizedLoRAModel
from coalora.pareto import segmented_pareto_filter
from coalora.quant import ConfigSpace, ErrorTable, config_space
from coalora.quant.tensor import packed_nbytes
from coalora.run import train
from coalora.search.callback import ParetoSearchCallback

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {
    "task": ["sst2", "mnli", "qnli", "qqp", "rte", "mrpc", "cola", "sentiment"]
    + ["wikitext2", "c4", "text"],
    "quant": ["nf", "int"],
    "model": ["minilm", "roberta-base", "roberta-large"]
    + ["smollm2", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama2-7b"],
    "trainer": ["cpu", "gpu", "ddp", "ddp_cpu", "fsdp"],
    "logger": ["csv", "wandb", "none"],
    "search": ["pareto_gp", "random", "frozen"],
    "method": ["coalora", "shared", "qlora", "lqlora"],
    "experiment": sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")),
}


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(
    "override", [f"{g}={name}" for g, names in GROUPS.items() for name in names]
)
def test_every_config_composes(override, tmp_path):
    cfg = compose_config([override, "debug=fast", f"paths.output_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["max_train_samples"] == 64  # debug=fast wins over experiments
    assert resolved["trainer"]["_target_"] == "lightning.Trainer"
    assert resolved["task"]["name"] in GROUPS["task"]


@pytest.mark.parametrize("name", ["pareto_gp", "random"])
def test_search_configs_build_the_callback(name, tmp_path):
    cfg = compose_config([f"search={name}", "debug=fast", f"paths.output_dir={tmp_path}"])
    options = config_space(cfg.quant.fmt)
    errors = torch.tensor([[4.0**-o.bits_per_param for o in options]] * 2, dtype=torch.float64)
    space = ConfigSpace.from_table(ErrorTable(["a", "b"], [64, 64], options, errors))
    search = instantiate(cfg.search.strategy, _partial_=True)(space, [space.allocate(4.0)])
    callback = instantiate(cfg.search.callback, _partial_=True)(search)
    assert isinstance(callback, ParetoSearchCallback) and callback.search is search
    assert (search.num_proposals, callback.heldout_size) == (4, 16)
    assert callback.dirpath == tmp_path / "config_set"


@pytest.fixture(scope="module")
def glue_overrides(shared_data_dir):
    """SST-2 from the shared GLUE copy; error tables go to the default (content-keyed) cache."""
    glue = shared_data_dir / "glue"
    if not glue.exists():
        pytest.skip("the shared GLUE data is not available")
    return ["task=sst2", f"task.data_dir={glue}", "debug=fast"]


def run(overrides: list[str], out: Path) -> dict:
    return train(compose_config([*overrides, f"paths.output_dir={out}"]))


@pytest.fixture(scope="module")
def fast_run(glue_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast-run")
    return out, run([*glue_overrides, "trainer.max_epochs=3"], out)


def search_report(out: Path, epoch: int) -> dict:
    return json.loads((out / "config_set" / f"epoch_{epoch}.json").read_text())


def test_fast_run_writes_every_report(fast_run):
    out, summary = fast_run
    records = read_results(out / "eval" / "results.csv")
    assert len(records) == 12 == len(read_results(out / "eval" / "results.json"))
    assert {(r.split, r.target_budget) for r in records} == {
        (s, b) for s in ("unseen", "seen") for b in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
    }
    for r in records:
        assert 0.0 <= r.value <= 1.0 and r.metric == "accuracy" and r.num_samples == 32
        if r.split == "unseen":
            assert r.avg_bits <= r.target_budget + 1e-9
    assert (out / "eval" / "accuracy_vs_bits.png").stat().st_size > 10_000
    on_disk = json.loads((out / "summary.json").read_text())
    # The last epoch trained on the set chosen after epoch 1; no round follows the last epoch.
    last_trained = search_report(out, 1)["training_set"]
    (only_run,) = on_disk["runs"]
    assert only_run["training_configurations"] == len(last_trained)
    assert only_run["configurations_trained_on"] >= len(last_trained)
    assert on_disk["compared_split"] == "unseen"
    assert 0.0 < on_disk["hv"] == on_disk["hypervolume"]["unseen"] <= 1.0
    assert on_disk["values"] == {
        str(r.target_budget): r.value for r in records if r.split == "unseen"
    }
    assert on_disk["trainable_parameters"]["config_net"] > 0
    assert on_disk["train_seconds"] > 0 and on_disk["eval_seconds"] > 0
    assert on_disk["device"] == only_run["device"] == "cpu"  # where trainer=cpu trained


def test_search_reports_every_epoch(fast_run):
    out, _ = fast_run
    reports = [search_report(out, k) for k in range(2)]
    assert not (out / "config_set" / "epoch_2.json").exists()  # no epoch trains after it
    for k, report in enumerate(reports):
        assert report["epoch"] == k and (out / "config_set" / f"epoch_{k}.png").exists()
        pool, proposals = report["pool"], report["proposals"]
        assert 1 <= len(proposals) <= 4 and report["acquisition_evaluations"] <= 300
        configs = [row["config"] for row in pool + proposals]
        assert len({tuple(c) for c in configs}) == len(configs)  # proposals are new
        rows = pool + proposals
        kept = segmented_pareto_filter(
            np.array([r["bits"] for r in rows]), np.array([r["loss"] for r in rows]), 2.25, 6.5, 17
        )
        assert report["training_set"] == [rows[i] for i in kept]
        assert report["pool_hypervolume"] > 0 and report["seconds"] > 0
        assert 0 < report["scoring_seconds"] < report["seconds"]
    for before, after in itertools.pairwise(reports):
        assert [r["config"] for r in after["pool"]] == [r["config"] for r in before["training_set"]]
    metrics = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    names = ("train_set_size", "bits_min", "bits_max", "pool_hv", "seconds", "scoring_seconds")
    assert {f"search/{name}" for name in names} <= set(metrics)


def test_checkpoint_holds_the_configuration_set_and_no_frozen_weights(fast_run):
    out, _ = fast_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    final_set = [row["config"] for row in search_report(out, 1)["training_set"]]
    assert ckpt["coalora"]["train_configs"] == ckpt["coalora"]["epoch_configs"] == final_set
    assert ckpt["callbacks"]["ParetoSearchCallback"]["configs"] == final_set
    assert all(len(c) == 36 for c in final_set)
    keys = ckpt["state_dict"].keys()
    assert any("lora_A" in k for k in keys) and any("config_net" in k for k in keys)
    assert not any(k.endswith("attention.self.query.weight") for k in keys)


def trainable_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def test_resume_continues_exactly(glue_overrides, tmp_path):
    straight = tmp_path / "straight"
    run([*glue_overrides, "trainer.max_epochs=2"], straight)
    first = tmp_path / "first"
    run([*glue_overrides, "trainer.max_epochs=1"], first)
    resumed = tmp_path / "resumed"
    ckpt = first / "checkpoints" / "last.ckpt"
    run([*glue_overrides, "trainer.max_epochs=2", f"ckpt_path={ckpt}"], resumed)
    a = trainable_state(straight / "checkpoints" / "last.ckpt")
    b = trainable_state(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))
    # The one-epoch run ended without a round; the resumed run ran the round after epoch 0
    # as the straight run did, from the checkpoint's model and search state.
    assert not (first / "config_set" / "epoch_0.json").exists()
    assert search_report(resumed, 0) == {
        **search_report(straight, 0),
        "seconds": search_report(resumed, 0)["seconds"],
        "scoring_seconds": search_report(resumed, 0)["scoring_seconds"],
    }


def cached_table(overrides: list[str]) -> ErrorTable:
    """The error table a run with ``overrides`` computed (the one MiniLM NF table cached)."""
    cfg = compose_config(overrides)
    (path,) = Path(cfg.paths.cache_dir).glob(f"{cfg.model.name}-{cfg.quant.fmt}-plain-*.pt")
    return ErrorTable.load(path)


def test_per_budget_baselines_train_one_run_per_budget(glue_overrides, tmp_path, monkeypatch):
    models, alive_at_fit_start = weakref.WeakSet(), []
    build, fit = QuantizedLoRAModel.__init__, coalora.pipeline.fit_and_evaluate

    def tracked_build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        models.add(self)

    def tracked_fit(*args, **kwargs):
        alive_at_fit_start.append(len(models))
        return fit(*args, **kwargs)

    monkeypatch.setattr(QuantizedLoRAModel, "__init__", tracked_build)
    monkeypatch.setattr(coalora.pipeline, "fit_and_evaluate", tracked_fit)
    summary = run([*glue_overrides, "method=lqlora", "eval.budgets=[3.0,4.0]"], tmp_path)
    assert alive_at_fit_start == [0, 0]  # no finished fit stays in memory
    table = cached_table(glue_overrides)
    space = ConfigSpace.from_table(table)
    assert [r["name"] for r in summary["runs"]] == ["budget_3.0", "budget_4.0"]
    assert all(r["training_configurations"] == 1 for r in summary["runs"])
    assert summary["train_seconds"] == pytest.approx(
        sum(r["train_seconds"] for r in summary["runs"])
    )
    records = read_results(tmp_path / "eval" / "results.csv")
    # Each budget's adapter is evaluated on the allocation it was trained on, and only there.
    assert [(r.method, r.split, r.target_budget) for r in records] == [
        ("lqlora", "seen", 3.0),
        ("lqlora", "seen", 4.0),
    ]
    for r in records:
        assert r.avg_bits == pytest.approx(space.bits(space.allocate(r.target_budget)))
    assert (
        summary["compared_split"] == "seen" and summary["trainable_parameters"]["config_net"] == 0
    )
    for name in ("budget_3.0", "budget_4.0"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert len(ckpt["coalora"]["train_configs"]) == 1
    # A per-budget run holds its allocation's packed codes only, not dense weights.
    for entry in summary["runs"]:
        choice = space.allocate(entry["budget"])
        packed = sum(
            packed_nbytes(n, table.options[j]) for n, j in zip(table.numels, choice, strict=True)
        )
        assert entry["frozen_target_mib"] * 2**20 == pytest.approx(packed, rel=0.05)
    with pytest.raises(ValueError, match="ckpt_path resumes one run, but method=lqlora trains 2"):
        run(
            [*glue_overrides, "method=lqlora", "eval.budgets=[3.0,4.0]", "ckpt_path=x.ckpt"],
            tmp_path,
        )


def test_a_stopped_per_budget_run_resumes_with_its_unfinished_fits(
    glue_overrides, tmp_path, monkeypatch
):
    overrides = [*glue_overrides, "method=qlora", "eval.budgets=[3.0,4.0]"]
    root = tmp_path / "run"
    straight = run(overrides, root)
    examples = dict(np.load(root / "eval" / "examples.npz"))
    (root / "budget_4.0" / "fit_result.pt").unlink()  # stopped in the second fit
    (root / "summary.json").unlink()
    trained, fit = [], coalora.pipeline.fit_and_evaluate

    def tracked_fit(exp, training_run):
        trained.append(training_run.name)
        return fit(exp, training_run)

    monkeypatch.setattr(coalora.pipeline, "fit_and_evaluate", tracked_fit)
    last = (root / "budget_4.0" / "checkpoints" / "last.ckpt").resolve()
    stopped = (
        f"budget_4.0 holds a stopped attempt at this fit: resume it with ckpt_path={last} "
        f"eval.budgets=[4.0] hydra.run.dir={root}"
    )
    with pytest.raises(ValueError, match=re.escape(stopped)):
        run(overrides, root)
    assert trained == []  # refused before any fit trained
    alone = run([*glue_overrides, "method=qlora", "eval.budgets=[4.0]", f"ckpt_path={last}"], root)
    assert alone["values"] == pytest.approx({4.0: straight["values"][4.0]})
    moved = tmp_path / "moved"  # a folder resumes where it is copied to
    root.rename(moved)
    assert run(overrides, moved)["values"] == straight["values"]
    assert trained == ["budget_4.0"]  # the resumed fit alone; the full run read both
    shutil.rmtree(moved / "budget_4.0")  # what experiments/compare.py clears
    resumed = run(overrides, moved)
    assert trained == ["budget_4.0", "budget_4.0"]
    assert [r["loaded"] for r in resumed["runs"]] == [True, False]
    assert resumed["values"] == straight["values"]  # each fit starts from the run's seed
    assert resumed["runs"][0]["train_seconds"] == straight["runs"][0]["train_seconds"]
    again = np.load(moved / "eval" / "examples.npz")
    assert again.files == list(examples)
    for key, rows in examples.items():
        np.testing.assert_array_equal(again[key], rows)
    with pytest.raises(ValueError, match=r"budget_3.0/fit_result.pt holds a fit trained with "
                       r"other settings \(method.optimizer.lr\)"):  # fmt: skip
        run([*overrides, "method.optimizer.lr=0.01"], moved)


def test_shared_lora_trains_its_fixed_budgets_without_theta(glue_overrides, tmp_path):
    summary = run([*glue_overrides, "method=shared"], tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    space = ConfigSpace.from_table(cached_table(glue_overrides))
    expected = [list(space.allocate(b)) for b in (2.5, 3.0, 3.5, 4.0)]
    assert ckpt["coalora"]["train_configs"] == expected
    assert not any("config_net" in k for k in ckpt["state_dict"])
    assert not (tmp_path / "config_set").exists()  # search=frozen comes with the method
    assert summary["compared_split"] == "unseen" and len(summary["values"]) == 6
    with pytest.raises(ValueError, match="method=shared trains a fixed set.*search=frozen"):
        run([*glue_overrides, "method=shared", "search=random"], tmp_path / "bad")


def test_training_runs_follow_the_method(space):
    def runs(*overrides):
        cfg = compose_config(["debug=fast", *overrides])
        plan = instantiate(cfg.method.plan)
        plan.check_search(cfg.method.name, cfg.search.name, bool(cfg.search.get("callback")))
        return plan.runs(space, cfg.eval.budgets)

    (coalora,) = runs("method=coalora")
    assert coalora.budget is None and len(coalora.train_configs) >= 2
    (shared,) = runs("method=shared")
    assert shared.train_configs == [space.allocate(b) for b in (2.5, 3.0, 3.5, 4.0)]
    per_budget = runs("method=qlora")
    assert [r.name for r in per_budget] == [f"budget_{b}" for b in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)]
    assert all(r.train_configs == [space.allocate(r.budget)] for r in per_budget)
    with pytest.raises(ConfigCompositionException, match="Could not find 'method/plan/all'"):
        runs("method/plan=all")
    with pytest.raises(ValueError, match="method=qlora trains a fixed set.*not search=pareto_gp"):
        runs("method=qlora", "search=pareto_gp")


def test_each_method_starts_its_lora_factors_as_configured():
    def init(*overrides):
        return instantiate(compose_config(["debug=fast", *overrides]).method.init)

    # CoA-LoRA starts from the standard initialisation; language modelling adds each option's
    # residual correction by default. The baselines keep their own initialisation.
    assert type(init("method=coalora", "task=sst2")) is LoraInit
    assert type(init("method=coalora", "task=wikitext2", "model=smollm2")) is LoraInit
    for task, rank in [("sst2", 0), ("wikitext2", 16)]:
        cfg = compose_config(["debug=fast", "method=coalora", f"task={task}", "model=smollm2"])
        assert cfg.method.residual_rank == rank
    for method, kind in [("qlora", LoraInit), ("shared", LoraInit), ("lqlora", SVDInit)]:
        assert type(init(f"method={method}", "task=wikitext2", "model=smollm2")) is kind
        cfg = compose_config(["debug=fast", f"method={method}", "task=wikitext2", "model=smollm2"])
        assert cfg.method.residual_rank == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=wikitext2", "model=smollm2", "method/init=svd"],
            r"^method.residual_rank=16 already corrects every option's residual; method/init=svd "
            r"would correct the reference allocation's a second time: use method/init=standard, "
            r"or set method.residual_rank=0$",
        ),
        (
            ["method=qlora", "method.residual_rank=4"],
            r"^method.residual_rank=4: a per-budget fit keeps only its configuration's packed "
            r"weights, from which no option's residual can be computed; set "
            r"method.residual_rank=0$",
        ),
        (
            ["method/init=svd", "method.residual_rank=-1"],
            r"^method.residual_rank=-1 must be a whole number >= 0 \(0: no correction\)$",
        ),
        (["method.residual_rank='4'"], r"^method.residual_rank='4' must be a whole number"),
        (["method.residual_rank=true"], r"^method.residual_rank=True must be a whole number"),
        (["method.residual_rank=null"], r"^method.residual_rank=None must be a whole number"),
        (
            ["++task.kind=languagemodeling"],
            r"^task.kind='languagemodeling'; choose one of \('classification', 'language_model",
        ),
    ],
)
def test_residual_settings_are_checked_before_any_work(overrides, message):
    from coalora.preflight import check_settings

    cfg = compose_config(["debug=fast", *overrides])
    plan, init = instantiate(cfg.method.plan), instantiate(cfg.method.init)
    with pytest.raises(ValueError, match=message):
        check_settings(cfg, plan, init)
    if not any("task.kind" in o for o in overrides):
        fixed = compose_config(["debug=fast", *overrides, "method.residual_rank=0"])
        assert check_settings(fixed, plan, init) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "eval.budgets=[9]",
            r"eval.budgets: budgets \[9\] are outside the achievable range \[2.0322, 8.6250\]",
        ),
        ("eval.budgets=['3.0','4.0']", r"holds \['3.0', '4.0'\], which are not numbers"),
        ("eval.budgets=3", r"eval.budgets=3 is not a list; give a list of bit-widths"),
        ("eval.val_budgets=[]", r"eval.val_budgets=\[\] is empty"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 trains nothing: use at least 1"),
        ("method.rank=500", r"rank=500 must be an integer in \[1, 384\]"),
    ],
)
def test_bad_settings_fail_before_training(glue_overrides, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run([*glue_overrides, override], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_under_other_settings_is_refused(fast_run, glue_overrides, tmp_path):
    from coalora.checkpoints import check_identity

    out, _ = fast_run
    ckpt = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="method: checkpoint 'coalora', this run 'shared'"):
        run(
            [*glue_overrides, "method=shared", "trainer.max_epochs=4", f"ckpt_path={ckpt}"],
            tmp_path,
        )
    state = torch.load(ckpt, weights_only=True)
    identity = {**state["coalora"]["identity"], "quant": "int"}
    with pytest.raises(ValueError, match="quant: checkpoint 'nf', this run 'int'"):
        check_identity(state, identity)
    with pytest.raises(ValueError, match="not written by coalora"):
        check_identity({"state_dict": {}}, identity)
    # A checkpoint from before residual corrections had none: it resumes with 0, not with 4.
    del state["coalora"]["identity"]["residual_rank"]
    check_identity(state, {**state["coalora"]["identity"], "residual_rank": 0})
    with pytest.raises(ValueError, match="residual_rank: checkpoint 0, this run 4"):
        check_identity(state, {**state["coalora"]["identity"], "residual_rank": 4})


def test_the_best_validation_epoch_is_evaluated(glue_overrides, tmp_path):
    summary = run(
        [*glue_overrides, "trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=val/metric"],
        tmp_path,
    )
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("val/metric")
    scores = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(scores) == 3
    assert summary["runs"][0]["best_epoch"] == scores.index(max(scores))
    assert set(summary["validation"]["values"]) == {2.5, 3.0, 3.5, 4.0, 5.0, 6.0}
    assert 0.0 < summary["validation"]["hv"] <= 1.0
    with np.load(tmp_path / "eval" / "examples.npz") as examples:
        assert examples["unseen/3"].shape == (32, 2)


def test_fit_settings_leave_out_a_residual_rank_at_its_old_default():
    from omegaconf import OmegaConf

    from coalora.fit_results import fit_settings
    from coalora.methods import TrainingRun

    run = TrainingRun("", [])
    without = fit_settings(OmegaConf.create({"method": {"name": "coalora", "rank": 16}}), run)
    at_zero = OmegaConf.create({"method": {"name": "coalora", "rank": 16, "residual_rank": 0}})
    assert fit_settings(at_zero, run) == without  # results saved before the setting match
    at_16 = OmegaConf.create({"method": {"name": "coalora", "rank": 16, "residual_rank": 16}})
    assert fit_settings(at_16, run)["method"]["residual_rank"] == 16
    # A value looked up by task kind is recorded as looked up, without the table.
    table = {"classification": 0, "language_modeling": 16}
    for kind, expected in [("classification", without), ("language_modeling", None)]:
        cfg = OmegaConf.create({
            "task": {"kind": kind},
            "method": {"name": "coalora", "rank": 16, "residual_ranks": table,
                       "residual_rank": "${.residual_ranks.${task.kind}}"},
        })  # fmt: skip
        settings = fit_settings(cfg, run)
        assert "residual_ranks" not in settings["method"]
        if expected is None:
            assert settings["method"]["residual_rank"] == 16
        else:
            assert settings["method"] == expected["method"]
