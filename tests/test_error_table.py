"""Error tables: exact errors against brute force, the sampled estimate, devices and chunking."""

import math

import pytest
import torch

import coalora.quant.errors as errors_module
import coalora.quant.tensor as tensor_module
from coalora.quant import QuantConfig, cached_error_table, config_space, error_table, quantize
from coalora.quant.error_sampling import (
    MIN_SAMPLED_CHUNKS,
    SAMPLE_CHUNK_WEIGHTS,
    chunk_energy,
    sample_chunks,
)
from coalora.quant.errors import matrix_errors

OPTIONS = config_space("nf")[::11] + config_space("int")[4::37]


def brute_force(w, options, fisher=None):
    """``Σ (w − Q(w))² · fisher`` of every option, by quantize and dequantize."""
    out = []
    for option in options:
        diff = (w.float() - quantize(w, option).dequantize().float()).double().square()
        out.append((diff if fisher is None else diff * fisher.double()).sum().item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(37, 101), (96, 128), (5, 7)], ids=str)
def test_exact_errors_equal_brute_force_with_padding_and_fisher(shape):
    w = torch.randn(shape) * 0.02
    w.view(-1)[:64] = 0.0  # all-zero blocks: offset 0 and scales that dequantize to 0
    fisher = torch.rand(shape)
    for weights in (None, fisher):
        got = matrix_errors(w, OPTIONS, weights)
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        torch.testing.assert_close(got, brute_force(w, OPTIONS, weights), rtol=1e-5, atol=1e-12)


def test_bf16_weights_on_the_cpu():
    """Errors of the fp32 reconstruction (before ``dequantize`` rounds it to bf16)."""
    w = (torch.randn(64, 80) * 0.02).bfloat16()
    torch.testing.assert_close(
        matrix_errors(w, OPTIONS), brute_force(w.float(), OPTIONS), rtol=1e-5, atol=0
    )


def test_chunked_and_one_pass_errors_agree(monkeypatch):
    w = torch.randn(300, 256) * 0.02
    fisher = torch.rand_like(w)
    one_pass = matrix_errors(w, OPTIONS, fisher)
    monkeypatch.setattr(errors_module, "CHUNK_WEIGHTS", 1000)  # not a multiple of the blocks
    torch.testing.assert_close(matrix_errors(w, OPTIONS, fisher), one_pass, rtol=1e-6, atol=0)


def test_quantize_codes_identical_with_and_without_chunking(monkeypatch):
    w = torch.randn(129, 515)  # ragged: padded blocks and scale groups
    configs = [QuantConfig(b, 3, "bf16", 16, 16) for b in (2, 3, 4, 8)] + [
        QuantConfig(4, 8, "fp32", 64, 256, "int")
    ]
    chunked = [quantize(w, c) for c in configs]
    monkeypatch.setattr(tensor_module, "CHUNK_WEIGHTS", 2**30)
    for config, q in zip(configs, chunked, strict=True):
        whole = quantize(w, config)
        assert torch.equal(whole.codes, q.codes), str(config)
        assert torch.equal(whole.dequantize(), q.dequantize()), str(config)


def test_sample_fraction_one_is_exact():
    w = torch.randn(40 * SAMPLE_CHUNK_WEIGHTS // 256, 256) * 0.02
    assert sample_chunks(chunk_energy(w), 1.0, 0) is None
    assert torch.equal(matrix_errors(w, OPTIONS, sample_fraction=1.0), matrix_errors(w, OPTIONS))


def test_sampled_path_with_every_chunk_equals_exact(monkeypatch):
    w = torch.randn(20 * SAMPLE_CHUNK_WEIGHTS + 1000) * 0.02
    w[:64] = 0.0  # zero scales
    w[5000] = 1.0  # an outlier: coarse scales and clipped weights in its scale groups
    fisher = torch.rand_like(w)
    chunks = w.numel() // SAMPLE_CHUNK_WEIGHTS
    every = (torch.arange(chunks), torch.ones(chunks, dtype=torch.float64))
    monkeypatch.setattr(errors_module, "sample_chunks", lambda *args: every)
    options = OPTIONS + [QuantConfig(4, 2, "fp16", 16, 16)]
    for weights in (None, fisher):
        sampled = matrix_errors(w, options, weights, sample_fraction=0.5)
        torch.testing.assert_close(sampled, matrix_errors(w, options, weights), rtol=1e-6, atol=0)


def test_sampled_estimate_is_exact_on_its_chunks_with_the_whole_matrix_scales():
    """The clipped weights' error of the whole matrix, plus the in-range error of each drawn
    chunk times the chunks it stands for, plus the tail's: the whole matrix's scales (its
    offset lies in a chunk that is not drawn) and exact errors on the drawn chunks."""
    w = torch.randn(64 * SAMPLE_CHUNK_WEIGHTS + 3000) * 0.02
    w[::997] *= 20  # outliers, clipped by coarse scales
    index, weight = sample_chunks(chunk_energy(w), 1 / 16, seed=3)
    skipped = next(c for c in range(64) if c not in index.tolist())
    w[skipped * SAMPLE_CHUNK_WEIGHTS : skipped * SAMPLE_CHUNK_WEIGHTS + 64] = 1e-4  # the offset
    index, weight = sample_chunks(chunk_energy(w), 1 / 16, seed=3)
    assert skipped not in index.tolist()
    options = [
        QuantConfig(b, sb, dt, bs, 64) for b in (2, 4) for sb in (2, 8) for dt in ("bf16", "fp32")
        for bs in (16, 64)
    ]  # fmt: skip
    whole = w.numel() // SAMPLE_CHUNK_WEIGHTS * SAMPLE_CHUNK_WEIGHTS
    expected = []
    for option in options:
        q = quantize(w, option)
        scale = q.dequantized_scales().repeat_interleave(option.block_size)[: w.numel()]
        clipped = (w.abs() - scale).clamp(min=0).double().square()
        inside = (w - q.dequantize()).double().square() - clipped
        per_chunk = inside[:whole].view(-1, SAMPLE_CHUNK_WEIGHTS).sum(dim=1)
        expected.append(clipped.sum() + (per_chunk[index] * weight).sum() + inside[whole:].sum())
    got = matrix_errors(w, options, sample_fraction=1 / 16, seed=3)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=0)


def test_sampled_estimate_is_close_on_a_random_matrix():
    w = torch.randn(2048, 1024) * 0.02  # 128 chunks, 16 drawn
    w[:, 7] *= 8  # an outlier column
    exact = matrix_errors(w, OPTIONS)
    sampled = matrix_errors(w, OPTIONS, sample_fraction=1 / 8)
    relative = (sampled / exact - 1).abs()
    assert relative.max() < 0.05 and relative.median() < 0.01
    assert not torch.equal(sampled, exact)


def test_chunk_draw_is_stratified_by_energy_and_deterministic():
    energy = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index, weight = sample_chunks(energy, 0.1, seed=7)
    again, _ = sample_chunks(energy, 0.1, seed=7)
    other, _ = sample_chunks(energy, 0.1, seed=8)
    assert torch.equal(index, again) and not torch.equal(index, other)
    assert len(index) == 100 and weight.sum().item() == 1000
    assert (index.diff() > 0).all()
    # The largest chunk stands for itself; the others one stratum each of the energy order.
    assert weight[index == energy.argmax()].item() == 1.0
    rank = torch.empty(1000, dtype=torch.int64)
    rank[energy.argsort(descending=True)] = torch.arange(1000)
    ranks, order = rank[index].sort()
    bounds = 1 + torch.arange(100) * 999 // 99
    assert ranks[0] == 0 and ((ranks[1:] >= bounds[:-1]) & (ranks[1:] < bounds[1:])).all()
    assert torch.equal(weight[order][1:], bounds.diff().double())
    # At least MIN_SAMPLED_CHUNKS chunks; matrices with no more chunks are done exactly.
    assert len(sample_chunks(torch.rand(100), 0.01, 0)[0]) == MIN_SAMPLED_CHUNKS
    assert sample_chunks(torch.rand(MIN_SAMPLED_CHUNKS), 0.01, 0) is None
    w, fisher = torch.randn(3 * SAMPLE_CHUNK_WEIGHTS + 5), torch.rand(3 * SAMPLE_CHUNK_WEIGHTS + 5)
    expected = (w * w * fisher)[:-5].double().view(3, -1).sum(dim=1)
    torch.testing.assert_close(chunk_energy(w, fisher), expected, rtol=1e-5, atol=0)


def test_error_table_draws_per_matrix_and_reproducibly():
    w = torch.randn(64, SAMPLE_CHUNK_WEIGHTS) * 0.02  # 64 chunks
    weights = {"a": w, "b": w.clone()}
    first = error_table(weights, OPTIONS[:4], progress=False, sample_fraction=0.5, seed=1)
    second = error_table(weights, OPTIONS[:4], progress=False, sample_fraction=0.5, seed=1)
    assert torch.equal(first.errors, second.errors)
    assert not torch.equal(first.errors[0], first.errors[1])  # same matrix, other chunks


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, math.nan, math.inf])
def test_bad_sample_fraction_is_named(bad, tmp_path):
    w = {"w": torch.randn(64, 64)}
    message = rf"sample_fraction={bad!r} is outside \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        matrix_errors(w["w"], OPTIONS[:1], sample_fraction=bad)
    with pytest.raises(ValueError, match=message):
        error_table(w, OPTIONS[:1], progress=False, sample_fraction=bad)
    with pytest.raises(ValueError, match=message):
        cached_error_table(w, "nf", tmp_path, "m", progress=False, sample_fraction=bad)


@pytest.mark.parametrize("bad", [True, "0.5"])
def test_sample_fraction_must_be_a_number(bad):
    with pytest.raises(TypeError, match=rf"sample_fraction={bad!r} has type"):
        matrix_errors(torch.randn(8, 16), OPTIONS[:1], sample_fraction=bad)


def test_cache_key_includes_the_sampling(tmp_path):
    weights = {"w": torch.randn(SAMPLE_CHUNK_WEIGHTS // 8, 320) * 0.02}  # 40 chunks
    exact = cached_error_table(weights, "int", tmp_path, "m", progress=False)
    sampled = cached_error_table(weights, "int", tmp_path, "m", progress=False, sample_fraction=0.5)
    reseeded = cached_error_table(
        weights, "int", tmp_path, "m", progress=False, sample_fraction=0.5, seed=1
    )
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not torch.equal(exact.errors, sampled.errors)
    assert not torch.equal(sampled.errors, reseeded.errors)
    again = cached_error_table(weights, "int", tmp_path, "m", progress=False, sample_fraction=0.5)
    assert torch.equal(again.errors, sampled.errors)
    one = cached_error_table(weights, "int", tmp_path, "m", progress=False, sample_fraction=1)
    assert torch.equal(one.errors, exact.errors) and len(list(tmp_path.glob("*.pt"))) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_errors_and_codes_on_the_gpu_match_the_cpu():
    w = torch.randn(300, 1000) * 0.02
    fisher = torch.rand_like(w)
    cpu = matrix_errors(w, OPTIONS, fisher)
    gpu = matrix_errors(w.cuda(), OPTIONS, fisher.cuda())
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=0)
    sampled = matrix_errors(w.cuda(), OPTIONS, fisher.cuda(), sample_fraction=0.5)
    torch.testing.assert_close(sampled, matrix_errors(w, OPTIONS, fisher, 0.5), rtol=1e-5, atol=0)
    for option in OPTIONS:
        q, g = quantize(w, option), quantize(w.cuda(), option)
        assert torch.equal(g.codes.cpu(), q.codes), str(option)
        torch.testing.assert_close(g.dequantize().cpu(), q.dequantize(), rtol=0, atol=0)
