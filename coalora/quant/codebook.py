"""Code levels: NormalFloat (QLoRA) and symmetric signed integers, both on [-1, 1]."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coalora.quant.config import BITS, Format

NF_OFFSET = 0.9677083
"""QLoRA's quantile offset: the outermost NF levels sit at these quantiles of N(0, σ)."""


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {BITS}")


@functools.cache
def nf_codebook(bits: int) -> torch.Tensor:
    """NormalFloat levels for ``bits`` bits, ascending, exactly -1 ... 0 ... 1.

    Quantiles ``linspace(1-offset, 0.5, 2^(b-1))`` then ``linspace(0.5, offset, 2^(b-1)+1)[1:]``
    mapped through the inverse CDF of N(0, σ) with σ chosen so that the offset maps to 1.
    """
    _check_bits(bits)
    half = 2 ** (bits - 1)
    quantiles = torch.cat(
        [
            torch.linspace(1 - NF_OFFSET, 0.5, half, dtype=torch.float64),
            torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)[1:],
        ]
    )
    sigma = -1.0 / (math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1 - 2 * NF_OFFSET)).item())
    levels = sigma * math.sqrt(2.0) * torch.special.erfinv(2 * quantiles - 1)
    levels[half - 1] = 0.0  # the median is exactly zero
    levels[0], levels[-1] = -1.0, 1.0
    return levels.float()


@functools.cache
def int_codebook(bits: int) -> torch.Tensor:
    """Symmetric signed integer levels ``k / (2^(b-1) - 1)`` for ``|k| <= 2^(b-1) - 1``."""
    _check_bits(bits)
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


def codebook(fmt: Format, bits: int) -> torch.Tensor:
    """The ascending levels of format ``fmt`` at ``bits`` bits."""
    if fmt == "nf":
        return nf_codebook(bits)
    if fmt == "int":
        return int_codebook(bits)
    raise ValueError(f"fmt={fmt!r} is not supported; choose 'nf' or 'int'")


@functools.cache
def decision_boundaries(fmt: Format, bits: int) -> torch.Tensor:
    """Midpoints between consecutive levels: ``bucketize(x, boundaries)`` is the nearest level."""
    levels = codebook(fmt, bits)
    return (levels[1:] + levels[:-1]) / 2


EDGE_MARGIN = 0.01
"""Least distance, in cells, between a decision boundary and a cell edge of a :class:`LevelGrid`."""


@functools.cache
def codebook_on(fmt: Format, bits: int, device: torch.device) -> torch.Tensor:
    """:func:`codebook` on ``device``, copied there once per process."""
    return codebook(fmt, bits).to(device)


@dataclass(frozen=True)
class LevelGrid:
    """Nearest-level lookup on a uniform grid of ``cells`` cells over [-1, 1].

    Binary search (``torch.bucketize``) costs ~20 ns per weight on a CPU; this lookup is two
    gathers and a comparison. The grid is fine enough that every cell of every codebook of
    the format holds at most one decision boundary, and no boundary sits within
    ``EDGE_MARGIN`` cells of an edge, so float rounding of the cell index never changes a code.
    For each bit width, ``below[b][c]`` (uint8) counts the boundaries left of cell ``c`` and
    ``boundary[b][c]`` is the boundary inside it (``inf`` if none); the nearest code of ``x``
    is ``below[cell] + (x > boundary[cell])``, exactly what ``bucketize`` returns.
    """

    fmt: Format
    cells: int
    below: dict[int, torch.Tensor]
    boundary: dict[int, torch.Tensor]

    def cell_of(self, x: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Grid cell of every entry of ``x`` as ``dtype`` (values beyond ±1 fall in the end
        cells). int64 indices gather faster on a CPU; int32 ones take half the memory."""
        position = (x + 1.0).mul_(self.cells / 2)
        return position.clamp_(0, self.cells - 1).to(dtype)

    def codes(self, x: torch.Tensor, bits: int, cell: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-level codes (uint8) of ``x``; pass ``cell`` to reuse :meth:`cell_of`."""
        cell = (self.cell_of(x) if cell is None else cell).reshape(-1)
        below_table, boundary_table = grid_tables_on(self.fmt, bits, x.device)
        below = below_table.index_select(0, cell)
        above = x.reshape(-1) > boundary_table.index_select(0, cell)
        return below.add_(above).view(x.shape)


def _grid_fits(cells: int, boundaries: list[torch.Tensor]) -> bool:
    for bd in boundaries:
        position = (bd.double() + 1) * cells / 2
        index = position.floor()
        if (position - index).min() < EDGE_MARGIN or (index + 1 - position).min() < EDGE_MARGIN:
            return False
        if (index[1:] == index[:-1]).any():
            return False
    return True


@functools.cache
def level_grid(fmt: Format) -> LevelGrid:
    """The lookup grid shared by all bit widths of ``fmt`` (the smallest fitting size ≥ 1024)."""
    boundaries = {b: decision_boundaries(fmt, b) for b in BITS}
    cells = next(c for c in range(1024, 1 << 16) if _grid_fits(c, list(boundaries.values())))
    below, inside = {}, {}
    for b, bd in boundaries.items():
        index = ((bd.double() + 1) * cells / 2).floor().long()
        edges = torch.linspace(-1.0, 1.0, cells + 1, dtype=torch.float64)[:-1]
        below[b] = torch.searchsorted(bd.double(), edges, right=False).to(torch.uint8)
        inside[b] = torch.full((cells,), math.inf)
        inside[b][index] = bd
    return LevelGrid(fmt, cells, below, inside)


@functools.cache
def grid_tables_on(
    fmt: Format, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``below[bits]`` and ``boundary[bits]`` of :func:`level_grid` on ``device``, copied there
    once per process (a CPU gets the tables themselves)."""
    grid = level_grid(fmt)
    return grid.below[bits].to(device), grid.boundary[bits].to(device)


@functools.cache
def nearest_level_pairs(
    fmt: Format, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell of :func:`level_grid`, the midpoint ``m`` and half-gap ``h`` of the two levels
    either side of the cell's decision boundary (where it holds none: of its level and the
    next one, or ``h = 0`` past the last boundary), on ``device``.

    The nearest of the two levels is at distance ``| |x - m| - h |``, so the squared distance
    from ``x`` to its nearest level is ``(|x - m| - h)^2`` with no code lookup. It is continuous
    in ``x`` (at a boundary both levels are equally near), so it equals the squared error of
    the codes of :meth:`LevelGrid.codes` up to float rounding.
    """
    levels = codebook(fmt, bits)
    below = level_grid(fmt).below[bits].long()
    low = levels[below]
    high = levels[(below + 1).clamp_(max=len(levels) - 1)]
    return ((low + high) / 2).to(device), ((high - low) / 2).to(device)


ROW_DTYPES = {2: torch.int64, 4: torch.complex128}
"""One-element dtypes as wide as 2 or 4 fp32 levels (rows of :func:`packed_level_table`)."""


@functools.cache
def packed_level_table(fmt: Format, bits: int) -> tuple[torch.Tensor, torch.dtype]:
    """Levels of every packed byte or 16-bit word, for dequantizing ``bits`` in 2, 4 or 8.

    Each index holds ``k = min(4, 16 // bits)`` codes in ``k · bits`` bits, the first code in
    the lowest bits as :func:`~coalora.quant.packing.pack` writes them (words read
    little-endian). Row ``i`` of the table holds the ``k`` fp32 levels of index ``i``, viewed
    as one element of ``ROW_DTYPES[k]`` so that ``index_select`` copies a whole row with its
    one-dimensional kernel. Codes that name no level (int codebooks have ``2^bits − 1``
    levels) map to NaN. Returns the table and the unsigned dtype to read packed codes as.
    """
    if 8 % bits:
        raise ValueError(f"bits={bits} has no packed level table; choose 2, 4 or 8")
    per_index = min(4, 16 // bits)
    index_bits = per_index * bits
    index = torch.arange(2**index_bits).unsqueeze(1)
    shifts = torch.arange(per_index) * bits
    levels = codebook(fmt, bits)
    levels = F.pad(levels, (0, 2**bits - len(levels)), value=math.nan)
    table = levels[(index >> shifts) & (2**bits - 1)]
    index_dtype = torch.uint8 if index_bits == 8 else torch.uint16
    return table.view(ROW_DTYPES[per_index]).view(-1), index_dtype


@functools.cache
def packed_level_table_on(
    fmt: Format, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.dtype]:
    """:func:`packed_level_table` with the table on ``device``, copied there once per process."""
    table, index_dtype = packed_level_table(fmt, bits)
    return table.to(device), index_dtype
