"""Quantization: codebooks, storage, packing, reconstruction error."""

import pytest
import torch

from coalora.quant import QuantConfig, config_space, int_codebook, nf_codebook, quantize
from coalora.quant.codebook import codebook, decision_boundaries, level_grid
from coalora.quant.errors import matrix_errors
from coalora.quant.packing import pack, unpack
from coalora.quant.tensor import CHUNK_WEIGHTS, double_quantize, normalize, to_blocks

# QLoRA's published NF4 table (bitsandbytes, functional.py).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236328, 1.0,
]  # fmt: skip

QLORA_CFG = QuantConfig(
    bits=4, scale_bits=8, scale_dtype="fp32", block_size=64, scale_block_size=256
)


def with_bits(cfg: QuantConfig, bits: int, fmt: str | None = None) -> QuantConfig:
    return QuantConfig(
        bits, cfg.scale_bits, cfg.scale_dtype, cfg.block_size, cfg.scale_block_size, fmt or cfg.fmt
    )


def relative_error(w: torch.Tensor, cfg: QuantConfig) -> float:
    return ((w - quantize(w, cfg).dequantize()).norm() / w.norm()).item()


def test_nf4_matches_qlora_table():
    assert torch.allclose(nf_codebook(4), torch.tensor(QLORA_NF4), atol=1e-6, rtol=0)


def test_nf2_and_codebook_shapes():
    assert torch.allclose(nf_codebook(2), torch.tensor([-1.0, 0.0, 0.3379152, 1.0]), atol=1e-6)
    for bits in (2, 3, 4, 8):
        levels = nf_codebook(bits)
        assert levels.numel() == 2**bits
        assert (levels.diff() > 0).all() and levels[0] == -1 and levels[-1] == 1
        assert (levels == 0).sum() == 1


def test_int_codebook_is_symmetric():
    assert torch.equal(int_codebook(2), torch.tensor([-1.0, 0.0, 1.0]))
    levels = int_codebook(4)
    assert levels.numel() == 15 and torch.allclose(levels, -levels.flip(0))


def test_bits_per_param_and_space():
    assert QLORA_CFG.bits_per_param == pytest.approx(4.127, abs=5e-4)
    for fmt in ("nf", "int"):
        space = config_space(fmt)
        bpp = [c.bits_per_param for c in space]
        assert len(space) == len(set(space)) == 288
        assert {c.scale_dtype for c in space} == {"bf16", "fp32"}
        assert min(bpp) == pytest.approx(2.0322, abs=1e-4)
        assert max(bpp) == pytest.approx(8.625, abs=1e-9)


@pytest.mark.parametrize(
    ("field", "value"),
    [("bits", 5), ("scale_bits", 1), ("scale_dtype", "fp64"), ("block_size", 128),
     ("scale_block_size", 32), ("fmt", "fp4")],
)  # fmt: skip
def test_config_rejects_bad_field(field, value):
    kwargs = QLORA_CFG.to_dict() | {field: value}
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}={value!r}.*choose one of"):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 2**bits, (8 * 37,))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == codes.numel() * bits // 8
    unpacked = unpack(packed, bits, codes.numel())
    assert unpacked.dtype == torch.int32 and torch.equal(unpacked.long(), codes)
    assert torch.equal(pack(codes.to(torch.uint8), bits), packed)


def test_pack_layout_first_code_in_lowest_bits():
    assert pack(torch.tensor([1, 2] * 4), 4).tolist() == [0x21] * 4
    # 3 bits: 8 codes make 24 bits, little-endian bytes.
    word = sum(c << (3 * i) for i, c in enumerate(range(8)))
    assert pack(torch.arange(8), 3).tolist() == [word & 0xFF, word >> 8 & 0xFF, word >> 16]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"bits=9 cannot be packed; choose 1 to 8"):
        pack(torch.zeros(16, dtype=torch.long), 9)


@pytest.mark.parametrize("cfg", config_space("nf")[::17] + config_space("int")[5::41], ids=str)
def test_storage_matches_bits_per_param(cfg):
    w = torch.randn(256, 256)  # 65536 weights: a multiple of every block·group size
    qt = quantize(w, cfg)
    assert qt.nbytes * 8 / w.numel() == pytest.approx(cfg.bits_per_param, rel=0.01)


def test_quantized_codes_roundtrip_exactly():
    w = torch.randn(64, 512)
    for bits in (2, 3, 4, 8):
        cfg = with_bits(QLORA_CFG, bits)
        qt = quantize(w, cfg)
        codes = unpack(qt.codes, bits, w.numel())
        assert codes.max() < 2**bits
        assert torch.equal(pack(codes, bits), qt.codes)


def test_dequantize_keeps_shape_dtype_and_ragged_sizes():
    for shape, dtype in [
        ((384, 384), torch.float32),
        ((7, 13), torch.bfloat16),
        ((1000,), torch.float16),
    ]:
        w = torch.randn(shape).to(dtype)
        qt = quantize(w, QLORA_CFG)
        out = qt.dequantize()
        assert out.shape == w.shape and out.dtype == dtype
        # Padding rule: codes padded to whole blocks, scales to whole groups (all stored).
        blocks = -(-w.numel() // 64)
        groups = -(-blocks // 256)
        assert qt.nbytes == blocks * 64 // 2 + groups * 256 + groups * 4 + 4
        assert relative_error(w.float(), QLORA_CFG) < 0.12


@pytest.mark.parametrize("fmt", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_equals_straightforward_formula(fmt, bits):
    """The table-driven dequantization is bit-identical to ``levels[codes] * scales``."""
    for shape, dtype, block_size in [
        ((256, 96), torch.float32, 64),
        ((7, 13), torch.bfloat16, 16),
        ((1000,), torch.float16, 32),
    ]:
        w = (torch.randn(shape) * 0.05).to(dtype)
        qt = quantize(w, QuantConfig(bits, 4, "bf16", block_size, 16, fmt))
        count = qt.num_blocks * block_size
        levels = codebook(fmt, bits)[unpack(qt.codes, bits, count).long()]
        expected = levels.view(-1, block_size) * qt.dequantized_scales().unsqueeze(1)
        expected = expected.view(-1)[: w.numel()].view(shape).to(dtype)
        assert torch.equal(qt.dequantize(), expected), (shape, dtype)


@pytest.mark.parametrize("fmt", ["nf", "int"])
def test_quantized_codes_are_nearest_levels(fmt):
    """Codes equal binary search on the normalised weights, across and within chunks."""
    w = torch.randn(CHUNK_WEIGHTS // 256 + 3, 256) * 0.02  # one full chunk and part of one
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig(bits, 8, "fp16", 32, 64, fmt)
        blocks = to_blocks(w, cfg.block_size)
        scales = double_quantize(blocks.abs().amax(dim=1), 8, "fp16", 64).dequantized
        x = normalize(blocks, scales).view(-1)
        expected = torch.bucketize(x, decision_boundaries(fmt, bits))
        assert torch.equal(unpack(quantize(w, cfg).codes, bits, w.numel()).long(), expected)


def test_nf4_error_matches_qlora_reference():
    w = torch.randn(1024, 1024)
    # bitsandbytes NF4 + double quant on Gaussian weights: relative error ~0.092.
    assert relative_error(w, QLORA_CFG) == pytest.approx(0.092, abs=0.005)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(4, 4, dtype=torch.int32), QLORA_CFG)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.tensor([1.0, float("nan")]), QLORA_CFG)


def test_quantize_rejects_scales_that_overflow_their_dtype():
    w = torch.randn(64, 64) * 1e5
    absmax = w.abs().view(-1, 64).amax(dim=1)
    largest = (absmax.max() - absmax.min()).item()  # the one second-level scale
    assert largest > torch.finfo(torch.float16).max
    message = rf"scale_dtype='fp16': its largest finite value is 65504, .* is {largest:.6g};"
    with pytest.raises(ValueError, match=message):
        quantize(w, QuantConfig(4, 8, "fp16", 64, 256))
    for scale_dtype in ("bf16", "fp32"):
        dense = quantize(w, QuantConfig(4, 8, scale_dtype, 64, 256)).dequantize()
        assert torch.isfinite(dense).all()


def test_all_zero_matrix_is_exact():
    w = torch.zeros(64, 64)
    assert torch.equal(quantize(w, QLORA_CFG).dequantize(), w)


@pytest.mark.parametrize("base", [QLORA_CFG, QuantConfig(2, 3, "bf16", 32, 16)], ids=str)
def test_error_falls_with_bits_on_gaussian(base):
    w = torch.randn(512, 512)
    errors = [relative_error(w, with_bits(base, b)) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4


def test_error_falls_with_bits_on_minilm(minilm_weights):
    for name in list(minilm_weights)[:6]:
        w = minilm_weights[name]
        errors = [relative_error(w, with_bits(QLORA_CFG, b)) for b in (2, 3, 4, 8)]
        assert errors[0] > errors[1] > errors[2] > errors[3], name


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_beats_int_on_gaussian(bits):
    w = torch.randn(512, 512)
    nf, it = (relative_error(w, with_bits(QLORA_CFG, bits, fmt)) for fmt in ("nf", "int"))
    assert nf < it


@pytest.mark.parametrize("fmt", ["nf", "int"])
def test_grid_lookup_equals_binary_search(fmt):
    grid = level_grid(fmt)
    for bits in (2, 3, 4, 8):
        bd = decision_boundaries(fmt, bits)
        x = torch.cat([
            torch.randn(200_000) * 0.6, bd, torch.nextafter(bd, torch.tensor(2.0)),
            torch.nextafter(bd, torch.tensor(-2.0)), torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]),
        ])  # fmt: skip
        assert torch.equal(grid.codes(x, bits).long(), torch.bucketize(x, bd))


def test_matrix_errors_match_quantize():
    w = torch.randn(96, 128) * 0.02
    w[:2] = 0.0  # an all-zero block makes the offset 0, exercising zero scales
    fisher = torch.rand_like(w)
    options = config_space("nf")[::7] + config_space("int")[3::29]
    for weights in (None, fisher):
        table = matrix_errors(w, options, weights)
        for opt, err in zip(options, table, strict=True):
            diff = (w - quantize(w, opt).dequantize()).square()
            expected = (diff if weights is None else diff * weights).sum().double()
            assert err.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-12), str(opt)


def test_matrix_errors_mark_scale_overflow_as_unusable():
    w = torch.randn(64, 64) * 1e5
    options = [QuantConfig(b, 8, dt, 64, 256) for b in (2, 4) for dt in ("fp16", "bf16", "fp32")]
    errors = matrix_errors(w, options)
    for opt, err in zip(options, errors.tolist(), strict=True):
        if opt.scale_dtype == "fp16":
            assert err == float("inf"), str(opt)
        else:
            diff = (w - quantize(w, opt).dequantize()).double().square().sum().item()
            assert err == pytest.approx(diff, rel=1e-4), str(opt)
