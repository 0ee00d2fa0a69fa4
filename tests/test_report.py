"""Evaluation outputs: result files, plot, markdown table and summaries."""

import json

import pytest

from coalora.evaluation import (
    EvalRecord,
    plot_metric_vs_bits,
    read_results,
    results_table,
    summarize,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def records() -> list[EvalRecord]:
    return [
        EvalRecord("coalora", "unseen", 3.0, 3.02, "accuracy", 0.8, loss=0.41, num_samples=872),
        EvalRecord("coalora", "unseen", 4.0, 3.98, "accuracy", 0.9, num_samples=872),
        EvalRecord("coalora", "seen", 3.0, 2.99, "accuracy", 0.85, config_id="c-17"),
        EvalRecord("qlora", "unseen", 3.0, 3.0, "accuracy", 0.75, loss=0.5),
        EvalRecord("qlora", "unseen", 4.0, 4.0, "accuracy", 0.9),
        EvalRecord("qlora", "unseen", 2.5, 2.5, "accuracy", 0.123456789),
    ]


def test_write_and_read_round_trip(records, tmp_path):
    csv_path, json_path = write_results(records, tmp_path / "eval")
    assert (csv_path, json_path) == (tmp_path / "eval/results.csv", tmp_path / "eval/results.json")
    header = csv_path.read_text().splitlines()[0]
    assert header == "method,split,target_budget,avg_bits,metric,value,loss,num_samples,config_id"
    assert len(json.loads(json_path.read_text())) == len(records)
    assert read_results(csv_path) == records
    assert read_results(json_path) == records


def test_read_results_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="results.txt"):
        read_results(tmp_path / "results.txt")


def test_record_rejects_unknown_split():
    with pytest.raises(ValueError, match="'test'"):
        EvalRecord("qlora", "test", 3.0, 3.0, "accuracy", 0.5)


def test_plot_is_a_png(records, tmp_path):
    path = plot_metric_vs_bits(records, tmp_path / "plots/acc.png", title="SST-2")
    data = path.read_bytes()
    assert path == tmp_path / "plots/acc.png"
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_rejects_mixed_metrics(records, tmp_path):
    mixed = [*records, EvalRecord("qlora", "seen", 3.0, 3.0, "f1", 0.5)]
    with pytest.raises(ValueError, match="f1"):
        plot_metric_vs_bits(mixed, tmp_path / "acc.png")


def test_results_table(records):
    assert results_table(records).splitlines() == [
        "| budget | coalora/unseen | coalora/seen | qlora/unseen |",
        "|---|---|---|---|",
        "| 2.5 | - | - | 0.1235 |",
        "| 3 | 0.8000 | 0.8500 | 0.7500 |",
        "| 4 | 0.9000 | - | 0.9000 |",
    ]


def test_results_table_rejects_duplicate_budget(records):
    with pytest.raises(ValueError, match="qlora/unseen .* 4.0"):
        results_table([*records, EvalRecord("qlora", "unseen", 4.0, 4.01, "accuracy", 0.8)])


def test_summarize(records):
    summary = summarize(records)
    assert set(summary) == {"coalora", "qlora"}
    assert summary["coalora"]["values"] == {3.0: 0.8, 4.0: 0.9}
    # 0.8 over bits [3.02, 3.98), 0.9 over [3.98, 8], normalised by 6.
    assert summary["coalora"]["hv"] == pytest.approx(((3.98 - 3.02) * 0.8 + 4.02 * 0.9) / 6)
    # Each point's value holds from its bits up to the next point's bits.
    expected = (0.5 * 0.123456789 + 1.0 * 0.75 + 4.0 * 0.9) / 6
    assert summary["qlora"]["hv"] == pytest.approx(expected)
    seen = summarize(records, split="seen")
    assert seen == {"coalora": {"hv": pytest.approx(5.01 / 6 * 0.85), "values": {3.0: 0.85}}}


def test_summarize_rejects_unknown_split(records):
    with pytest.raises(ValueError, match="'dev'"):
        summarize(records, split="dev")
