"""Quantization-error tables: ``‖W_i − Q_j(W_i)‖²`` per target matrix i and option j,
the record, its building from :func:`~coalora.quant.errors.matrix_errors` and its disk cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from coalora.quant.error_sampling import check_sample_fraction, matrix_seed
from coalora.quant.errors import matrix_errors
from coalora.quant.options import Option, option_from_dict, option_space

# The logger the cache's warnings have always had (they were logged from coalora.quant.errors).
log = logging.getLogger("coalora.quant.errors")


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
    options: list[Option]
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
        options = [option_from_dict(o) for o in state["options"]]
        return cls(state["names"], state["numels"], options, state["errors"])


def error_table(
    weights: Mapping[str, torch.Tensor],
    options: Sequence[Option],
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
    fmt: str,
    cache_dir: str | Path,
    model_key: str,
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    sample_fraction: float | None = None,
    seed: int = 0,
) -> ErrorTable:
    """The error table over ``option_space(fmt)``, computed once and cached on disk.

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
    options = option_space(fmt)
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
    path: Path, weights: Mapping[str, torch.Tensor], options: list[Option]
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
