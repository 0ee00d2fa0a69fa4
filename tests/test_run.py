"""The Hydra entry point: every config composes; a fast run trains, evaluates, reports, resumes."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from coalora.evaluation import read_results
from coalora.run import train

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {
    "task": ["sst2", "mnli", "qnli", "qqp", "rte", "mrpc", "cola", "sentiment"],
    "quant": ["nf", "int"],
    "model": ["minilm", "roberta-base", "roberta-large"],
    "trainer": ["cpu", "gpu", "ddp"],
    "logger": ["csv", "wandb", "none"],
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
    return out, run(glue_overrides, out)


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
    assert on_disk["training_configurations"] == summary["training_configurations"] == 5
    assert 0.0 < on_disk["hypervolume"]["unseen"] <= 1.0
    assert on_disk["trainable_parameters"]["config_net"] > 0
    assert on_disk["train_seconds"] > 0 and on_disk["eval_seconds"] > 0


def test_checkpoint_holds_the_configuration_set_and_no_frozen_weights(fast_run):
    out, _ = fast_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(ckpt["coalora"]["train_configs"]) == 5
    assert all(len(c) == 36 for c in ckpt["coalora"]["train_configs"])
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
