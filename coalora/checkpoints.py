"""Reading checkpoints: safely, and checked against the identity a resumed run must match (the
one place checkpoints are read; :mod:`coalora.checkpoint_io` writes them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coalora.io import load_torch_file


def read_checkpoint(path: str | Path, prefix: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by coalora, safely: with ``weights_only=True`` (tensors and
    plain values only; a pickled object that would run code on load is refused unloaded).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a folder, an empty,
    truncated or foreign file, and one without coalora's state; messages start with
    ``prefix`` (default: ``ckpt_path=<path>``, with a hint on what to resume from).
    """
    path = Path(path)
    resume = "resume from a run's checkpoints/last.ckpt" if prefix is None else None
    prefix = prefix or f"ckpt_path={path}"
    if not path.exists():
        raise FileNotFoundError(f"{prefix}: no such file" + (f" ({resume})" if resume else ""))
    if not path.is_file():
        raise ValueError(f"{prefix} is a folder; give its checkpoints/last.ckpt")
    if path.stat().st_size == 0:
        raise ValueError(f"{prefix}: the file is empty, not a checkpoint")
    checkpoint = load_torch_file(path, prefix, what="checkpoint")
    missing = [
        key
        for key in ("state_dict", "coalora")
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(key), dict)
    ]
    if missing:
        hint = f"; {resume}" if resume else ""
        raise ValueError(f"{prefix}: not a coalora checkpoint (it lacks {missing}){hint}")
    return checkpoint


def check_identity(checkpoint: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another model, quantization format, method or option space: every
    entry of ``identity`` must equal the one the checkpoint saved."""
    if "coalora" not in checkpoint:
        raise ValueError(
            "the checkpoint was not written by coalora (it has no 'coalora' state); resume "
            "from a run's checkpoints/last.ckpt"
        )
    saved = IDENTITY_DEFAULTS | checkpoint["coalora"].get("identity", {})
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
        for key, value in identity.items()
        if saved.get(key) != value
    ]
    if differences:
        raise ValueError(
            "cannot resume: the checkpoint was trained with other settings ("
            + "; ".join(differences)
            + "); resume with the checkpoint's settings or start a new run"
        )


def finished_epochs(path: str | Path) -> int:
    """The number of epochs a checkpoint written by Lightning at an epoch end holds."""
    return read_checkpoint(path)["epoch"] + 1


IDENTITY_DEFAULTS = {"residual_rank": 0}
"""Identity entries that older checkpoints do not record, at the value they were trained with."""


def run_identity(
    model: str,
    task: str,
    quant: str,
    method: str,
    rank: int,
    alpha: float,
    residual_rank: int = 0,
    **sizes: int,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (see :func:`check_identity`): model, task,
    quantization format, method, rank, alpha and residual rank, and with a built model the
    size of its option space and its number of target matrices (``options=``, ``targets=``)."""
    identity = {
        "model": model,
        "task": task,
        "quant": quant,
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "residual_rank": residual_rank,
    }
    return identity | sizes
