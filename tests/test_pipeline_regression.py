"""The demo-sized pipeline reproduces, byte for byte, the results recorded before the package
was restructured (method objects, configuration space, thin entry point)."""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from coalora.run import train

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "data" / "demo_fast_results.csv"
"""``eval/results.csv`` of ``python -m coalora.run experiment=demo debug=fast`` (seed 0, one
thread: float sums in matrix products depend on the number of threads)."""


def test_demo_sized_pipeline_reproduces_the_recorded_results(tmp_path):
    overrides = ["experiment=demo", "debug=fast", f"paths.output_dir={tmp_path}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            train(compose("train", overrides=overrides))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "eval" / "results.csv").read_text() == RECORDED.read_text()
