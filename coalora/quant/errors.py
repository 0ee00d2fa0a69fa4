"""Quantization-error tables: ``‖W_i − Q_j(W_i)‖²`` per target matrix i and option j (DESIGN §3)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from coalora.quant.codebook import codebook, level_grid
from coalora.quant.config import Format, QuantConfig, config_space
from coalora.quant.tensor import ScaleOverflowError, double_quantize, normalize, to_blocks

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


def matrix_errors(
    w: torch.Tensor, options: Sequence[QuantConfig], fisher: torch.Tensor | None = None
) -> torch.Tensor:
    """Error of each option on one matrix, sharing work between options.

    Equals ``((w - quantize(w, o).dequantize())**2 * fisher).sum()`` for every option ``o``
    (up to float rounding). Options with the same scales share the normalised weights and
    their grid cells; only the code lookup is done per bit width. An option whose
    second-level scales overflow its ``scale_dtype`` (``quantize`` raises) gets ``+inf``:
    it is unusable for this matrix.
    """
    if fisher is not None and fisher.shape != w.shape:
        raise ValueError(f"fisher shape {tuple(fisher.shape)} differs from weight {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("matrix_errors got NaN or infinite weights")
    errors = torch.empty(len(options), dtype=torch.float64)

    def by_scales(i: int) -> tuple[int, int, str, int, str]:
        o = options[i]
        return o.block_size, o.scale_bits, o.scale_dtype, o.scale_block_size, o.fmt

    order = sorted(range(len(options)), key=by_scales)
    blocks = weights = None
    for (block_size, scale_bits, scale_dtype, group, fmt), members in itertools.groupby(
        order, key=by_scales
    ):
        members = list(members)
        if blocks is None or blocks.shape[1] != block_size:
            blocks = to_blocks(w, block_size)
            weights = torch.ones_like(blocks) if fisher is None else to_blocks(fisher, block_size)
            absmax = blocks.abs().amax(dim=1)
        try:
            scales = double_quantize(absmax, scale_bits, scale_dtype, group).dequantized
        except ScaleOverflowError:
            errors[members] = float("inf")
            continue
        x = normalize(blocks, scales)
        grid = level_grid(fmt)
        cell = grid.cell_of(x)
        scale_sq = scales.double().square()
        # Blocks whose scale dequantizes to 0 reconstruct as zeros: their error is ‖w‖².
        zero = scales == 0
        zero_scale_error = (blocks[zero].square() * weights[zero]).sum(dtype=torch.float64).item()
        for i in members:
            levels = codebook(fmt, options[i].bits).to(w.device)
            codes = grid.codes(x, options[i].bits, cell).view(-1).int()
            # Squared error divided by the block's scale², per weight.
            sq = (x - levels.index_select(0, codes).view_as(x)).square_().mul_(weights)
            errors[i] = (sq.sum(dim=1, dtype=torch.float64) @ scale_sq).item() + zero_scale_error
    return errors


def error_table(
    weights: Mapping[str, torch.Tensor],
    options: Sequence[QuantConfig],
    fisher: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> ErrorTable:
    """Build the error table of ``weights`` (name → matrix) over ``options``."""
    if not weights:
        raise ValueError("error_table needs at least one weight matrix")
    missing = [] if fisher is None else sorted(set(weights) - set(fisher))
    if missing:
        raise ValueError(f"fisher has no entry for matrices {missing}")
    empty = {name: tuple(w.shape) for name, w in weights.items() if w.numel() == 0}
    if empty:
        raise ValueError(f"weight matrices without elements (name: shape): {empty}")
    rows = [
        matrix_errors(w, options, None if fisher is None else fisher[name])
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
) -> ErrorTable:
    """The error table over ``config_space(fmt)``, computed once and cached on disk.

    The cache file is keyed by ``model_key``, the format, whether Fisher weighting is used, and
    a content hash of the weights (and Fisher), so a changed model never reuses a stale table.
    A cache file that cannot be read, or that holds a table for other matrices or options, is
    moved aside to ``<name>.corrupt`` with a warning and the table is rebuilt. Concurrent
    builders each write their own temporary file and atomically replace the entry.
    """
    safe_key = model_key.replace("/", "--")
    tag = "fisher-" + fingerprint(fisher) if fisher is not None else "plain"
    path = Path(cache_dir) / f"{safe_key}-{fmt}-{tag}-{fingerprint(weights)}.pt"
    options = config_space(fmt)
    if path.exists():
        table = _load_cached(path, weights, options)
        if table is not None:
            return table
    table = error_table(weights, options, fisher, progress)
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
    batch holds ``labels``). Gradients of the listed weights are enabled for the duration.
    """
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    flags = {name: p.requires_grad for name, p in weights.items()}
    count = 0
    try:
        for p in weights.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
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
