"""Serving, export and prediction refuse bad or hostile input before any work, never replace or
delete a user's file, and report a refusal as one line."""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from test_serve import CONF

from coalora.quant import QuantConfig
from coalora.quant.space import ConfigSpace
from coalora.quant.tensor import packed_nbytes
from coalora.serve import Deployment, load_dequantized_base, load_export, verify_export

LONG_TEXT = " ".join(["a wonderful and moving film"] * 40)
"""An input longer than the run's 64 tokens."""


@pytest.fixture(scope="module")
def dep(run_dir) -> Deployment:  # noqa: F811
    return Deployment.from_run(run_dir)


@pytest.fixture(scope="module")
def export_dir(dep, tmp_path_factory) -> Path:
    return dep.export(tmp_path_factory.mktemp("safety") / "sst2-3bit", bits=3.0)


def copy_run(run_dir: Path, dest: Path) -> Path:  # noqa: F811
    """The run's serving files, to edit without touching the shared run."""
    keep = shutil.ignore_patterns("exports", "epoch_*.ckpt", "csv", "config_set")
    return Path(shutil.copytree(run_dir, dest, ignore=keep))


def edit_run_config(run: Path, key: str, value) -> None:
    path = run / "run_config.json"
    saved = json.loads(path.read_text())
    *parents, last = key.split(".")
    node = saved["config"]
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(json.dumps(saved))


def rewrite_manifest(folder: Path) -> None:
    """Record the current size and sha256 of every file, as a careful editor would."""
    manifest = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_description(folder: Path, change) -> None:
    path = folder / "quantization.json"
    summary = json.loads(path.read_text())
    change(summary)
    path.write_text(json.dumps(summary))
    rewrite_manifest(folder)


def forbid(monkeypatch, target: str) -> None:
    """Fail the test if ``target`` (a model loader) is called: checks must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError(f"{target} was called before the input was checked")

    monkeypatch.setattr(target, loaded)


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


# -- 1. predict never replaces a file it did not write -------------------------------------


def test_predict_never_replaces_a_users_file(export_dir, tmp_path, monkeypatch):
    from coalora.predict import predict_file

    tsv = write_tsv(tmp_path / "dev.tsv", [("a fine film", "1"), ("dull", "0")])
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis notes\n")
    default = tmp_path / "dev.predictions.tsv"
    default.write_text("my own table\n")
    forbid(monkeypatch, "coalora.predict.load_export")
    with pytest.raises(FileExistsError, match="dev.predictions.tsv already exists"):
        predict_file(export_dir, tsv)
    with pytest.raises(FileExistsError, match="notes.txt already exists"):
        predict_file(export_dir, tsv, out=notes)
    not_ours = r"replaces only a predictions file .*/notes.txt is not one"
    with pytest.raises(FileExistsError, match=not_ours):
        predict_file(export_dir, tsv, out=notes, overwrite=True)
    with pytest.raises(ValueError, match="is the input file; predictions are never written"):
        predict_file(export_dir, tsv, out=tsv, overwrite=True)
    with pytest.raises(ValueError, match="is inside the export folder"):
        predict_file(export_dir, tsv, out=export_dir / "p.tsv")
    assert notes.read_text() == "my thesis notes\n" and default.read_text() == "my own table\n"
    assert tsv.read_text().startswith("sentence\tlabel\na fine film\t1\n")
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(
        [*json.loads((export_dir / "manifest.json").read_text()), "manifest.json"]
    )

    monkeypatch.undo()
    out = tmp_path / "scores.tsv"
    first = predict_file(export_dir, tsv, out=out)["out"].read_text()
    with pytest.raises(FileExistsError, match="scores.tsv already exists"):
        predict_file(export_dir, tsv, out=out)
    assert predict_file(export_dir, tsv, out=out, overwrite=True)["out"].read_text() == first


# -- 2. export overwrite replaces only an earlier export -----------------------------------


def test_export_overwrite_replaces_only_an_earlier_export(dep, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "thesis.txt").write_text("chapter 1")
    (thesis / "sub" / "data.csv").write_text("1,2\n")
    with pytest.raises(
        FileExistsError, match=r"replaces only an earlier coalora export.*\['sub'\]"
    ):
        dep.export(thesis, bits=4.0, overwrite=True)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my app", "icons": []}')
    with pytest.raises(FileExistsError, match="manifest.json that is not an export's"):
        dep.export(webapp, bits=4.0, overwrite=True)
    assert (thesis / "thesis.txt").read_text() == "chapter 1"
    assert (thesis / "sub" / "data.csv").read_text() == "1,2\n"
    assert (webapp / "manifest.json").read_text() == '{"name": "my app", "icons": []}'

    out = dep.export(tmp_path / "e", bits=4.0)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of the export \(\['notes.txt'\]\)"):
        dep.export(out, bits=3.0, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    dep.export(out, bits=3.0, overwrite=True)
    assert json.loads((out / "quantization.json").read_text())["request"]["bits"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "thesis", "webapp"]


# -- 3. a consistent but wrong export is refused --------------------------------------------


def other_bits(spec: dict) -> int:
    return 4 if spec["config"]["bits"] != 4 else 3


def change_bits(summary: dict, careful: bool) -> None:
    """One matrix's bits changed (3 → 4 where one has 3 bits); a careful editor also updates
    its bits per weight and bytes and the model-wide sums."""
    matrices = summary["matrices"]
    name = next((n for n, m in matrices.items() if m["config"]["bits"] == 3), next(iter(matrices)))
    spec = matrices[name]
    spec["config"]["bits"] = other_bits(spec)
    if careful:
        config = QuantConfig(**spec["config"])
        spec["bits_per_param"] = config.bits_per_param
        spec["nbytes"] = packed_nbytes(spec["shape"][0] * spec["shape"][1], config)
        numels = [m["shape"][0] * m["shape"][1] for m in matrices.values()]
        configs = [QuantConfig(**m["config"]) for m in matrices.values()]
        summary["avg_bits"] = ConfigSpace(configs, numels).mean_bits(
            [m["bits_per_param"] for m in matrices.values()]
        )
        summary["packed_bytes"] = sum(m["nbytes"] for m in matrices.values())


def double_codes(folder: Path) -> None:
    tensors = load_file(folder / "quantized_model.safetensors")
    name = next(k for k in tensors if k.endswith(".codes"))
    tensors[name] = torch.cat([tensors[name], tensors[name]])
    save_file(tensors, folder / "quantized_model.safetensors", metadata={"format": "pt"})
    rewrite_manifest(folder)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            lambda f: edit_description(f, lambda s: change_bits(s, careful=False)),
            r"quantization.json: .*bits_per_param .* is not that of its configuration",
        ),
        (
            lambda f: edit_description(f, lambda s: change_bits(s, careful=True)),
            r"\.codes in quantized_model.safetensors is \(\d+,\) uint8, but its configuration "
            r"nf\d-.* for a \d+×\d+ matrix in quantization.json needs \(\d+,\) uint8",
        ),
        (double_codes, r"\.codes in quantized_model.safetensors is \(\d+,\) uint8, but"),
        (
            lambda f: edit_description(f, lambda s: s.update(avg_bits=s["avg_bits"] + 0.5)),
            r"avg_bits .* is not that of its matrices",
        ),
    ],
    ids=["bits", "bits-bytes-and-sums", "doubled-codes", "avg-bits"],
)
def test_a_consistent_but_wrong_export_is_refused(export_dir, tmp_path, edit, error):
    folder = Path(shutil.copytree(export_dir, tmp_path / "edited"))
    edit(folder)
    with pytest.raises(ValueError, match=error):
        load_export(folder)
    with pytest.raises(ValueError, match=error):
        load_dequantized_base(folder)


# -- 4. an edited run_config.json is refused ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("method.alpha", 64, "method.alpha is 64 there, 16 in the checkpoint"),
        ("model.name", "bert-base", "model.name is 'bert-base' there, 'all-MiniLM-L6-v2' in"),
        ("method.rank", 8, "method.rank is 8 there, 16 in the checkpoint"),
    ],
)
def test_an_edited_run_config_is_refused_before_loading(
    run_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    key,
    value,
    error,
):
    run = copy_run(run_dir, tmp_path / "run")
    edit_run_config(run, key, value)
    forbid(monkeypatch, "coalora.serve.deployment.load_backbone")
    with pytest.raises(
        ValueError, match=rf"run_config.json does not match the run's checkpoint .*{error}"
    ):
        Deployment.from_run(run)


# -- 5. nothing outside the export folder is followed ---------------------------------------


def test_an_export_never_reaches_outside_its_folder(export_dir, tmp_path):
    outside = tmp_path / "file"
    outside.write_text("not part of the export")
    escaping = Path(shutil.copytree(export_dir, tmp_path / "exports" / "escaping"))
    manifest = json.loads((escaping / "manifest.json").read_text())
    manifest["../../file"] = {
        "bytes": outside.stat().st_size,
        "sha256": hashlib.sha256(outside.read_bytes()).hexdigest(),
    }
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"lists \['../../file'\], which are not files of"):
        verify_export(escaping)

    linked = Path(shutil.copytree(export_dir, tmp_path / "linked"))
    elsewhere = tmp_path / "tokenizer.json"
    (linked / "tokenizer.json").rename(elsewhere)
    (linked / "tokenizer.json").symlink_to(elsewhere)  # the same bytes: the manifest agrees
    with pytest.raises(ValueError, match="tokenizer.json is a symbolic link"):
        load_export(linked)

    planted = Path(shutil.copytree(export_dir, tmp_path / "planted"))
    (planted / "added_tokens.json").write_text('{"great": 0}')
    with pytest.raises(ValueError, match="added_tokens.json is not listed in manifest.json"):
        verify_export(planted)


# -- 6. max_length beyond the model's positions fails before any work -----------------------


def test_max_length_beyond_the_model_positions_is_refused_before_training():
    from coalora.preflight import check_data_length

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data.max_length=100000"])
    with pytest.raises(
        ValueError,
        match=r"^data.max_length=100000 is longer than the 512 token positions of "
        r"all-MiniLM-L6-v2: use at most 512$",
    ):
        check_data_length(cfg)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        check_data_length(compose("train", overrides=["data.max_length=512"]))


def test_max_length_beyond_the_model_positions_is_refused_by_export_and_predict(
    run_dir,  # noqa: F811
    export_dir,
    tmp_path,
    monkeypatch,
):
    from coalora.predict import predict_file

    run = copy_run(run_dir, tmp_path / "run")  # as trained with data.max_length=100000
    edit_run_config(run, "data.max_length", 100000)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["datamodule_hyper_parameters"]["max_length"] = 100000
    torch.save(state, ckpt)
    forbid(monkeypatch, "coalora.serve.deployment.load_backbone")
    with pytest.raises(ValueError, match=r"data.max_length=100000 is longer than the 512 token"):
        Deployment.from_run(run)

    folder = Path(shutil.copytree(export_dir, tmp_path / "long"))
    edit_description(folder, lambda s: s.update(max_length=100000))
    tsv = write_tsv(tmp_path / "long.tsv", [(LONG_TEXT * 10, "1")])
    forbid(monkeypatch, "coalora.predict.load_export")
    with pytest.raises(ValueError, match=r"max_length=100000 is longer than the 512 token .*own"):
        predict_file(folder, tsv)
    with pytest.raises(ValueError, match=r"^max_length=600 is longer than the 512 token"):
        predict_file(export_dir, tsv, max_length=600)
    assert not (tmp_path / "long.predictions.tsv").exists()


# -- 7. predict writes its input back unchanged and counts truncated inputs -----------------


def test_predict_writes_the_input_back_unchanged_and_counts_truncations(export_dir, tmp_path):
    from coalora.predict import predict_file

    texts = ['he said "great" \\ wow', LONG_TEXT, "'quoted' \\t and \\n literally"]
    tsv = write_tsv(tmp_path / "odd.tsv", [(t, "1") for t in texts])
    result = predict_file(export_dir, tsv)
    header, *rows = result["out"].read_text().split("\n")[:-1]
    assert header == "sentence\tlabel\tprediction\tprobability"
    assert [row.split("\t")[:2] for row in rows] == [[t, "1"] for t in texts]
    from coalora.predict import summary_line

    assert (result["truncated"], result["max_length"]) == (1, 64)
    assert "(1 of 3 inputs were longer than 64 tokens and were truncated to them)" in summary_line(
        result
    )

    txt = tmp_path / "lines.txt"
    txt.write_text("\n".join(texts) + "\n")
    lines = predict_file(export_dir, txt)["out"].read_text().split("\n")[1:-1]
    assert [line.rsplit("\t", 2)[0] for line in lines] == texts
    (tmp_path / "tab.txt").write_text("a\ttab\n")
    with pytest.raises(ValueError, match=r"tab.txt, line 1: a tab or carriage return"):
        predict_file(export_dir, tmp_path / "tab.txt")


# -- 8. one-line errors, checked before loading; Ctrl+C; killed exports; clear messages ----


def run_cli(module, overrides: list[str], capsys) -> tuple[int, list[str]]:
    """Run a Hydra entry point in this process; its exit status and stderr lines."""
    import importlib

    cli = importlib.import_module(f"coalora.{module}")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(module, overrides=overrides)
    try:
        cli.main(cfg)
    except SystemExit as done:
        return done.code, capsys.readouterr().err.splitlines()
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl+C escaped coalora.{module} as a KeyboardInterrupt")
    pytest.fail(f"coalora.{module} did not exit")


def test_cli_errors_are_one_line_before_any_model_is_loaded(
    run_dir,  # noqa: F811
    export_dir,
    tmp_path,
    monkeypatch,
    capsys,
):
    forbid(monkeypatch, "coalora.export.Deployment.from_run")
    forbid(monkeypatch, "coalora.predict.load_export")
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("chapter 1")
    export = ["export", [f"run_dir={run_dir}"]]
    cases = [
        (
            *export,
            ["bits=3", "memory_mb=40"],
            "error: give exactly one of bits=, memory_mb=, config=; got ['bits', 'memory_mb']",
        ),
        (*export, ["bits=nan"], "error: bits=nan must be a finite number"),
        (*export, ["bits=3", "overwrite=maybe"], "error: overwrite='maybe' must be true or false"),
        (
            *export,
            ["bits=3", f"out={thesis}", "overwrite=true"],
            f"error: overwrite=true replaces only an earlier coalora export, but {thesis} has "
            "no manifest.json (it holds ['thesis.txt']); nothing was changed: choose another "
            "folder",
        ),
        (
            "predict",
            [f"export={export_dir}", f"input={tmp_path / 'empty.tsv'}"],
            [],
            f"error: {tmp_path / 'empty.tsv'} is empty: it needs a header row naming its "
            "columns and one row per example",
        ),
        ("predict", [f"export={export_dir}"], [], "error: Missing mandatory value: input"),
        (
            "predict",
            [f"export={export_dir}", f"input={tmp_path / 'empty.tsv'}", "batch_size=0"],
            [],
            "error: batch_size=0 must be a positive integer",
        ),
    ]
    (tmp_path / "empty.tsv").write_text("")
    for module, base, extra, message in cases:
        assert run_cli(module, [*base, *extra], capsys) == (1, [message])
    assert (thesis / "thesis.txt").read_text() == "chapter 1"


def test_ctrl_c_is_one_line_with_status_130(run_dir, export_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("coalora.export.Deployment.from_run", interrupted)
    assert run_cli("export", [f"run_dir={run_dir}", "bits=3"], capsys) == (
        130,
        ["interrupted: the export stopped; nothing was written"],
    )
    # a real SIGINT while predict loads the model, in its own process
    tsv = write_tsv(tmp_path / "dev.tsv", [("a fine film", "1")])
    code = (
        "import runpy, signal, sys; import coalora.serve.export_load as e; "
        # Python keeps SIGINT ignored if its parent ignored it; Ctrl+C reaches a shell's child.
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "e.load_export = lambda folder: signal.raise_signal(signal.SIGINT); "
        "sys.argv = ['predict', *sys.argv[1:]]; "
        "runpy.run_module('coalora.predict', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, f"export={export_dir}", f"input={tsv}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert not (tmp_path / "dev.predictions.tsv").exists()


def test_a_killed_export_leaves_nothing_the_next_export_keeps(run_dir, dep, tmp_path):  # noqa: F811
    code = (
        "import os, signal, sys; import coalora.serve.export_format as e; "
        "from coalora.serve import Deployment; "
        "e.model_card = lambda summary: os.kill(os.getpid(), signal.SIGKILL); "
        "Deployment.from_run(sys.argv[1]).export(sys.argv[2], bits=4.0)"
    )
    parent = tmp_path / "exports"
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), str(parent / "killed")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (left,) = [p for p in parent.iterdir()]
    assert left.name.startswith(".killed.") and left.name.endswith(".tmp")
    assert sum(p.stat().st_size for p in left.iterdir()) > 1_000_000
    running = parent / ".running.abc.tmp"  # an export still being written is kept
    running.mkdir()
    marker = {"pid": os.getpid(), "host": socket.gethostname()}
    (running / ".coalora-partial-export").write_text(json.dumps(marker))

    dep.export(parent / "next", bits=4.0)
    assert sorted(p.name for p in parent.iterdir()) == [".running.abc.tmp", "next"]
    assert (dep.export(parent / "killed", bits=4.0) / "manifest.json").is_file()


def test_unclear_inputs_get_messages_that_name_them(
    run_dir,  # noqa: F811
    dep,
    tmp_path,
    monkeypatch,
):
    from coalora.preflight import check_settings

    empty, binary = tmp_path / "empty.json", tmp_path / "binary.json"
    empty.write_text("")
    binary.write_bytes(b"[1, \xff]")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(empty))} is empty: it holds no JSON"):
        dep.choose(config=empty)
    with pytest.raises(ValueError, match=r"binary.json, line 1: byte 0xff is not UTF-8 text"):
        dep.choose(config=str(binary))

    forbid(monkeypatch, "coalora.serve.deployment.load_backbone")
    unsafe = copy_run(run_dir, tmp_path / "unsafe")
    torch.save({"names": argparse.Namespace()}, unsafe / "error_table.pt")
    with pytest.raises(ValueError) as refused:
        Deployment.from_run(unsafe)
    assert str(refused.value).startswith(
        f"cannot read the error table {unsafe / 'error_table.pt'}: refused: it holds the Python "
        "object argparse.Namespace"
    )
    assert "weights_only" not in str(refused.value)

    hub = copy_run(run_dir, tmp_path / "hub")
    edit_run_config(hub, "model.name_or_path", "someone/other-model")
    with pytest.raises(
        ValueError,
        match=r"model.name_or_path='someone/other-model' is neither a local model folder nor a "
        r"model in the hub cache \(the hub is offline: HF_HUB_OFFLINE=1\)",
    ):
        Deployment.from_run(hub)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["seed=-1"])
    with pytest.raises(ValueError, match=r"^seed=-1 must be an integer from 0 to 4294967295$"):
        check_settings(cfg, instantiate(cfg.method.plan), instantiate(cfg.method.init))
