"""What a run writes after evaluation: result files, a metric-vs-bits plot, tables, summaries.

Plain functions over :class:`EvalRecord` rows; no Lightning. Plots use
matplotlib's Agg canvas directly, so no display or global backend is needed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coalora.io import atomic_write, atomic_write_text
from coalora.pareto import normalized_hypervolume
from coalora.selection import EvalConfig

Split = Literal["seen", "unseen"]
SPLITS: tuple[str, ...] = ("seen", "unseen")
PLOT_DPI = 120
"""Resolution of saved plots."""
CSV_NAME, JSON_NAME = "results.csv", "results.json"
LOG_SCALE_METRICS = {"perplexity"}
"""Metrics plotted on a log scale (a broken low-bit configuration reaches millions)."""
CONFIGURATIONS_NAME = "configurations.json"
"""Beside the results: every scored configuration by ``config_id`` (option indices, bits)."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluated configuration.

    Args:
        method: method name, e.g. ``"coalora"`` or ``"qlora"``.
        split: ``"seen"`` (a training configuration) or ``"unseen"``.
        target_budget: average bit-width the configuration was allocated for.
        avg_bits: the configuration's actual average bits per parameter.
        metric: the metric's name, e.g. ``"accuracy"``.
        value: the metric's value.
        loss: task loss, if measured.
        num_samples: number of evaluation examples.
        config_id: identifier of the quantization configuration.
    """

    method: str
    split: Split
    target_budget: float
    avg_bits: float
    metric: str
    value: float
    loss: float | None = None
    num_samples: int = 0
    config_id: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(EvalRecord))


def write_results(records: Sequence[EvalRecord], out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/results.csv`` and ``out_dir/results.json``, one row per record in order.

    In the CSV a missing ``loss`` is an empty cell. Creates ``out_dir``.

    Returns:
        The CSV and JSON paths.
    """
    rows = [dataclasses.asdict(r) for r in records]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return (
        atomic_write_text(Path(out_dir) / CSV_NAME, text.getvalue()),
        atomic_write_text(Path(out_dir) / JSON_NAME, json.dumps(rows, indent=2) + "\n"),
    )


def write_configurations(configs: Sequence[EvalConfig], out_dir: Path) -> Path:
    """Write ``out_dir/configurations.json``: ``{config_id: {"choice": [...], "avg_bits": b}}``,
    so any results row can be served or exported later by its ``config_id``."""
    table = {c.config_id: {"choice": list(c.choice), "avg_bits": c.avg_bits} for c in configs}
    return atomic_write_text(Path(out_dir) / CONFIGURATIONS_NAME, json.dumps(table, indent=1))


def read_configurations(out_dir: Path) -> dict[str, list[int]]:
    """``config_id → option indices`` from :func:`write_configurations`' file ({} if absent)."""
    path = Path(out_dir) / CONFIGURATIONS_NAME
    if not path.exists():
        return {}
    return {key: entry["choice"] for key, entry in json.loads(path.read_text()).items()}


def _record_from_csv_row(row: dict[str, str]) -> EvalRecord:
    return EvalRecord(
        method=row["method"],
        split=row["split"],
        target_budget=float(row["target_budget"]),
        avg_bits=float(row["avg_bits"]),
        metric=row["metric"],
        value=float(row["value"]),
        loss=float(row["loss"]) if row["loss"] else None,
        num_samples=int(row["num_samples"]),
        config_id=row["config_id"],
    )


def read_results(path: Path) -> list[EvalRecord]:
    """Read records back from a ``.csv`` or ``.json`` file written by :func:`write_results`."""
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [_record_from_csv_row(row) for row in csv.DictReader(f)]
    if path.suffix == ".json":
        return [EvalRecord(**row) for row in json.loads(path.read_text())]
    raise ValueError(f"results file must end in .csv or .json, got {path}")


def _series(records: Sequence[EvalRecord]) -> dict[str, list[EvalRecord]]:
    """Records grouped by ``"method/split"``, in order of first appearance."""
    groups: dict[str, list[EvalRecord]] = {}
    for r in records:
        groups.setdefault(f"{r.method}/{r.split}", []).append(r)
    return groups


def _metric_name(records: Sequence[EvalRecord]) -> str:
    names = sorted({r.metric for r in records})
    if len(names) != 1:
        raise ValueError(f"records must share exactly one metric name, got {names}")
    return names[0]


def plot_metric_vs_bits(
    records: Sequence[EvalRecord],
    path: Path,
    title: str = "",
    reference: dict[str, float] | None = None,
) -> Path:
    """Save a PNG of metric against average bits, one line with markers per method and split.

    Args:
        records: records with a single metric name.
        path: the PNG to write (atomically); its folder is created.
        title: optional plot title.
        reference: metric values drawn as dashed horizontal lines, by label.
    """
    metric = _metric_name(records)
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, group in _series(records).items():
        group = sorted(group, key=lambda r: r.avg_bits)
        ax.plot([r.avg_bits for r in group], [r.value for r in group], marker="o", label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="grey", label=f"{label} ({value:.4g})")
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel(metric)
    if metric in LOG_SCALE_METRICS:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=PLOT_DPI, format="png"))


def _by_budget(records: Sequence[EvalRecord]) -> dict[float, float]:
    """``{target_budget: value}``; a budget evaluated twice is an error, not overwritten."""
    values: dict[float, float] = {}
    for r in records:
        if r.target_budget in values:
            raise ValueError(
                f"{r.method}/{r.split} has more than one record at budget {r.target_budget}"
            )
        values[r.target_budget] = r.value
    return values


def results_table(records: Sequence[EvalRecord]) -> str:
    """Markdown table: one row per target budget, one column per ``method/split``.

    Values have 4 decimals; a missing combination is ``-``.
    """
    columns = {label: _by_budget(group) for label, group in _series(records).items()}
    budgets = sorted({r.target_budget for r in records})
    lines = [
        "| budget | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for b in budgets:
        cells = [f"{col[b]:.4f}" if b in col else "-" for col in columns.values()]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def perplexity_score(perplexity: float, vocab_size: int) -> float:
    """``1 − ln(ppl) / ln(V)``: perplexity as a higher-is-better score for the hypervolume (a
    uniform model over the V tokens scores 0, a perfect model 1; a model worse than uniform
    scores below 0 and adds no hypervolume)."""
    if not perplexity >= 1.0:
        raise ValueError(f"perplexity {perplexity} is below 1, which no model can reach")
    return 1.0 - math.log(perplexity) / math.log(vocab_size)


def summarize(
    records: Sequence[EvalRecord],
    split: Split = "unseen",
    score: Callable[[float], float] | None = None,
) -> dict[str, dict]:
    """Per method, over its records of ``split``: hypervolume and value per budget.

    Returns:
        ``{method: {"hv": normalized_hypervolume(avg_bits, scores), "values": {budget: value}}}``
        (HV as defined in :func:`coalora.pareto.normalized_hypervolume`), with
        ``scores`` the values, or ``score(value)`` for metrics not already in [0, 1] with
        higher better (perplexity: :func:`perplexity_score`).
    """
    score = score or (lambda value: value)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    methods: dict[str, list[EvalRecord]] = {}
    for r in records:
        if r.split == split:
            methods.setdefault(r.method, []).append(r)
    return {
        method: {
            "hv": normalized_hypervolume(
                [r.avg_bits for r in group], [score(r.value) for r in group]
            ),
            "values": _by_budget(group),
        }
        for method, group in methods.items()
    }
