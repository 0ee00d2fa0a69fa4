"""Robustness: bad input is refused early with a message that names it, checkpoints load
safely, run folders are unique, an interrupted or killed run resumes, results are repeatable."""

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from coalora.checkpoint_io import AtomicCheckpointIO
from coalora.checkpoints import read_checkpoint
from coalora.data import build_task
from coalora.evaluation import read_results
from coalora.quant import config_space, quantize
from coalora.run import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RUN_FOLDER_NAME = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}_(\d+)"


def compose_config(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def run(overrides: list[str], out: Path) -> dict:
    return train(compose_config([*overrides, f"paths.output_dir={out}"]))


@pytest.fixture(scope="module")
def glue_dir(shared_data_dir) -> Path:
    glue = shared_data_dir / "glue"
    if not glue.exists():
        pytest.skip("the shared GLUE data is not available")
    return glue


@pytest.fixture(scope="module")
def glue_overrides(glue_dir) -> list[str]:
    return ["task=sst2", f"task.data_dir={glue_dir}", "debug=fast"]


# ---------------------------------------------------------------------------------------------
# Run folders


def test_run_folders_are_named_by_microsecond_and_process_id():
    cfg = compose_config(["task=sst2"], hydra=True)
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    prefix = f"outputs/sst2-{cfg.model.name}-nf-coalora/"
    assert run_dir.startswith(prefix)
    for name in (run_dir.removeprefix(prefix), sweep_dir.removeprefix("multirun/")):
        match = re.fullmatch(RUN_FOLDER_NAME, name)
        assert match and int(match.group(1)) == os.getpid(), name


@pytest.mark.slow
def test_two_processes_started_together_get_their_own_run_folders():
    command = [sys.executable, "-m", "coalora.run", "--cfg", "all", "-p", "hydra.run.dir"]
    procs = [
        subprocess.Popen([*command, "--resolve"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    folders = [proc.communicate(timeout=300)[0].strip().splitlines()[-1] for proc in procs]
    assert folders[0] != folders[1]
    for proc, folder in zip(procs, folders, strict=True):
        assert proc.returncode == 0
        assert re.fullmatch(RUN_FOLDER_NAME, Path(folder).name).group(1) == str(proc.pid)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class RunsCodeOnLoad:
    """Unpickling this object runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def write_bad_checkpoint(kind: str, folder: Path) -> Path:
    """A file passed as ``ckpt_path`` that must be refused."""
    path = folder / f"{kind}.ckpt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}, "coalora": {}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}, "coalora": {}}))
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, path)
    elif kind == "list":
        torch.save([torch.ones(1)], path)
    elif kind == "code":
        torch.save({"state_dict": {}, "coalora": RunsCodeOnLoad(folder / "ran")}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("missing", FileNotFoundError, r"missing.ckpt: no such file \(resume from a run's "),
        ("folder", ValueError, r"folder.ckpt is a folder; give its checkpoints/last.ckpt"),
        ("empty", ValueError, r"empty.ckpt: the file is empty, not a checkpoint"),
        (
            "truncated",
            ValueError,
            r"truncated.ckpt: not a readable checkpoint, truncated or not written by torch.save "
            r"\(PytorchStreamReader failed reading zip archive",
        ),
        ("pickle", ValueError, r"pickle.ckpt: refused: it holds pickled Python objects, not "),
        (
            "foreign",
            ValueError,
            r"foreign.ckpt: not a coalora checkpoint \(it lacks \['coalora'\]\)",
        ),
        ("list", ValueError, r"list.ckpt: not a coalora checkpoint \(it lacks \['state_dict', "),
        (
            "code",
            ValueError,
            r"code.ckpt: refused: it holds the Python object exec, not only tensors and plain "
            r"values; loading it could run code",
        ),
    ],
)
def test_bad_checkpoints_are_refused_before_any_work(tmp_path, kind, error, message):
    path = write_bad_checkpoint(kind, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(error, match=f"^ckpt_path={re.escape(str(tmp_path))}/{message}"):
        run([f"ckpt_path={path}"], out)
    assert not out.exists()
    assert not (tmp_path / "ran").exists()


def test_the_code_checkpoint_would_run_code_if_unpickled(tmp_path):
    path = write_bad_checkpoint("code", tmp_path)
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(path)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)  # what a careless loader would do
    assert (tmp_path / "ran").exists()


def test_lightning_checkpoints_are_renamed_into_place_and_load_weights_only(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    unsafe = write_bad_checkpoint("code", tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"w": torch.ones(2)}}, path)

    def interrupted_save(checkpoint, file):
        Path(file).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 1, "state_dict": {}}, path)
    assert io.load_checkpoint(path)["epoch"] == 0
    assert os.listdir(path.parent) == ["last.ckpt"]
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL exec"):
        io.load_checkpoint(unsafe)
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_of_other_settings_is_refused_before_any_work(tmp_path):
    identity = {
        "model": "all-MiniLM-L6-v2",
        "task": "sentiment",
        "quant": "nf",
        "rank": 16,
        "alpha": 16,
    }
    path = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "coalora": {"identity": {**identity, "method": "shared"}}}, path)
    with pytest.raises(
        ValueError,
        match=rf"^ckpt_path={re.escape(str(path))}: cannot resume: the checkpoint was trained "
        r"with other settings \(method: checkpoint 'shared', this run 'coalora'\)",
    ):
        run([f"ckpt_path={path}"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Bad settings and data: Hydra's composition errors, and coalora's before training


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("task=sst3", MissingConfigException, r"In 'train': Could not find 'task/sst3'"),
        ("tsk=sst2", ConfigCompositionException, r"Could not override 'tsk'"),
        ("trainer.max_epoch=3", ConfigCompositionException, r"override 'trainer.max_epoch'"),
        ("method.optimizr.lr=1", ConfigCompositionException, r"override 'method.optimizr.lr'"),
    ],
)
def test_unknown_groups_and_keys_fail_to_compose(override, error, message):
    with pytest.raises(error, match=message):
        compose_config([override])


def glue_folder(
    root: Path, glue_dir: Path | None, train: bytes | None = None, dev: bytes | None = None
) -> Path:
    """A GLUE folder whose SST-2 files are those of ``glue_dir`` unless given (``glue_dir``
    may be None when both are)."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, text in (("train.tsv", train), ("dev.tsv", dev)):
        text = text if text is not None else (glue_dir / "SST-2" / name).read_bytes()
        (folder / name).write_bytes(text)
    return folder.parent


HEADER = b"sentence\tlabel\n"
ROWS = b"".join(b"a fine film %d\t1\n" % i for i in range(5))


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("seed=abc", ValueError, r"^seed='abc' must be an integer from 0 to 4294967295$"),
        (
            "eval.budgets=[three]",
            ValueError,
            r"^eval.budgets=\['three'\] holds \['three'\], which are not numbers; give a list "
            r"of bit-widths within the achievable range \[2.0322, 8.6250\]$",
        ),
        ("eval.budgets='3.0'", ValueError, r"^eval.budgets='3.0' is not a list; give a list of"),
        ("method.rank=0", ValueError, r"^rank=0 must be an integer in \[1, 384\]: a LoRA rank"),
        ("data.batch_size=0", ValueError, r"^batch_size must be a positive integer, got 0$"),
        (
            "data.max_train_samples=0",
            ValueError,
            r"^Cannot take 0 samples from a split of 67317 examples \(max_train_samples must "
            r"be 1 to 67317, or null for all\)$",
        ),
        (
            "method.optimizer.lr=-1",
            ValueError,
            r"^method.optimizer \(torch.optim.AdamW\): Invalid learning rate: -1$",
        ),
        (
            "+trainer.max_epoch=3",
            ValueError,
            r"^trainer.max_epoch is not a setting of lightning.Trainer \(did you mean "
            r"trainer.max_epochs\?\)$",
        ),
    ],
)
def test_bad_settings_are_refused_before_training(
    glue_overrides, tmp_path, override, error, message
):
    with pytest.raises(error, match=message):
        run([*glue_overrides, override], tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run_config.json").exists()


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({"train": b""}, ValueError, r"SST-2/train.tsv: the file is empty$"),
        ({"train": HEADER}, ValueError, r"SST-2/train.tsv: no examples \(the file holds only "),
        ({"dev": HEADER}, ValueError, r"SST-2/dev.tsv: no examples \(the file holds only its "),
        (
            {"train": HEADER + ROWS + b"a row without a label\n"},
            ValueError,
            r"SST-2/train.tsv, line 7: expected 2 tab-separated fields, found 1$",
        ),
        (
            {"train": HEADER + ROWS + b"a fine film\tpositive\n"},
            ValueError,
            r"SST-2/train.tsv, line 7: label 'positive' not in accepted labels \('0', '1'\)$",
        ),
        (
            {"dev": HEADER + ROWS + "caf\xe9 au lait\t1\n".encode("latin-1")},
            ValueError,
            r"SST-2/dev.tsv, line 7: byte 0xe9 is not UTF-8 text \(save the file as UTF-8\)$",
        ),
    ],
    ids=["empty", "header only", "dev header only", "malformed row", "unknown label", "latin-1"],
)
def test_bad_data_files_are_named_before_training(tmp_path, glue_dir, files, error, message):
    glue = glue_folder(tmp_path, glue_dir, files.get("train"), files.get("dev"))
    with pytest.raises(error, match=f"^{re.escape(str(glue))}/{message}"):
        run(["task=sst2", f"task.data_dir={glue}", "debug=fast"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_data_folder_is_named(tmp_path):
    folder = re.escape(str(tmp_path / "SST-2"))
    with pytest.raises(FileNotFoundError, match=f"^GLUE task folder not found: {folder}$"):
        run(["task=sst2", f"task.data_dir={tmp_path}", "debug=fast"], tmp_path / "run")


def test_a_ten_thousand_word_sentence_is_truncated_to_max_length(tmp_path):
    long_row = b" ".join([b"wonderful"] * 10_000) + b"\t1\n"
    glue = glue_folder(tmp_path, None, HEADER + ROWS * 4 + long_row, HEADER + ROWS)
    cfg = compose_config(["task=sst2", f"task.data_dir={glue}", "debug=fast"])
    cfg.data.max_train_samples = cfg.data.max_eval_samples = None
    cfg.data.val_size = 2
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True))
    datamodule = instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup()
    lengths = [len(ids) for s in ("train", "val") for ids in datamodule.split(s)["input_ids"]]
    assert max(lengths) == cfg.data.max_length == 64 and len(lengths) == 21
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 64


# ---------------------------------------------------------------------------------------------
# Quantizer misuse

NF4 = next(o for o in config_space("nf") if o.bits == 4)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        (torch.empty(0, 4), ValueError, r"quantize needs a non-empty tensor, got shape \(0, 4\)"),
        (
            torch.ones(64, 64).index_fill_(1, torch.tensor([3]), float("nan")),
            ValueError,
            r"quantize got NaN or infinite weights \(64 NaN and 0 infinite of 4096\)",
        ),
        (
            torch.ones(64, 64).index_fill_(0, torch.tensor([0]), -float("inf")),
            ValueError,
            r"quantize got NaN or infinite weights \(0 NaN and 64 infinite of 4096\)",
        ),
        (
            torch.ones(4, 64, dtype=torch.int64),
            ValueError,
            r"quantize needs a floating-point tensor, got dtype torch.int64",
        ),
        ([[1.0, 2.0]], TypeError, r"quantize needs a torch.Tensor, got list"),
    ],
    ids=["empty", "nan", "inf", "int64", "list"],
)
def test_quantizer_misuse_is_refused(weights, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        quantize(weights, NF4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_quantized_in_fp32_and_restored_to_its_dtype(dtype):
    w = torch.randn(96, 128).to(dtype)
    restored = quantize(w, NF4).dequantize()
    assert restored.dtype == dtype and restored.shape == w.shape
    assert torch.equal(restored, quantize(w.float(), NF4).dequantize().to(dtype))
    assert (restored.float() - w.float()).abs().max() < 0.5 * w.float().abs().max()


def test_any_layout_and_rank_quantize_as_their_contiguous_flattened_values():
    w = torch.randn(96, 128)
    reference = quantize(w.t().contiguous(), NF4).dequantize()
    assert torch.equal(quantize(w.t(), NF4).dequantize(), reference)
    cube = quantize(w.reshape(4, 24, 128), NF4).dequantize()
    assert cube.shape == (4, 24, 128)
    assert torch.equal(cube.reshape(96, 128), quantize(w, NF4).dequantize())


# ---------------------------------------------------------------------------------------------
# Determinism


def test_the_same_command_gives_identical_results(glue_overrides, tmp_path):
    for name in ("a", "b"):
        run([*glue_overrides, "trainer.max_epochs=1"], tmp_path / name)
    a, b = ((tmp_path / n / "eval" / "results.csv").read_bytes() for n in ("a", "b"))
    assert a == b and len(a.splitlines()) == 13


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors, Ctrl+C and SIGKILL


def start(overrides: list[str], run_dir: Path) -> subprocess.Popen:
    """``python -m coalora.run`` in the background, its output in ``<run_dir>.out/.err``."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.out", "w") as out, open(f"{run_dir}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "coalora.run", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            stdout=out,
            stderr=err,
        )


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    return proc.wait(timeout=timeout)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.2)


def stderr_of(run_dir: Path) -> str:
    return Path(f"{run_dir}.err").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task=sst3", "In 'train': Could not find 'task/sst3'"),
        ("seed=abc", "error: seed='abc' must be an integer"),
        ("ckpt_path=nowhere.ckpt", "error: ckpt_path=nowhere.ckpt: no such file (resume from"),
    ],
)
def test_the_command_line_reports_bad_input_without_a_traceback(tmp_path, override, message):
    run_dir = tmp_path / "run"
    assert finish(start([override], run_dir), timeout=300) == 1
    err = stderr_of(run_dir)
    assert message in err and "Traceback" not in err + Path(f"{run_dir}.out").read_text()
    if message.startswith("error: "):  # coalora's own checks: the run's log says it too
        assert message in (run_dir / "run.log").read_text()


def checkpoints_load_safely(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run folder, each loaded with ``weights_only=True``."""
    paths = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    for path in paths:
        ckpt = torch.load(path, weights_only=True)
        assert {"state_dict", "coalora", "callbacks"} <= ckpt.keys()
        assert ckpt["callbacks"]["ParetoSearchCallback"]["configs"]
    return paths


def assert_resumes_to_results(glue_overrides, ckpt: Path, run_dir: Path) -> None:
    proc = start([*glue_overrides, "trainer.max_epochs=3", f"ckpt_path={ckpt}"], run_dir)
    assert finish(proc) == 0, stderr_of(run_dir)[-2000:]
    assert len(read_results(run_dir / "eval" / "results.csv")) == 12
    assert (run_dir / "summary.json").exists()
    log = (run_dir / "run.log").read_text()
    assert "epoch 0: rank" not in log and "epoch 1: rank" in log  # epoch 0 was not redone
    checkpoints_load_safely(run_dir)


def assert_no_evaluation(run_dir: Path) -> None:
    assert not (run_dir / "eval").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_with_a_resumable_checkpoint(glue_overrides, tmp_path):
    first = tmp_path / "first"
    proc = start([*glue_overrides, "trainer.max_epochs=3"], first)
    wait_for(first / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, timeout=300) == 130
    last_line = stderr_of(first).strip().splitlines()[-1]
    match = re.fullmatch(
        r"interrupted: training stopped in epoch (\d) \(counting from 0\); the checkpoint of "
        r"its first (\d) finished epoch\(s\) is kept: resume with the same settings and "
        r"ckpt_path=(\S+)",
        last_line,
    )
    assert match, last_line
    ckpt = Path(match.group(3))
    assert ckpt == (first / "checkpoints" / "last.ckpt").resolve()
    assert torch.load(ckpt, weights_only=True)["epoch"] + 1 == int(match.group(2)) >= 1
    assert last_line in (first / "run.log").read_text()
    assert_no_evaluation(first)
    assert not [p for p in first.rglob(".*") if p.name.endswith(".tmp")]  # atomic writes
    assert ckpt in [p.resolve() for p in checkpoints_load_safely(first)]
    assert_resumes_to_results(glue_overrides, ckpt, tmp_path / "resumed")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_with_results(glue_overrides, tmp_path):
    first = tmp_path / "first"
    proc = start([*glue_overrides, "trainer.max_epochs=3"], first)
    wait_for(first / "checkpoints" / "last.ckpt", proc)
    proc.kill()
    assert finish(proc) == -signal.SIGKILL
    assert_no_evaluation(first)
    checkpoints_load_safely(first)
    assert_resumes_to_results(glue_overrides, first / "checkpoints" / "last.ckpt", tmp_path / "b")
