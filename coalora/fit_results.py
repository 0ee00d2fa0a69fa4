"""A finished fit's result on disk (``<fit folder>/fit_result.pt``), so that a run stopped
between the fits of a per-budget method resumes with the fits it has not finished.

The file holds plain values and tensors only (read with ``weights_only=True``) and the fit's
resolved configuration: a result is reused only by a run with the same settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from coalora.evaluation.report import EvalRecord
from coalora.io import atomic_write, load_torch_file
from coalora.methods import TrainingRun
from coalora.selection import EvalConfig
from coalora.summary import RunResult

FIT_RESULT = "fit_result.pt"


def save_fit_result(folder: str | Path, config: dict[str, Any], result: RunResult) -> Path:
    """Write ``result`` and the fit's resolved ``config`` to ``folder/fit_result.pt``."""
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fields["run"] = dataclasses.asdict(result.run)
    fields["configs"] = [dataclasses.asdict(c) for c in result.configs]
    fields["records"] = [dataclasses.asdict(r) for r in result.records]
    fields["validation"] = [dataclasses.asdict(r) for r in result.validation]
    fields["examples"] = [None if e is None else torch.from_numpy(e) for e in result.examples]
    payload = {"config": config, "result": fields}
    return atomic_write(Path(folder) / FIT_RESULT, lambda tmp: torch.save(payload, tmp))


def load_fit_result(folder: str | Path, config: dict[str, Any]) -> RunResult | None:
    """The result saved in ``folder`` (None when there is none); raises a ValueError naming the
    settings that differ when it was trained with another ``config``."""
    path = Path(folder) / FIT_RESULT
    if not path.is_file():
        return None
    payload = load_torch_file(path, str(path), "fit result")
    differ = sorted(differing_keys(payload["config"], config))
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ValueError(
            f"{path} holds a fit trained with other settings ({shown}); run in another "
            "folder (hydra.run.dir=...) or remove that fit's folder to train it again"
        )
    fields = dict(payload["result"])
    run = fields["run"]
    configs = [tuple(c) for c in run["train_configs"]]
    fields["run"] = TrainingRun(run["name"], configs, run["budget"])
    fields["configs"] = [
        EvalConfig(**{**c, "choice": tuple(c["choice"])}) for c in fields["configs"]
    ]
    fields["records"] = [EvalRecord(**r) for r in fields["records"]]
    fields["validation"] = [EvalRecord(**r) for r in fields["validation"]]
    fields["examples"] = [None if e is None else e.numpy() for e in fields["examples"]]
    return RunResult(**{**fields, "loaded": True})


def differing_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configurations."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            key
            for name in sorted(set(saved) | set(current), key=str)
            for key in differing_keys(
                saved.get(name), current.get(name), f"{prefix}.{name}" if prefix else str(name)
            )
        ]
    return [] if saved == current else [prefix or "<configuration>"]
