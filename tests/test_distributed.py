"""Multi-process training (DDP on CPU), cluster sweeps (submitit) and W&B run naming."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import open_dict
from torch.utils.data import DataLoader

from coalora.cli import check_launch
from coalora.data.datamodule import EpochShuffleSampler
from coalora.methods import TrainingRun
from coalora.module import CoALoRAModule
from coalora.pipeline import make_trainer
from coalora.quant import config_set_id
from coalora.search import ParetoGPSearch
from coalora.search.callback import ParetoSearchCallback

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Each process of a test run gets one thread (the CPU is shared by both ranks).
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SET_LINE = re.compile(r"epoch (\d+): rank (\d) of 2 trains \d+ configurations, set (\w+)")


def compose_config(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def shards(sampler: EpochShuffleSampler, epoch: int, world_size: int = 2) -> list[list[int]]:
    """The indices each rank draws in ``epoch``, through the sampler Lightning substitutes for
    a custom one under DDP (``use_distributed_sampler``, the default)."""
    loader = DataLoader(range(sampler.size), sampler=sampler)
    out = []
    for rank in range(world_size):
        wrapped = _get_distributed_sampler(
            loader, True, 0, RunningStage.TRAINING, num_replicas=world_size, rank=rank
        )
        wrapped.set_epoch(epoch)
        out.append(list(wrapped))
    return out


def test_training_shards_are_disjoint_cover_the_data_and_follow_the_epoch():
    first = shards(EpochShuffleSampler(50, seed=3), epoch=0)
    assert [len(s) for s in first] == [25, 25]
    assert set(first[0]).isdisjoint(first[1]) and set(first[0]) | set(first[1]) == set(range(50))
    second = shards(EpochShuffleSampler(50, seed=3), epoch=1)
    assert second != first and sorted(second[0] + second[1]) == list(range(50))
    # A resumed run (fresh sampler, same seed and epoch) draws the same shards.
    assert shards(EpochShuffleSampler(50, seed=3), epoch=1) == second


def fake_trainer(rank: int, rank_zero_object, current_epoch: int = 0):
    """A two-process trainer seen from ``rank``: ``broadcast`` returns rank 0's object."""
    return SimpleNamespace(
        world_size=2,
        global_rank=rank,
        is_global_zero=rank == 0,
        current_epoch=current_epoch,
        strategy=SimpleNamespace(model=None, broadcast=lambda obj, src: rank_zero_object),
    )


def test_a_rank_out_of_step_with_rank_zero_is_refused(space):
    configs = [space.allocate(b) for b in (3.0, 4.0)]

    def rank_one(train_configs, sampler_draws: int):
        sampler = torch.Generator().manual_seed(0)
        for _ in range(sampler_draws):
            torch.randperm(2, generator=sampler)
        reference = (config_set_id(configs), torch.Generator().manual_seed(0).get_state())
        trainer = fake_trainer(1, reference)
        return SimpleNamespace(
            trainer=trainer,
            train_configs=train_configs,
            sampler=sampler,
            global_rank=1,
            current_epoch=0,
        )

    CoALoRAModule.check_ranks_agree(rank_one(configs, 0))  # in step: nothing raised
    with pytest.raises(RuntimeError, match="rank 1 would train epoch 0 on configuration set"):
        CoALoRAModule.check_ranks_agree(rank_one(configs[::-1], 0))  # other order
    with pytest.raises(RuntimeError, match="out of step"):
        CoALoRAModule.check_ranks_agree(rank_one(configs, 1))  # sampler one draw ahead


def test_a_rank_other_than_zero_takes_the_search_result_of_rank_zero(space, tmp_path):
    pool = [space.allocate(b) for b in (3.0, 4.0, 5.0)]
    rank_zero = ParetoGPSearch(space, [pool[2], pool[0]], seed=7)
    search = ParetoGPSearch(space, pool)
    callback = ParetoSearchCallback(search, tmp_path / "config_set")
    module = SimpleNamespace(train_configs=list(pool))
    callback.on_train_epoch_start(fake_trainer(1, rank_zero.state_dict()), module)  # epoch 0
    assert module.train_configs == pool  # no epoch before it: no round
    callback.on_train_epoch_start(fake_trainer(1, rank_zero.state_dict(), 1), module)
    assert module.train_configs == [pool[2], pool[0]] == search.configs
    assert torch.equal(search.generator.get_state(), rank_zero.generator.get_state())
    assert not (tmp_path / "config_set").exists()  # rank 0 alone writes the reports


def test_distributed_trainer_configs_build_their_strategies(tmp_path):
    cfg = compose_config(["trainer=ddp_cpu", "debug=fast", f"paths.output_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy.process_group_backend == "gloo"
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    cfg = compose_config(["trainer=fsdp", "debug=fast", f"paths.output_dir={tmp_path}"])
    strategy = instantiate(cfg.trainer.strategy)  # Lightning's FSDP itself needs CUDA
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("gpu", -1)


def test_a_multirun_that_would_relaunch_the_script_is_refused(tmp_path):
    cfg = compose_config(
        ["trainer=ddp_cpu", "debug=fast", f"paths.output_dir={tmp_path}"], hydra_config=True
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    single = instantiate(
        compose_config(["debug=fast", f"paths.output_dir={tmp_path}"]).trainer, logger=False
    )
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        check_launch(single)  # one process: nothing to re-launch
        with pytest.raises(ValueError, match="cannot be done inside --multirun"):
            check_launch(trainer)
    finally:
        HydraConfig.instance().cfg = None


def test_slurm_launcher_config_extends_the_submitit_plugin():
    launcher = compose_config(["hydra/launcher=slurm"], hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.timeout_min, launcher.gpus_per_node, launcher.tasks_per_node) == (240, 1, 1)
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.partition) == (8, 32, None)


def test_wandb_runs_share_a_group_and_carry_method_and_budget(space, tmp_path):
    cfg = compose_config(
        ["logger=wandb", "method=qlora", "debug=fast", "seed=3", f"paths.output_dir={tmp_path}"]
    )
    choice = space.allocate(3.0)
    names = {}
    for run in (TrainingRun("budget_3.0", [choice], 3.0), TrainingRun("", [choice])):
        _, loggers = make_trainer(cfg, space, run)
        experiment = loggers[0].experiment  # WANDB_MODE=disabled: no network
        names[run.name] = experiment.name
        assert experiment.group == f"sentiment-{cfg.model.name}-nf"
        experiment.finish()  # as after each run's evaluation
    assert names == {"budget_3.0": "qlora-frozen-seed3-budget_3.0", "": "qlora-frozen-seed3"}


def run_app(args: list[str], log: Path, timeout: float = 900) -> float:
    """``python -m coalora.run ARGS`` from the repository; its wall time in seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "coalora.run", *args],
            cwd=REPO,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    assert done.returncode == 0, log.read_text()[-4000:]
    return time.perf_counter() - start


def sets_by_rank(run_dir: Path) -> dict[tuple[int, int], str]:
    """(epoch, rank) → the id of the configuration set that rank trained on, from the Hydra
    log files of both ranks (``run.log``, ``train_ddp_process_1.log``)."""
    found = {}
    for name in ("run.log", "train_ddp_process_1.log"):
        for epoch, rank, set_id in SET_LINE.findall((run_dir / name).read_text()):
            found[int(epoch), int(rank)] = set_id
    return found


def training_set_id(report: Path) -> str:
    return config_set_id([row["config"] for row in json.loads(report.read_text())["training_set"]])


@pytest.mark.slow
def test_ddp_cpu_run_trains_every_rank_on_one_set_writes_once_and_resumes(
    shared_data_dir, tmp_path
):
    glue = shared_data_dir / "glue"
    if not glue.exists():
        pytest.skip("the shared GLUE data is not available")
    common = ["trainer=ddp_cpu", "debug=fast", "task=sst2", f"task.data_dir={glue}"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    # Two epochs: the second trains on the set rank 0's search broadcast after the first.
    seconds = run_app(
        [*common, "trainer.max_epochs=2", f"hydra.run.dir={first}"], tmp_path / "first.out"
    )
    results = (first / "eval" / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 12  # header + 6 budgets x (unseen, seen)
    summary = json.loads((first / "summary.json").read_text())
    assert summary["method"] == "coalora" and 0 < summary["hv"] <= 1
    assert summary["runs"][0]["training_configurations"] > 0
    assert (first / "config_set" / "epoch_0.json").exists()
    assert not (first / "config_set" / "epoch_1.json").exists()  # no epoch trains after it
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1
    sets = sets_by_rank(first)
    assert sets[0, 0] == sets[0, 1] and sets[1, 0] == sets[1, 1]
    assert sets[1, 1] == training_set_id(first / "config_set" / "epoch_0.json")
    assert config_set_id(ckpt["coalora"]["epoch_configs"]) == sets[1, 0]
    assert config_set_id(ckpt["coalora"]["train_configs"]) == sets[1, 0]
    console = (tmp_path / "first.out").read_text()
    assert console.count("hypervolume (unseen)") == 1  # reports and console: rank 0 only
    assert "rank 1 of 2" not in console  # rank 1 logs to its own file only

    resume_seconds = run_app(
        [
            *common,
            "trainer.max_epochs=3",
            f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={resumed}",
        ],
        tmp_path / "resumed.out",
    )
    sets = sets_by_rank(resumed)
    assert set(sets) == {(2, 0), (2, 1)}  # one more epoch, on both ranks
    # The round after epoch 1 runs on resuming, before epoch 2, broadcast to both ranks.
    assert sets[2, 0] == sets[2, 1] == training_set_id(resumed / "config_set" / "epoch_1.json")
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert len((resumed / "eval" / "results.csv").read_text().splitlines()) == 13
    assert not (resumed / "config_set" / "epoch_2.json").exists()
    print(f"ddp_cpu wall time: 2 epochs {seconds:.0f} s, resumed epoch {resume_seconds:.0f} s")


@pytest.mark.slow
def test_submitit_local_sweep_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    seconds = run_app(
        [
            "--multirun",
            "hydra/launcher=submitit_local",
            "debug=fast",
            "search=frozen",
            "eval.budgets=[3.0]",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path / "sweep.out",
    )
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in (0, 1)]
    assert [s["method"] for s in summaries] == ["coalora", "coalora"]
    assert all(len(s["results"]) == 2 for s in summaries)  # budget 3.0, unseen and seen
    configs = [json.loads((sweep / str(job) / "run_config.json").read_text()) for job in (0, 1)]
    assert [c["config"]["seed"] for c in configs] == [0, 1]
    assert len(list((sweep / ".submitit").iterdir())) >= 2  # the launcher's job folders
    print(f"submitit_local sweep of 2 jobs: {seconds:.0f} s")
