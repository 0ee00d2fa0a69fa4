"""The chunk sample of a sampled error estimate: which whole chunks of a matrix
:func:`~coalora.quant.errors.matrix_errors` computes the error on, and how many chunks each
stands for."""

from __future__ import annotations

import hashlib
import math
import numbers

import torch

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


def chunk_energy(w: torch.Tensor, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ fisher · w²`` (float64) of every whole ``SAMPLE_CHUNK_WEIGHTS`` chunk of the flattened
    ``w``, the order :func:`sample_chunks` stratifies by."""
    whole = w.numel() // SAMPLE_CHUNK_WEIGHTS * SAMPLE_CHUNK_WEIGHTS
    body = w.detach().reshape(-1)[:whole].float().view(-1, SAMPLE_CHUNK_WEIGHTS)
    if fisher is not None:
        body = body * fisher.detach().reshape(-1)[:whole].float().view_as(body).sqrt()
    return torch.linalg.vector_norm(body, dim=1).double().square_()
