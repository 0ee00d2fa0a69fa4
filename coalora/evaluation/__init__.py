"""Evaluation outputs: result records, files, plots, tables and hypervolume summaries."""

from coalora.evaluation.report import (
    EvalRecord,
    plot_metric_vs_bits,
    read_configurations,
    read_results,
    results_table,
    summarize,
    write_configurations,
    write_results,
)

__all__ = [
    "EvalRecord",
    "plot_metric_vs_bits",
    "read_configurations",
    "read_results",
    "results_table",
    "summarize",
    "write_configurations",
    "write_results",
]
