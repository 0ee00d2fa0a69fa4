"""GGML (llama.cpp) types: GGUF byte layout, gguf's (de)quantizers, llama.cpp's own bytes."""

import hashlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

from coalora.quant.ggml_kquant_search import sqrtf as _sqrtf
from coalora.quant.ggml_quants import dequantize_ggml, quantize_ggml
from coalora.quant.ggml_types import GGML_TYPES, ggml_type

NAMES = [t.name for t in GGML_TYPES]
LEGACY = [t.name for t in GGML_TYPES if t.super_block_size is None]
BITS_PER_WEIGHT = {
    "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5,
    "Q6_K": 6.5625, "Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5,
}  # fmt: skip

# sha256 (first 16 hex digits) of llama.cpp's own bytes for `golden_weight(kind)`, from
# ggml_quantize_chunk of the llama.cpp that llama-cpp-python 0.3.36 vendors
# (experiments/ggml_vs_llamacpp.py builds and calls it).
LLAMACPP_DIGESTS = {
    "gaussian": {
        "Q2_K": "c09de665ba66ea18", "Q3_K": "8439c050a0169bb8", "Q4_K": "f02745eab736f9aa",
        "Q5_K": "c7db53b6b173ea88", "Q6_K": "1b96675667f37563", "Q4_0": "99a9c6c48f12f8ff",
        "Q5_0": "705dbdc34f2d91c7", "Q8_0": "48596b845a0f7b6d",
    },
    # Has Q4_K/Q5_K groups whose sqrtf(mean x²) is near a rounding tie (test_sqrtf_*).
    "cauchy": {
        "Q2_K": "37ee27fb132b110e", "Q3_K": "675e5c13a4de0a65", "Q4_K": "5db2fe603733109a",
        "Q5_K": "48f4f31c1f014a8f", "Q6_K": "10615fe44794302b", "Q4_0": "9a0f52b738138a8a",
        "Q5_0": "cba4041875437fb6", "Q8_0": "ac76a06cb98140e0",
    },
}  # fmt: skip


def golden_weight(kind: str) -> np.ndarray:
    """``(16, 512)`` fp32 from numpy's seeded PCG64, a stream stable across versions."""
    if kind == "cauchy":
        w = np.random.default_rng(129).standard_cauchy((16, 512))
        return np.clip(w, -1e4, 1e4).astype(np.float32)
    w = np.random.default_rng(2024).standard_normal((16, 512), dtype=np.float32)
    w[0, 5] = 30.0
    w[1, 256:] = 0.0
    return w


def weights(kind: str, rows: int = 8, blocks_per_row: int = 2) -> torch.Tensor:
    """Seeded weights of shape ``(rows, 256 * blocks_per_row)``."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(rows, 256 * blocks_per_row, generator=g)
    if kind == "outliers":
        w[torch.rand(w.shape, generator=g) < 0.01] *= 40.0
    elif kind == "zero_block":
        w[1, :256] = 0.0
        w[2, 32:64] = 0.0
    return w


def relative_error(w: torch.Tensor, name: str) -> float:
    back = dequantize_ggml(quantize_ggml(w, name), name, w.shape)
    return ((back - w).pow(2).sum() / w.pow(2).sum()).item()


def test_type_table_matches_gguf():
    assert NAMES == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"]
    for t in GGML_TYPES:
        assert GGML_QUANT_SIZES[t.gguf_type] == (t.weights_per_block, t.bytes_per_block)
        assert t.gguf_type.name == t.name and ggml_type(t.name) is t
        assert t.bits_per_weight == BITS_PER_WEIGHT[t.name]
        assert t.weights_per_block % t.sub_block_size == 0
        assert t.super_block_size == (256 if t.name.endswith("_K") else None)
    assert [t.name for t in GGML_TYPES if t.has_min] == ["Q2_K", "Q4_K", "Q5_K"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zero_block"])
@pytest.mark.parametrize("blocks_per_row", [1, 3])
def test_layout_and_gguf_dequantizer(name, kind, blocks_per_row):
    w = weights(kind, blocks_per_row=blocks_per_row)
    t = ggml_type(name)
    data = quantize_ggml(w, name)
    assert data.dtype == torch.uint8
    assert data.shape == gguf_quants.quant_shape_to_byte_shape(w.shape, t.gguf_type)
    assert data.numel() == w.shape[0] * w.shape[1] // t.weights_per_block * t.bytes_per_block
    expected = torch.from_numpy(gguf_quants.dequantize(data.numpy(), t.gguf_type))
    assert torch.equal(dequantize_ggml(data, name, w.shape), expected)


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zero_block"])
def test_legacy_bytes_equal_gguf_quantizer(name, kind):
    w = weights(kind, blocks_per_row=2)
    expected = gguf_quants.quantize(w.numpy(), ggml_type(name).gguf_type)
    assert torch.equal(quantize_ggml(w, name), torch.from_numpy(expected))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "cauchy"])
def test_bytes_equal_llamacpp(name, kind):
    data = quantize_ggml(torch.from_numpy(golden_weight(kind)), name)
    assert hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16] == LLAMACPP_DIGESTS[kind][name]


def test_sqrtf_is_correctly_rounded():
    v = torch.rand(100_000, generator=torch.Generator().manual_seed(3)) * 1e6
    v[:4] = torch.tensor([0.0, 1e-40, 8196.9951171875, 3e38])  # 8196.99...: torch.sqrt is 1 ulp low
    assert np.array_equal(_sqrtf(v).numpy(), np.sqrt(v.numpy()))


def test_negative_zero_block_scale_follows_llamacpp():
    # C keeps max = +0 for a block of -0.0, so d = 0 / -8 = -0 (0x8000); gguf's numpy picks the
    # block's own -0.0 and writes +0. Both decode to zeros.
    w = torch.full((1, 32), -0.0)
    assert quantize_ggml(w, "Q4_0")[0, :2].tolist() == [0x00, 0x80]
    assert gguf_quants.quantize(w.numpy(), ggml_type("Q4_0").gguf_type)[0, :2].tolist() == [0, 0]
    assert torch.equal(
        dequantize_ggml(quantize_ggml(w, "Q4_0"), "Q4_0", w.shape), torch.zeros(1, 32)
    )


def test_error_decreases_with_bits_on_gaussian_data():
    w = weights("gaussian", rows=16, blocks_per_row=4)
    errors = [relative_error(w, name) for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert errors == sorted(errors, reverse=True)
    assert len(set(errors)) == len(errors)
    # Relative squared errors llama.cpp itself reaches on N(0, 1) (experiments/ggml_vs_llamacpp.py).
    for error, reference in zip(
        errors, [0.088, 0.0228, 0.0051, 0.0013, 0.000314, 0.0000286], strict=True
    ):
        assert error == pytest.approx(reference, rel=0.1)


def test_all_zero_rows_decode_to_zero():
    w = torch.zeros(2, 256)
    for name in NAMES:
        assert torch.equal(dequantize_ggml(quantize_ggml(w, name), name, w.shape), w)


def test_input_layout_and_output_dtype():
    w = weights("gaussian")
    data = quantize_ggml(w, "Q4_K")
    assert torch.equal(quantize_ggml(w.T.contiguous().T, "Q4_K"), data)
    assert torch.equal(quantize_ggml(w.half(), "Q4_K"), quantize_ggml(w.half().float(), "Q4_K"))
    full = dequantize_ggml(data, "Q4_K", w.shape)
    assert torch.equal(dequantize_ggml(data, "Q4_K", w.shape, torch.bfloat16), full.bfloat16())


def test_bad_inputs():
    w = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"row length 48 .* Q4_K block size 256"):
        quantize_ggml(torch.randn(4, 48), "Q4_K")
    with pytest.raises(ValueError, match=r"row length 40 .* Q8_0 block size 32"):
        quantize_ggml(torch.randn(4, 40), "Q8_0")
    with pytest.raises(ValueError, match=r"'Q4_K_M' is not supported; choose one of \['Q2_K'"):
        quantize_ggml(w, "Q4_K_M")
    with pytest.raises(ValueError, match="2-D"):
        quantize_ggml(torch.randn(256), "Q4_0")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_ggml(torch.ones(4, 256, dtype=torch.int32), "Q4_0")
    for value in (float("nan"), float("inf")):
        bad = w.clone()
        bad[1, 3] = value
        with pytest.raises(ValueError, match="1 non-finite"):
            quantize_ggml(bad, "Q6_K")
    data = quantize_ggml(w, "Q4_0")
    with pytest.raises(ValueError, match=r"takes bytes of shape \(4, 144\), got \(4, 72\)"):
        dequantize_ggml(data[:, :72], "Q4_0", w.shape)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_ggml(data.int(), "Q4_0", w.shape)
    with pytest.raises(ValueError, match="row length 100"):
        dequantize_ggml(data, "Q4_0", (4, 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_bytes_equal_cpu(name):
    w = weights("outliers", blocks_per_row=2)
    data = quantize_ggml(w.cuda(), name)
    assert data.is_cuda and torch.equal(data.cpu(), quantize_ggml(w, name))
    assert torch.equal(
        dequantize_ggml(data, name, w.shape).cpu(), dequantize_ggml(data.cpu(), name, w.shape)
    )
