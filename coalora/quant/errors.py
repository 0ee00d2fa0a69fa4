"""Quantization-error tables: ``‖W_i − Q_j(W_i)‖²`` per target matrix i and option j (DESIGN §3)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import numbers
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from coalora.quant.codebook import level_grid, nearest_level_pairs
from coalora.quant.config import Format, QuantConfig, config_space
from coalora.quant.tensor import CHUNK_WEIGHTS, double_quantize, to_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorTable:
    """Squared (optionally Fisher-weighted) quantization error of every (matrix, option) pair.

    Attributes:
        names: target matrix names, one per row.
        numels: number of weights of each matrix.
        options: the quantization options, one per column.
        errors: ``(len(names), len(options))`` float64 tensor.
    """

    names: list[str]
    numels: list[int]
    options: list[QuantConfig]
    errors: torch.Tensor

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "names": self.names,
                "numels": self.numels,
                "options": [o.to_dict() for o in self.options],
                "errors": self.errors,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> ErrorTable:
        state = torch.load(path, weights_only=True)
        options = [QuantConfig(**o) for o in state["options"]]
        return cls(state["names"], state["numels"], options, state["errors"])


SAMPLE_CHUNK_WEIGHTS = 16384
"""Weights per chunk of a sampled error estimate: a multiple of every ``block_size ·
scale_block_size`` (at most 64 · 256), so an aligned chunk holds whole blocks and whole scale
groups of every layout, and its error under any option is exactly its share of the whole
matrix's error."""

MIN_SAMPLED_CHUNKS = 16
"""Least chunks a sampled estimate takes from one matrix; a matrix with no more whole chunks
than that is done exactly."""


def check_sample_fraction(sample_fraction: float | None) -> None:
    """Raise unless ``sample_fraction`` is ``None`` or a number in (0, 1]."""
    if sample_fraction is None:
        return
    if not isinstance(sample_fraction, numbers.Real) or isinstance(sample_fraction, bool):
        raise TypeError(
            f"sample_fraction={sample_fraction!r} has type {type(sample_fraction).__name__}; "
            "it must be a number in (0, 1], or None for the exact table"
        )
    if not 0 < sample_fraction <= 1:
        raise ValueError(
            f"sample_fraction={sample_fraction!r} is outside (0, 1]; it is the fraction of each "
            "matrix's weights the error is estimated on (None: the exact table)"
        )


def sample_size(chunks: int, sample_fraction: float) -> int | None:
    """Chunks drawn from a matrix of ``chunks`` whole chunks: ``max(ceil(sample_fraction ·
    chunks), MIN_SAMPLED_CHUNKS)``, or ``None`` when that is all of them (done exactly)."""
    check_sample_fraction(sample_fraction)
    count = max(math.ceil(sample_fraction * chunks), MIN_SAMPLED_CHUNKS)
    return None if count >= chunks else count


def sample_chunks(
    energy: torch.Tensor, sample_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The whole chunks of ``SAMPLE_CHUNK_WEIGHTS`` weights a sampled estimate computes.

    Stratified by energy: the chunk of largest ``energy`` (its sum of squared, Fisher-weighted
    weights) is always taken; the others, ordered by falling energy, are split into
    ``sample_size(chunks, sample_fraction) - 1`` contiguous strata of equal size (±1), and one
    chunk is drawn uniformly from each, with a generator seeded by ``seed``. Chunks of similar
    energy have similar errors, so each stratum's draw stands well for it.

    Args:
        energy: ``(chunks,)`` energy of every whole chunk of the matrix, in order.
        sample_fraction: in (0, 1].
        seed: seed of the draw.

    Returns:
        ``(index, weight)``: the drawn chunks (int64, ascending) and how many chunks each
        stands for (float64, its stratum's size; they sum to the number of chunks), or
        ``None`` when the matrix is to be done exactly.
    """
    count = sample_size(len(energy), sample_fraction)
    if count is None:
        return None
    by_energy = torch.argsort(energy.cpu(), descending=True, stable=True)
    rest = len(energy) - 1
    bounds = torch.arange(count, dtype=torch.int64) * rest // (count - 1)
    sizes = bounds.diff()
    draw = torch.rand(count - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    position = 1 + bounds[:-1] + (draw * sizes).long().clamp_(max=sizes - 1)
    index = torch.cat([by_energy[:1], by_energy[position]])
    weight = torch.cat([torch.ones(1, dtype=torch.float64), sizes.double()])
    order = torch.argsort(index)
    return index[order], weight[order]


def matrix_seed(seed: int, name: str) -> int:
    """A per-matrix seed for :func:`sample_chunks`, stable across processes and dict orders."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def matrix_errors(
    w: torch.Tensor,
    options: Sequence[QuantConfig],
    fisher: torch.Tensor | None = None,
    sample_fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Error ``((w - quantize(w, o).dequantize())**2 * fisher).sum()`` of each option ``o``.

    Computed on ``w``'s device; only the final per-option errors (float64, on the CPU) come
    back, in one transfer. Work is shared between options: per block size the blocks and their
    absmax; per scale setting (scale bits, dtype and block size) the dequantized scales, the
    normalised weights and their grid cells; per bit width only the distance to the nearest
    level, ``(|x - m| - h)^2`` with the midpoint ``m`` and half-gap ``h`` of the cell's two
    candidate levels (:func:`nearest_level_pairs`), which equals the codes' squared error up to
    float rounding. A CPU works through ``CHUNK_WEIGHTS`` weights at a time (temporaries that
    stay in its cache); other devices take the whole matrix in one pass. An option whose
    second-level scales overflow its ``scale_dtype`` (``quantize`` raises) gets ``+inf``: it is
    unusable for this matrix.

    Args:
        w: the weight matrix (any shape; flattened and padded as :func:`quantize` does).
        options: the quantization options.
        fisher: optional per-weight weights of the squared error (a diagonal Fisher estimate),
            same shape as ``w``.
        sample_fraction: ``None`` for the exact errors; otherwise estimate them on about this
            fraction of the weights, in (0, 1]. The scales (hence the second-level offset and
            any overflow) are always the whole matrix's, and so is the error of the weights
            the scales clip (``|w| > scale``, cheap to sum exactly); the rest, the error
            inside the levels' range, is computed exactly on whole chunks drawn by
            :func:`sample_chunks` (the same chunks for every option, so that differences
            between options are estimated more precisely than each error) and on the weights
            after the last whole chunk, and scaled by how many chunks each drawn one stands
            for. The estimate is unbiased; matrices of few chunks are done exactly.
        seed: seed of the chunk draw.
    """
    if fisher is not None and fisher.shape != w.shape:
        raise ValueError(f"fisher shape {tuple(fisher.shape)} differs from weight {tuple(w.shape)}")
    check_sample_fraction(sample_fraction)
    if not torch.isfinite(w).all():
        raise ValueError("matrix_errors got NaN or infinite weights")
    flat = w.detach().reshape(-1).float()
    flat_fisher = None if fisher is None else fisher.detach().reshape(-1).float().to(flat.device)
    chunks = None
    whole = flat.numel() // SAMPLE_CHUNK_WEIGHTS
    if sample_fraction is not None and sample_size(whole, sample_fraction) is not None:
        energy = chunk_energy(flat, flat_fisher)
        chunks = tuple(t.to(flat.device) for t in sample_chunks(energy, sample_fraction, seed))
    return _option_errors(flat, flat_fisher, options, chunks).cpu()


def chunk_energy(w: torch.Tensor, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ fisher · w²`` (float64) of every whole ``SAMPLE_CHUNK_WEIGHTS`` chunk of the flattened
    ``w``, the order :func:`sample_chunks` stratifies by."""
    whole = w.numel() // SAMPLE_CHUNK_WEIGHTS * SAMPLE_CHUNK_WEIGHTS
    body = w.detach().reshape(-1)[:whole].float().view(-1, SAMPLE_CHUNK_WEIGHTS)
    if fisher is not None:
        body = body * fisher.detach().reshape(-1)[:whole].float().view_as(body).sqrt()
    return torch.linalg.vector_norm(body, dim=1).double().square_()


def _block_absmax(flat: torch.Tensor, block_sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """Absmax of every block of ``to_blocks(flat, bs)`` for each block size, from one pass: a
    block of ``bs`` is ``bs / smallest`` whole blocks of the smallest size (all sizes are
    powers of two), and zero padding never raises a maximum."""
    smallest = min(block_sizes)
    base = to_blocks(flat, smallest).abs().amax(dim=1)
    out = {}
    for bs in block_sizes:
        ratio = bs // smallest
        if bs % smallest:
            out[bs] = to_blocks(flat, bs).abs().amax(dim=1)
        elif ratio == 1:
            out[bs] = base
        else:
            out[bs] = F.pad(base, (0, -base.numel() % ratio)).view(-1, ratio).amax(dim=1)
    return out


@dataclass(frozen=True)
class _Sample:
    """The blocks of one block size that a sampled estimate computes the in-range error on."""

    blocks: torch.Tensor  # (sampled blocks, block_size) fp32
    fisher: torch.Tensor | None  # the same blocks' Fisher weights
    position: torch.Tensor  # (sampled blocks,) int64: their index among all blocks
    weight: torch.Tensor  # (sampled blocks,) float64: how many blocks each stands for

    @classmethod
    def of(
        cls,
        flat: torch.Tensor,
        flat_fisher: torch.Tensor | None,
        block_size: int,
        chunks: tuple[torch.Tensor, torch.Tensor],
    ) -> _Sample:
        index, chunk_weight = chunks
        device = flat.device
        whole = flat.numel() // SAMPLE_CHUNK_WEIGHTS * SAMPLE_CHUNK_WEIGHTS

        def take(x: torch.Tensor) -> torch.Tensor:
            picked = x[:whole].view(-1, SAMPLE_CHUNK_WEIGHTS).index_select(0, index)
            return to_blocks(torch.cat([picked.view(-1), x[whole:]]), block_size)

        per_chunk = SAMPLE_CHUNK_WEIGHTS // block_size
        first = index.unsqueeze(1) * per_chunk
        tail = torch.arange(whole // block_size, -(-flat.numel() // block_size), device=device)
        position = torch.cat([(first + torch.arange(per_chunk, device=device)).view(-1), tail])
        weight = torch.cat(
            [chunk_weight.repeat_interleave(per_chunk), chunk_weight.new_ones(len(tail))]
        )
        return cls(take(flat), None if flat_fisher is None else take(flat_fisher), position, weight)


def _option_errors(
    flat: torch.Tensor,
    flat_fisher: torch.Tensor | None,
    options: Sequence[QuantConfig],
    chunks: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Errors (float64, on ``flat``'s device) of ``options`` on the flat fp32 weights ``flat``:
    exact, or estimated on the ``chunks`` ``(index, weight)`` of :func:`sample_chunks`."""
    device = flat.device
    rows = CHUNK_WEIGHTS if device.type == "cpu" else None

    def layout(i: int) -> tuple[int, int, str, int, str]:
        o = options[i]
        return o.block_size, o.scale_block_size, o.scale_dtype, o.scale_bits, o.fmt

    order = sorted(range(len(options)), key=layout)
    absmax = _block_absmax(flat, sorted({o.block_size for o in options}))
    results, members_in_order = [], []
    for block_size, by_block in itertools.groupby(order, key=lambda i: options[i].block_size):
        blocks = to_blocks(flat, block_size)
        fisher_blocks = None if flat_fisher is None else to_blocks(flat_fisher, block_size)
        if chunks is None:
            energy = blocks.square()
            if fisher_blocks is not None:
                energy.mul_(fisher_blocks)
            energy = energy.sum(dim=1, dtype=torch.float64)  # the error of a block set to 0
        else:
            sample = _Sample.of(flat, flat_fisher, block_size, chunks)
            magnitude = blocks.abs()
        for (_, group, scale_dtype, scale_bits, fmt), members in itertools.groupby(
            by_block, key=layout
        ):
            members = list(members)
            bits = [options[i].bits for i in members]
            quantized = double_quantize(
                absmax[block_size], scale_bits, scale_dtype, group, check_overflow=False
            )
            scales = quantized.dequantized
            scale_sq = scales.double().square_()
            if chunks is None:
                error = _normalized_block_errors(blocks, fisher_blocks, scales, fmt, bits, rows)
                # Blocks whose scale dequantizes to 0 reconstruct as zeros: their error is ‖w‖².
                error = error.double() @ scale_sq + torch.where(scales == 0, energy, 0.0).sum()
            else:
                inside = _normalized_block_errors(
                    sample.blocks, sample.fisher, scales[sample.position], fmt, bits, rows, True
                )
                clipped = _clipped_error(magnitude, fisher_blocks, scales, rows)
                error = inside.double() @ (scale_sq[sample.position] * sample.weight) + clipped
            overflow = ~torch.isfinite(quantized.second).all()
            results.append(torch.where(overflow, math.inf, error))
            members_in_order += members
    errors = torch.empty(len(options), dtype=torch.float64, device=device)
    errors[torch.tensor(members_in_order, device=device)] = torch.cat(results)
    return errors


def _clipped_error(
    magnitude: torch.Tensor,
    fisher_blocks: torch.Tensor | None,
    scales: torch.Tensor,
    rows_weights: int | None,
) -> torch.Tensor:
    """``Σ fisher · (|w| − scale)²`` over the weights beyond their block's scale: the error
    of the weights clipped to the outermost levels (all of a block whose scale is 0), as a
    float64 scalar. ``magnitude`` is ``|blocks|``; ``rows_weights`` weights at a time."""
    count, block_size = magnitude.shape
    rows = count if rows_weights is None else max(1, rows_weights // block_size)
    total = torch.zeros((), dtype=torch.float64, device=magnitude.device)
    for start in range(0, count, rows):
        part = slice(start, start + rows)
        excess = (magnitude[part] - scales[part].unsqueeze(1)).clamp_(min=0).square_()
        if fisher_blocks is not None:
            excess.mul_(fisher_blocks[part])
        total += excess.sum(dim=1).sum(dtype=torch.float64)
    return total


def _normalized_block_errors(
    blocks: torch.Tensor,
    fisher_blocks: torch.Tensor | None,
    scales: torch.Tensor,
    fmt: Format,
    bits: Sequence[int],
    rows_weights: int | None,
    inside_only: bool = False,
) -> torch.Tensor:
    """``(len(bits), blocks)`` fp32: per block, the (Fisher-weighted) squared distance of the
    normalised weights ``blocks / scales`` to their nearest level, for each bit width;
    ``rows_weights`` weights at a time (``None``: all at once). Blocks whose scale is 0 or NaN
    count as all-zero (their scale² weights them anyway). ``inside_only`` leaves out the
    weights beyond ±1 (clipped), as if they sat on the outermost level."""
    count, block_size = blocks.shape
    grid = level_grid(fmt)
    pairs = [nearest_level_pairs(fmt, b, blocks.device) for b in bits]
    safe = torch.where(scales > 0, scales, math.inf).unsqueeze(1)
    out = torch.empty(len(bits), count, device=blocks.device)
    rows = count if rows_weights is None else max(1, rows_weights // block_size)
    size = min(rows, count) * block_size
    x_buf, d_buf, h_buf = (torch.empty(size, device=blocks.device) for _ in range(3))
    for start in range(0, count, rows):
        part = slice(start, start + rows)
        n = min(rows, count - start) * block_size
        x = torch.div(blocks[part], safe[part], out=x_buf[:n].view(-1, block_size))
        if inside_only:
            x.clamp_(-1.0, 1.0)
        cell = grid.cell_of(x, torch.int64).view(-1)
        x = x.view(-1)
        d, h = d_buf[:n], h_buf[:n]
        for j, (mid, half) in enumerate(pairs):
            torch.index_select(mid, 0, cell, out=d)
            d.sub_(x).abs_().sub_(torch.index_select(half, 0, cell, out=h))
            d.square_()
            if fisher_blocks is not None:
                d.mul_(fisher_blocks[part].reshape(-1))
            torch.sum(d.view(-1, block_size), dim=1, out=out[j, part])
    return out


def error_table(
    weights: Mapping[str, torch.Tensor],
    options: Sequence[QuantConfig],
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    sample_fraction: float | None = None,
    seed: int = 0,
) -> ErrorTable:
    """Build the error table of ``weights`` (name → matrix) over ``options``.

    Each matrix is done on its own device (:func:`matrix_errors`). With ``sample_fraction``
    the errors are estimated on that fraction of every large matrix's weights, the chunks
    drawn with a seed derived from ``seed`` and the matrix's name (:func:`matrix_seed`).
    """
    check_sample_fraction(sample_fraction)
    if not weights:
        raise ValueError("error_table needs at least one weight matrix")
    missing = [] if fisher is None else sorted(set(weights) - set(fisher))
    if missing:
        raise ValueError(f"fisher has no entry for matrices {missing}")
    empty = {name: tuple(w.shape) for name, w in weights.items() if w.numel() == 0}
    if empty:
        raise ValueError(f"weight matrices without elements (name: shape): {empty}")
    rows = [
        matrix_errors(
            w,
            options,
            None if fisher is None else fisher[name],
            sample_fraction,
            matrix_seed(seed, name),
        )
        for name, w in tqdm(weights.items(), desc="error table", disable=not progress)
    ]
    return ErrorTable(
        names=list(weights),
        numels=[w.numel() for w in weights.values()],
        options=list(options),
        errors=torch.stack(rows),
    )


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of named tensors (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, t in tensors.items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_error_table(
    weights: Mapping[str, torch.Tensor],
    fmt: Format,
    cache_dir: str | Path,
    model_key: str,
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    sample_fraction: float | None = None,
    seed: int = 0,
) -> ErrorTable:
    """The error table over ``config_space(fmt)``, computed once and cached on disk.

    The cache file is keyed by ``model_key``, the format, whether Fisher weighting is used, the
    sampling settings (``sample_fraction`` and ``seed`` of :func:`error_table`; a fraction of
    1 is the exact table) and a content hash of the weights (and Fisher), so a changed model
    or setting never reuses a stale table. A cache file that cannot be read, or that holds a
    table for other matrices or options, is moved aside to ``<name>.corrupt`` with a warning
    and the table is rebuilt. Concurrent builders each write their own temporary file and
    atomically replace the entry.
    """
    check_sample_fraction(sample_fraction)
    if sample_fraction == 1:
        sample_fraction = None
    safe_key = model_key.replace("/", "--")
    tag = "fisher-" + fingerprint(fisher) if fisher is not None else "plain"
    if sample_fraction is not None:
        tag += f"-sampled{float(sample_fraction)!r}-seed{seed}"
    path = Path(cache_dir) / f"{safe_key}-{fmt}-{tag}-{fingerprint(weights)}.pt"
    options = config_space(fmt)
    if path.exists():
        table = _load_cached(path, weights, options)
        if table is not None:
            return table
    table = error_table(weights, options, fisher, progress, sample_fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        table.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return table


def _load_cached(
    path: Path, weights: Mapping[str, torch.Tensor], options: list[QuantConfig]
) -> ErrorTable | None:
    """The table cached at ``path``, or ``None`` after moving a damaged or mismatched file aside."""
    try:
        table = ErrorTable.load(path)
        if (
            table.names == list(weights)
            and table.numels == [w.numel() for w in weights.values()]
            and table.options == options
            and tuple(table.errors.shape) == (len(weights), len(options))
        ):
            return table
        problem = "for other matrices or options"
    except Exception as exc:  # a damaged file fails in many ways (zip, unpickling, keys)
        problem = f"unreadable ({type(exc).__name__})"
    aside = path.with_name(path.name + ".corrupt")
    with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
        os.replace(path, aside)
    log.warning("error-table cache %s is %s; moved it to %s and rebuilding", path, problem, aside)
    return None


def diagonal_fisher(
    model: torch.nn.Module,
    weights: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean squared gradient of the loss for each weight.

    ``model(**batch)`` must return an object with a ``loss`` (Hugging Face models do when the
    batch holds ``labels``); the batches' tensors are moved to the weights' device. Gradients
    of the listed weights are enabled for the duration.
    """
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    flags = {name: p.requires_grad for name, p in weights.items()}
    device = next((p.device for p in weights.values()), None)
    count = 0
    try:
        for p in weights.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            model(**batch).loss.backward()
            for name, p in weights.items():
                sums[name] += p.grad.float().square()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in weights.items():
            p.requires_grad_(flags[name])
    if count == 0:
        raise ValueError("diagonal_fisher got no batches")
    return {name: s / count for name, s in sums.items()}
