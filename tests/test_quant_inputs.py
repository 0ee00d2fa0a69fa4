"""Clear errors for bad quantization input, and a robust error-table cache."""

import logging
import multiprocessing
import os
import re
import time

import numpy as np
import pytest
import torch

from coalora.quant import ErrorTable, QuantConfig, cached_error_table, config_space, error_table

WEIGHTS = {"a": torch.linspace(-1, 1, 256).reshape(4, 64), "b": torch.ones(2, 64)}


@pytest.mark.parametrize("field", ["bits", "scale_bits", "block_size", "scale_block_size"])
@pytest.mark.parametrize("value", [64.0, True, np.int64(64)], ids=["float", "bool", "numpy"])
def test_config_requires_exact_ints(field, value):
    kwargs = QuantConfig(4, 8, "fp32", 64, 256).to_dict() | {field: value}
    with pytest.raises(
        TypeError,
        match=re.escape(f"QuantConfig.{field}={value!r} has type {type(value).__name__}; ")
        + r"it must be an int, one of \(",
    ):
        QuantConfig(**kwargs)


def test_error_table_names_an_empty_matrix():
    with pytest.raises(ValueError, match=r"without elements \(name: shape\): \{'w': \(0, 4\)\}"):
        error_table({"a": torch.ones(4, 64), "w": torch.empty(0, 4)}, config_space()[:2])


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other matrices"])
def test_damaged_cache_is_moved_aside_and_rebuilt(tmp_path, caplog, damage):
    fresh = error_table(WEIGHTS, config_space("int"), progress=False)
    cached_error_table(WEIGHTS, "int", tmp_path, "m", progress=False)
    (path,) = tmp_path.iterdir()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        ErrorTable(["a"], [256], fresh.options, fresh.errors[:1]).save(path)
    bad = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="coalora.quant.errors"):
        rebuilt = cached_error_table(WEIGHTS, "int", tmp_path, "m", progress=False)
    assert torch.equal(rebuilt.errors, fresh.errors) and rebuilt.names == fresh.names
    assert cache_files(tmp_path) == [path.name, path.name + ".corrupt"]
    assert (tmp_path / (path.name + ".corrupt")).read_bytes() == bad
    assert torch.equal(ErrorTable.load(path).errors, fresh.errors)
    (record,) = [r for r in caplog.records if r.name == "coalora.quant.errors"]
    assert str(path) in record.getMessage() and "weights_only" not in record.getMessage()


def test_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def fail(self, path):
        open(path, "wb").close()
        raise OSError("disk full")

    monkeypatch.setattr(ErrorTable, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        cached_error_table(WEIGHTS, "nf", tmp_path, "m", progress=False)
    assert cache_files(tmp_path) == []


def build_slowly(barrier, cache_dir, results):
    """Worker: build the cached table together with the others, with a slow write."""
    save = ErrorTable.save

    def slow_save(self, path):
        save(self, path)
        time.sleep(0.5)  # every builder writes its temporary file before any renames it

    ErrorTable.save = slow_save
    barrier.wait()
    table = cached_error_table(WEIGHTS, "nf", cache_dir, "m", progress=False)
    results.put((os.getpid(), table.errors.numpy()))


def test_concurrent_builders_all_succeed_and_agree(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "coalora.quant", "test_quant_inputs"])
    barrier, results = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=build_slowly, args=(barrier, tmp_path, results)) for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 4
    tables = [results.get(timeout=10)[1] for _ in workers]
    expected = error_table(WEIGHTS, config_space("nf"), progress=False).errors.numpy()
    assert all(np.array_equal(t, expected) for t in tables)
    (path,) = tmp_path.iterdir()  # one entry, no temporary files left
    assert np.array_equal(ErrorTable.load(path).errors.numpy(), expected)
