"""Serving and export: a trained run at any budget, as a packed model and as a peft adapter."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_fast_sst2
from peft import PeftModel

from coalora.data import TaskSpec, TextClassificationDataModule
from coalora.evaluation import read_configurations, read_results
from coalora.quant import QuantConfig, config_space, quantize
from coalora.quant.space import config_id
from coalora.serve import (
    Deployment,
    PackedLoRALinear,
    load_dequantized_base,
    load_export,
    packed_nbytes,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def dep(run_dir) -> Deployment:
    return Deployment.from_run(run_dir)


def test_packed_size_formula_matches_quantize():
    w = torch.randn(37, 91)  # pads to whole blocks and scale groups
    for option in config_space("nf")[::7]:
        assert packed_nbytes(w.numel(), option) == quantize(w, option).nbytes, option


def test_results_rows_name_saved_configurations(run_dir, dep):
    records = read_results(run_dir / "eval" / "results.csv")
    saved = read_configurations(run_dir / "eval")
    assert {r.config_id for r in records} == set(saved)
    for r in records:
        assert config_id(saved[r.config_id]) == r.config_id
        assert dep.describe(tuple(saved[r.config_id]))["avg_bits"] == pytest.approx(r.avg_bits)


def run_test_batches(run_dir):
    """The run's own test split, rebuilt from its saved configuration."""
    saved = json.loads((run_dir / "run_config.json").read_text())["config"]
    data = {k: v for k, v in saved["data"].items() if k != "_target_"}
    datamodule = TextClassificationDataModule(task=TaskSpec(**saved["task"]), **data)
    datamodule.setup()
    return list(datamodule.test_dataloader())


def logits_of(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def test_export_at_3_bits_reloads_with_the_run_logits_and_accuracy(run_dir, dep, tmp_path):
    choice = dep.choose(bits=3.0)
    (row,) = [
        r
        for r in read_results(run_dir / "eval" / "results.csv")
        if r.config_id == config_id(choice)
    ]
    assert (row.split, row.target_budget) == ("unseen", 3.0)
    batches = run_test_batches(run_dir)
    labels = torch.cat([b["labels"] for b in batches])
    dep.model.set_configuration(choice)
    in_run = logits_of(dep.model, batches)

    served = dep.at(bits=3.0)
    out = dep.export(tmp_path / "sst2-3bit", bits=3.0)
    exported = load_export(out)
    via_peft = PeftModel.from_pretrained(load_dequantized_base(out), out).eval()
    for model in (served, exported, via_peft):
        logits = logits_of(model, batches)
        assert torch.allclose(logits, in_run, atol=1e-4)
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(row.value, abs=1e-6)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md"} <= files
    assert {"quantized_model.safetensors", "quantization.json", "tokenizer.json"} <= files
    card = (out / "README.md").read_text()
    assert f"accuracy {row.value:.4f}" in card and "3.0000" in card
    summary = json.loads((out / "quantization.json").read_text())
    assert summary["export_bytes"] < 0.7 * summary["fp32_bytes"]


def test_a_run_with_residual_corrections_exports_them_as_more_lora_rank(shared_data_dir, tmp_path):
    run = train_fast_sst2(shared_data_dir, tmp_path / "run", "method.residual_rank=4")
    dep = Deployment.from_run(run)
    choice = dep.choose(bits=3.0)
    (row,) = [
        r for r in read_results(run / "eval" / "results.csv") if r.config_id == config_id(choice)
    ]
    batches = run_test_batches(run)
    labels = torch.cat([b["labels"] for b in batches])
    dep.model.set_configuration(choice)
    in_run = logits_of(dep.model, batches)
    served = dep.at(config=list(choice))
    total = sum(t.numel() * t.element_size() for t in served.state_dict().values())
    assert total == dep.served_nbytes(choice)  # the corrections' rank counted
    out = dep.export(tmp_path / "export", bits=3.0)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (20, 20.0)  # 16 + 4, scale 1
    for model in (load_export(out), PeftModel.from_pretrained(load_dequantized_base(out), out)):
        logits = logits_of(model.eval(), batches)
        assert torch.allclose(logits, in_run, atol=1e-4)
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(row.value, abs=1e-6)
    # Without its corrections the same adapter is another model: an edit is refused.
    saved = json.loads((run / "run_config.json").read_text())
    saved["config"]["method"]["residual_rank"] = 0
    (run / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="method.residual_rank is 0 there, 4 in the checkpoint"):
        Deployment.from_run(run)


def test_served_targets_hold_only_packed_bytes(dep):
    choice = dep.choose(bits=3.0)
    served = dep.at(config=list(choice))
    layers = [m for m in served.modules() if isinstance(m, PackedLoRALinear)]
    assert len(layers) == len(dep.model.targets) == 36
    held = sum(
        t.numel() * t.element_size() for layer in layers for name, t in layer.named_buffers()
    )
    expected = sum(
        quantize(w, dep.model.options[j]).nbytes
        for w, j in zip(dep.model.frozen_weights().values(), choice, strict=True)
    )
    assert abs(held - expected) <= 0.05 * expected and held == expected
    assert not any(
        name.endswith("weight") for layer in layers for name, _ in layer.named_parameters()
    )
    total = sum(t.numel() * t.element_size() for t in served.state_dict().values())
    assert total == dep.served_nbytes(choice)


def test_memory_limit_picks_the_best_fitting_configuration(dep):
    at_3 = dep.served_nbytes(dep.choose(bits=3.0)) / 1e6
    small, large = dep.choose(memory_mb=at_3), dep.choose(memory_mb=at_3 + 2)
    assert dep.served_nbytes(small) <= at_3 * 1e6 and dep.served_nbytes(large) <= (at_3 + 2) * 1e6
    assert dep.describe(large)["avg_bits"] > dep.describe(small)["avg_bits"]
    low, high = dep.memory_range_mb()
    with pytest.raises(
        ValueError, match=rf"memory_mb=1 is outside the achievable range \[{low:.3f}"
    ):
        dep.choose(memory_mb=1)


def test_configurations_by_id_file_or_indices(run_dir, dep, tmp_path):
    known = read_configurations(run_dir / "eval")
    cid, choice = next(iter(known.items()))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"choice": choice}))
    assert dep.choose(config=cid) == dep.choose(config=path) == dep.choose(config=choice)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"bits": 9.0}, r"budget=9.0 bits is outside the achievable range \[2.0322, 8.6250\]"),
        ({"bits": "3"}, r"bits='3' must be a finite number"),
        ({"bits": 3.0, "memory_mb": 40}, r"exactly one of .*got \['bits', 'memory_mb'\]"),
        ({}, "exactly one of bits=, memory_mb=, config=; got none"),
        ({"config": [0] * 35}, "a configuration needs 36 option indices, got 35"),
        ({"config": [0] * 35 + [288]}, r"option indices \[288\] are outside \[0, 288\)"),
        ({"config": [0.5] * 36}, "config must hold integer option indices"),
        ({"config": "nope"}, "config='nope' is neither a JSON file nor a configuration id"),
        ({"config": "missing.json"}, "configuration file missing.json does not exist"),
    ],
)
def test_bad_requests_are_refused(dep, kwargs, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        dep.choose(**kwargs)


def test_bad_run_folders_are_refused(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Deployment.from_run(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint checkpoints/last.ckpt"):
        Deployment.from_run(tmp_path)
    per_budget = tmp_path / "per-budget"
    (per_budget / "budget_3.0" / "checkpoints").mkdir(parents=True)
    (per_budget / "budget_3.0" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"serve one of \['budget_3.0'\]"):
        Deployment.from_run(per_budget)
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated, ignore=shutil.ignore_patterns("exports"))
    ckpt = truncated / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {ckpt}"):
        Deployment.from_run(truncated)


def test_exports_are_all_or_nothing_and_verified(dep, tmp_path, monkeypatch):
    out = dep.export(tmp_path / "e", bits=4.0)
    with pytest.raises(FileExistsError, match="already exists"):
        dep.export(out, bits=4.0)
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    data = bytearray((altered / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (altered / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="adapter_model.safetensors was altered"):
        load_export(altered)
    (altered / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_export(altered)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("coalora.serve.export_format.model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        dep.export(tmp_path / "half", bits=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["altered", "e"]


def test_export_cli_writes_one_folder_per_budget(run_dir):
    command = [sys.executable, "-m", "coalora.export", "--multirun", f"run_dir={run_dir}"]
    done = subprocess.run([*command, "bits=2.5,4"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for bits in ("2.5", "4"):
        summary = json.loads(
            (run_dir / "exports" / f"bits_{bits}" / "quantization.json").read_text()
        )
        assert summary["avg_bits"] <= float(bits) and summary["request"]["bits"] == float(bits)
    assert "exported" in done.stdout
    bad = subprocess.run(
        [*command[:3], f"run_dir={run_dir}", "bits=1.5"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "outside the achievable range [2.0322, 8.6250]" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1].startswith(
        "error: budget=1.5 bits is outside"
    )
    assert not (run_dir / "exports" / "bits_1.5").exists()


def test_quant_config_round_trips_through_the_export_metadata(dep, tmp_path):
    out = dep.export(tmp_path / "meta", bits=5.0)
    summary = json.loads((out / "quantization.json").read_text())
    choice = dep.choose(bits=5.0)
    assert summary["choice"] == list(choice) and summary["config_id"] == config_id(choice)
    for (name, spec), j in zip(summary["matrices"].items(), choice, strict=True):
        assert QuantConfig(**spec["config"]) == dep.model.options[j], name


def test_predict_scores_a_local_tsv_with_an_export(dep, shared_data_dir, tmp_path):
    from transformers import AutoTokenizer

    from coalora.predict import predict_file

    out = dep.export(tmp_path / "e", bits=4.0)
    lines = (shared_data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[:21]
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    result = predict_file(out, tsv, batch_size=8)
    header, *rows = [line.split("\t") for line in result["out"].read_text().splitlines()]
    assert header == ["sentence", "label", "prediction", "probability"] and len(rows) == 20
    model, tokenizer = load_export(out), AutoTokenizer.from_pretrained(out)
    sentences = [row[0] for row in rows]
    with torch.no_grad():
        logits = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
    names = ["negative", "positive"]
    assert [row[2] for row in rows] == [names[j] for j in logits.argmax(-1).tolist()]
    correct = [row[2] == names[int(row[1])] for row in rows]
    assert result["accuracy"] == pytest.approx(sum(correct) / len(correct))

    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 3: byte 0xff is not UTF-8 text"):
        predict_file(out, bad)
    (tmp_path / "header.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="header.tsv has no examples to score"):
        predict_file(out, tmp_path / "header.tsv")
    (tmp_path / "other.tsv").write_text("review\n great\n")
    with pytest.raises(ValueError, match=r"has no column 'sentence'; its columns are \['review'\]"):
        predict_file(out, tmp_path / "other.tsv")


def test_serving_imports_neither_lightning_nor_hydra():
    code = "import sys, coalora.serve; print(sorted({'lightning', 'hydra'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
