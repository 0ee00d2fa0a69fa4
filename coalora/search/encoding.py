"""The integer option grid of the configuration search and its encoding for the surrogate.

For every target matrix, the grid keeps its *efficient* options: those no other option beats
in both bits per parameter and quantization error (the candidates of the allocation program,
:func:`coalora.quant.allocation.efficient_options`), sorted by bits. Along that list bits rise
and error falls strictly, so a matrix's position on it is an ordinal "more bits, less error"
coordinate. A configuration is a point of the grid (one position per matrix); a ±1 move of one
matrix is a step of the guided walk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from coalora.quant.allocation import efficient_options
from coalora.quant.space import Choice, ConfigSpace, mean_bits


class OptionGrid:
    """Per-matrix efficient options of an error table, and the maps to and from positions.

    Encoding for the surrogate: matrix i at position p of its ``K_i`` efficient options is
    ``x_i = p / (K_i − 1)`` (0 when ``K_i = 1``), so a configuration is a point of ``[0, 1]^d``
    with ``d`` the number of matrices. A dominated option is encoded at the efficient option
    with the most bits not above its own; that option dominates it (or ties), so decoding a
    dominated configuration returns one at most as costly and at most as erroneous per matrix.

    Args:
        errors: ``(matrices, options)`` quantization errors.
        bits_per_option: ``(options,)`` bits per parameter of each option.
        numels: weights per matrix (average bits are weighted by them).
    """

    def __init__(
        self, errors: np.ndarray, bits_per_option: np.ndarray, numels: Sequence[int]
    ) -> None:
        errors = np.asarray(errors, dtype=np.float64)
        bpp = np.asarray(bits_per_option, dtype=np.float64)
        if errors.ndim != 2 or errors.shape != (len(numels), len(bpp)):
            raise ValueError(
                f"errors has shape {errors.shape}; expected (len(numels), len(bits_per_option))"
                f" = ({len(numels)}, {len(bpp)})"
            )
        self.efficient: list[np.ndarray] = []
        self.position_of = np.empty(errors.shape, dtype=np.int64)
        for i, row in enumerate(errors):
            options = np.flatnonzero(efficient_options(row, bpp))
            options = options[np.argsort(bpp[options], kind="stable")]
            self.efficient.append(options)
            # Highest efficient position whose bits do not exceed each option's bits.
            self.position_of[i] = np.searchsorted(bpp[options], bpp, side="right") - 1
        self.sizes = np.array([len(o) for o in self.efficient])
        self.numels = list(numels)
        # (matrices, max K) bits of each position, padded by repeating the last position.
        self.position_bits = np.stack(
            [bpp[o[np.minimum(np.arange(self.sizes.max()), len(o) - 1)]] for o in self.efficient]
        )

    @classmethod
    def from_space(cls, space: ConfigSpace) -> OptionGrid:
        """The grid of a configuration space with an error table."""
        return cls(space.errors, space.option_bits, space.numels)

    @property
    def num_matrices(self) -> int:
        return len(self.sizes)

    def positions(self, choices: Sequence[Sequence[int]]) -> np.ndarray:
        """``(n, d)`` grid positions of configurations (option indices per matrix)."""
        options = np.asarray(choices, dtype=np.int64).reshape(len(choices), -1)
        if options.shape[1] != self.num_matrices:
            raise ValueError(
                f"configurations need {self.num_matrices} option indices, got {options.shape[1]}"
            )
        if (options < 0).any() or (options >= self.position_of.shape[1]).any():
            raise ValueError(f"option indices must lie in [0, {self.position_of.shape[1]})")
        return self.position_of[np.arange(self.num_matrices), options]

    def choices(self, positions: np.ndarray) -> list[Choice]:
        """The configurations (option indices) at ``(n, d)`` grid positions."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 2 or positions.shape[1] != self.num_matrices:
            raise ValueError(f"positions must be (n, {self.num_matrices}), got {positions.shape}")
        if (positions < 0).any() or (positions >= self.sizes).any():
            raise ValueError(f"positions must lie in [0, K_i) with K = {self.sizes.tolist()}")
        return [tuple(int(self.efficient[i][p]) for i, p in enumerate(row)) for row in positions]

    def encode(self, positions: np.ndarray) -> torch.Tensor:
        """``(n, d)`` float64 surrogate inputs in ``[0, 1]``: position / (K_i − 1)."""
        scale = np.maximum(self.sizes - 1, 1)
        return torch.as_tensor(np.asarray(positions) / scale, dtype=torch.float64)

    def average_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Average bits of encoded configurations ``(..., d)`` → ``(..., 1)`` (exact on grid
        points; inputs between grid points are rounded to the nearest position)."""
        sizes = torch.as_tensor(self.sizes, device=x.device)
        index = torch.round(x * (sizes - 1)).long()
        table = torch.as_tensor(self.position_bits, dtype=x.dtype, device=x.device)
        bits = table[torch.arange(self.num_matrices, device=x.device), index]
        return mean_bits(bits, self.numels)

    def moves(self, position: np.ndarray) -> np.ndarray:
        """``(k, 2)`` rows (matrix, ±1): the single-matrix moves from ``position`` (``(d,)``)
        that stay on the grid, ordered by matrix, −1 before +1."""
        d = self.num_matrices
        matrix, step = np.repeat(np.arange(d), 2), np.tile([-1, 1], d)
        target = np.asarray(position, dtype=np.int64)[matrix] + step
        on_grid = (target >= 0) & (target < self.sizes[matrix])
        return np.stack([matrix[on_grid], step[on_grid]], axis=1)

    def neighbours(self, position: np.ndarray) -> np.ndarray:
        """``(k, d)`` grid points one ±1 step of one matrix away from ``position`` (``(d,)``),
        in the order of :meth:`moves`."""
        moves = self.moves(position)
        moved = np.repeat(np.asarray(position, dtype=np.int64)[None], len(moves), axis=0)
        moved[np.arange(len(moves)), moves[:, 0]] += moves[:, 1]
        return moved
