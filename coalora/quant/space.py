"""The configuration space of a model: one quantization option per target matrix.

A configuration (a :data:`Choice`) is a tuple of option indices, one per target matrix.
:class:`ConfigSpace` owns everything computed from the option list and the matrices' sizes:
bits of an option and of a configuration, the achievable range, packed bytes, budget checks
and, with an error table, the minimum-error allocation at a budget or a byte limit.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from coalora.quant.allocation import allocate_budget
from coalora.quant.options import Option, packed_nbytes
from coalora.quant.tensor import OFFSET_BYTES

if TYPE_CHECKING:
    from coalora.quant.error_tables import ErrorTable

Choice = tuple[int, ...]
"""A configuration: one option index per target matrix, in target order."""


def config_id(choice: Sequence[int]) -> str:
    """A short stable name of a configuration: 12 hex digits of a hash of its option indices."""
    return hashlib.sha1(",".join(str(int(j)) for j in choice).encode()).hexdigest()[:12]


def config_set_id(configs: Sequence[Sequence[int]]) -> str:
    """A short stable name of an ordered configuration set: 12 hex digits of a hash of its
    members' :func:`config_id` in order (the order matters: the sampler draws by position)."""
    return hashlib.sha1("|".join(config_id(c) for c in configs).encode()).hexdigest()[:12]


def mean_bits(per_matrix_bits: np.ndarray | torch.Tensor, numels: Sequence[int]):
    """Average bits of per-matrix bits ``(..., matrices)``, each matrix weighted by its number
    of weights ``numels``: a float for a NumPy array or list, ``(..., 1)`` for a tensor (the
    search's encodings). The one formula every average of bits in coalora goes through."""
    n = np.asarray(numels, dtype=np.float64)
    if isinstance(per_matrix_bits, torch.Tensor):
        w = torch.as_tensor(n / n.sum(), dtype=per_matrix_bits.dtype)
        return per_matrix_bits @ w.to(per_matrix_bits.device).unsqueeze(-1)
    return float(np.dot(n, np.asarray(per_matrix_bits, dtype=np.float64)) / n.sum())


class ConfigSpace:
    """The options and target matrices of a model, and their error table when known.

    Args:
        options: the quantization options, in index order.
        numels: weights of each target matrix, in target order.
        errors: ``(matrices, options)`` quantization errors (``ErrorTable.errors``), needed by
            :meth:`allocate` and :meth:`allocate_bytes` only; ``+inf`` marks an unusable option.
        usable: ``[matrix][option]`` whether the option can store the matrix (a llama.cpp type
            needs rows of a multiple of its block); default: every option where ``errors`` is
            finite, or every option.
    """

    def __init__(
        self,
        options: Sequence[Option],
        numels: Sequence[int],
        errors: np.ndarray | None = None,
        usable: Sequence[Sequence[bool]] | np.ndarray | None = None,
    ) -> None:
        if not options or not numels:
            raise ValueError(
                f"a configuration space needs options and matrices, got {len(options)} "
                f"options and {len(numels)} matrices"
            )
        self.options: list[Option] = list(options)
        self.numels: list[int] = [int(n) for n in numels]
        shape = (len(self.numels), len(self.options))
        mask = np.ones(shape, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
        if errors is not None:
            mask = mask & np.isfinite(np.asarray(errors))
        if mask.shape != shape:
            raise ValueError(f"usable has shape {mask.shape}; expected (matrices, options) {shape}")
        unusable = np.flatnonzero(~mask.any(axis=1)).tolist()
        if unusable:
            raise ValueError(f"matrices {unusable} have no usable option")
        self.usable = mask
        """``(matrices, options)`` bool: which options can store each matrix."""
        self.option_bits = np.array([o.bits_per_param for o in self.options], dtype=np.float64)
        """Bits per parameter of each option (``QuantConfig.bits_per_param``)."""
        self.errors = errors

    @classmethod
    def from_table(cls, table: ErrorTable) -> ConfigSpace:
        return cls(table.options, table.numels, table.errors.numpy())  # usable: finite errors

    def __len__(self) -> int:
        """The number of target matrices (entries of a configuration)."""
        return len(self.numels)

    # -- bits and bytes ---------------------------------------------------------------------

    def mean_bits(self, per_matrix_bits: np.ndarray | torch.Tensor) -> float | torch.Tensor:
        """:func:`mean_bits` over this space's matrices."""
        return mean_bits(per_matrix_bits, self.numels)

    def bits(self, choice: Sequence[int]) -> float:
        """Average bits per weight of a configuration."""
        return self.mean_bits(self.option_bits[np.asarray(choice, dtype=np.int64)])

    @property
    def range(self) -> tuple[float, float]:
        """The lowest and highest average bits any configuration reaches."""
        bits = np.broadcast_to(self.option_bits, self.usable.shape)
        low = np.where(self.usable, bits, np.inf).min(axis=1)
        high = np.where(self.usable, bits, -np.inf).max(axis=1)
        return self.mean_bits(low), self.mean_bits(high)

    def nbytes(self, choice: Sequence[int]) -> int:
        """Bytes of the packed target matrices under ``choice`` (``QuantizedTensor.nbytes``)."""
        return sum(
            packed_nbytes(n, self.options[j]) for n, j in zip(self.numels, choice, strict=True)
        )

    def bytes_range(self) -> tuple[int, int]:
        """The fewest and most packed bytes of the target matrices any configuration takes."""
        sizes = [
            [packed_nbytes(n, o) for o, ok in zip(self.options, row, strict=True) if ok]
            for n, row in zip(self.numels, self.usable, strict=True)
        ]
        return sum(map(min, sizes)), sum(map(max, sizes))

    # -- checks -----------------------------------------------------------------------------

    def check_choice(self, choice: Sequence[int]) -> Choice:
        """``choice`` as a tuple of ints; raise unless it has one valid index per matrix."""
        choice = tuple(int(j) for j in choice)
        if len(choice) != len(self):
            raise ValueError(f"a configuration needs {len(self)} option indices, got {len(choice)}")
        bad = [j for j in choice if not 0 <= j < len(self.options)]
        if bad:
            raise ValueError(f"option indices {bad} are outside [0, {len(self.options)})")
        unusable = [(i, j) for i, j in enumerate(choice) if not self.usable[i, j]]
        if unusable:
            i, j = unusable[0]
            raise ValueError(
                f"option {j} ({self.options[j]}) cannot store matrix {i} ({self.numels[i]} "
                f"weights); {len(unusable)} matrices have an unusable option"
            )
        return choice

    def check_budgets(self, name: str, budgets: object) -> list[float]:
        """``budgets`` (the config key ``name``) as floats: a non-empty list of numbers, each
        within the achievable range of average bits."""
        low, high = self.range
        accepted = f"a list of bit-widths within the achievable range [{low:.4f}, {high:.4f}]"
        if isinstance(budgets, str | bytes) or not isinstance(budgets, Iterable):
            raise ValueError(f"{name}={budgets!r} is not a list; give {accepted}")
        values = list(budgets)
        not_numbers = [b for b in values if isinstance(b, bool) or not isinstance(b, numbers.Real)]
        if not values or not_numbers:
            what = "is empty" if not values else f"holds {not_numbers}, which are not numbers"
            raise ValueError(f"{name}={values!r} {what}; give {accepted}")
        outside = [b for b in values if not low <= b <= high]
        if outside:
            raise ValueError(
                f"{name}: budgets {outside} are outside the achievable range "
                f"[{low:.4f}, {high:.4f}]"
            )
        return [float(b) for b in values]

    # -- allocation -------------------------------------------------------------------------

    def allocate(self, budget: float) -> Choice:
        """The minimum-error configuration within ``budget`` average bits."""
        if self.errors is None:
            raise ValueError("this configuration space has no error table to allocate with")
        return tuple(allocate_budget(self.errors, self.numels, budget, self.options))

    def allocate_bytes(self, limit: float) -> Choice:
        """The minimum-error configuration whose packed target matrices fit in ``limit`` bytes.

        The bits formula leaves out block padding and each matrix's offset; where the
        allocation at the equivalent budget overshoots, the budget is lowered by the excess.
        """
        smallest, _ = self.bytes_range()
        if limit < smallest:
            raise ValueError(f"no configuration fits in {limit:.0f} bytes (smallest {smallest})")
        low, _ = self.range
        total = sum(self.numels)
        budget = (limit - OFFSET_BYTES * len(self)) * 8 / total
        while True:
            choice = self.allocate(max(budget, low))
            excess = self.nbytes(choice) - limit
            if excess <= 0:
                return choice
            if budget <= low:
                raise ValueError(f"no configuration fits in {limit:.0f} bytes")
            budget -= max(excess * 8 / total, 1e-6)
