"""A finished fit's result on disk (``<fit folder>/fit_result.pt``), so that a run stopped
between its fits (a per-budget method trains one per budget) resumes with the fits it has not
finished.

The file holds plain values and tensors only (read with ``weights_only=True``) and the fit's
settings (:func:`fit_settings`): a result is reused only by a fit with the same settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from coalora.evaluation.report import EvalRecord
from coalora.io import atomic_write, load_torch_file
from coalora.methods import TrainingRun
from coalora.selection import EvalConfig
from coalora.summary import RunResult

FIT_RESULT = "fit_result.pt"
FORMAT = 1
"""Version of the file's layout; a file of another version is refused, naming it."""
IGNORED = ("paths", "logger", "ckpt_path")
"""Settings that do not change what a fit computes: where it writes, what it logs to, and the
checkpoint it resumed from (a resume is exact)."""
RESOLVED_DEFAULTS = {("method", "residual_rank"): ("residual_ranks", 0)}
"""Settings recorded at their resolved value, less the table they look it up in, and left out
at the default that results saved before the setting existed had."""


def fit_settings(cfg: DictConfig, run: TrainingRun) -> dict[str, Any]:
    """What a saved result must match: the configuration less :data:`IGNORED`, interpolations
    unresolved (so a folder moved to another machine or environment still matches: paths
    built from ``${paths.output_dir}``, ``${package_path:...}`` or ``${oc.env:...}`` compare as
    written). A per-budget fit depends on its own budget only, not on the run's list."""
    settings = OmegaConf.to_container(cfg, resolve=False)
    for key in IGNORED:
        settings.pop(key, None)
    for (group, key), (table, default) in RESOLVED_DEFAULTS.items():
        section = settings.get(group, {})
        section.pop(table, None)
        if key in section:
            section[key] = cfg[group][key]
            if section[key] == default:
                del section[key]
    if run.budget is not None:
        settings["eval"] = {**settings.get("eval", {}), "budgets": [run.budget]}
        settings["eval"].pop("val_budgets", None)
    return settings


def save_fit_result(folder: str | Path, settings: dict[str, Any], result: RunResult) -> Path:
    """Write ``result`` and the fit's ``settings`` to ``folder/fit_result.pt``."""
    fields = dataclasses.asdict(result)  # nested dataclasses become dicts too
    fields["examples"] = [None if e is None else torch.from_numpy(e) for e in result.examples]
    payload = {"format": FORMAT, "settings": settings, "result": fields}
    return atomic_write(Path(folder) / FIT_RESULT, lambda tmp: torch.save(payload, tmp))


def load_fit_result(folder: str | Path, settings: dict[str, Any]) -> RunResult | None:
    """The result saved in ``folder`` (None when there is none); raises a ValueError naming the
    file and the settings that differ when it was trained with other ``settings``."""
    path = Path(folder) / FIT_RESULT
    if not path.is_file():
        return None
    payload = load_torch_file(path, str(path), "fit result")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(
            f"{path}: a fit result of format {found!r}, not {FORMAT}; remove that fit's "
            "folder to train it again"
        )
    differ = differing_keys(payload["settings"], settings)
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ValueError(
            f"{path} holds a fit trained with other settings ({shown}); run in another "
            "folder (hydra.run.dir=...) or remove that fit's folder to train it again"
        )
    try:
        return _result(payload["result"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable fit result ({err})") from None


def _result(fields: dict[str, Any]) -> RunResult:
    fields = dict(fields)
    run = fields["run"]
    fields["run"] = TrainingRun(
        **{**run, "train_configs": [tuple(c) for c in run["train_configs"]]}
    )
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


def stopped_attempt(folder: str | Path) -> Path | None:
    """The ``last.ckpt`` a stopped attempt at this fit left in ``folder`` (no result saved),
    or None."""
    last = Path(folder) / "checkpoints" / "last.ckpt"
    return last if last.is_file() and not (Path(folder) / FIT_RESULT).is_file() else None
