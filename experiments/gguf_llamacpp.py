"""llama.cpp against coalora on GGUF exports of one ``quant=gguf`` run (``make gguf-check``).

Trains ``experiment=gguf_smollm2`` once (SmolLM2-135M on WikiText-2 over llama.cpp's types)
unless ``--run-dir`` names a finished run, exports it at each ``--bits`` with
``python -m coalora.export ... format=gguf``, and scores the run's test blocks three ways:
coalora's served model of that configuration (``Deployment.at``), llama.cpp (llama-cpp-python)
on the base GGUF with the adapter GGUF, and llama.cpp on the base alone. Every finished budget
is written to ``results.json`` at once and skipped on a rerun. Writes ``results.json``,
``results.md`` and ``perplexity.png`` to ``--out``. SmolLM2 ships as a Q4_1 GGUF file: its
weights were already 4-bit before coalora quantizes them.

    python experiments/gguf_llamacpp.py --bits 4.25 5 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.evaluation.llamacpp import compare_export, import_llama_cpp  # noqa: E402
from coalora.serve import Deployment  # noqa: E402
from coalora.serve.gguf_export import ADAPTER_FILE, MODEL_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "gguf_smollm2"
TOLERANCE = 0.02


def train_run(run_dir: Path, overrides: Sequence[str]) -> None:
    command = [sys.executable, "-m", "coalora.run", "experiment=gguf_smollm2"]
    command += [f"paths.output_dir={run_dir}", *overrides]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def export(run_dir: Path, bits: float) -> Path:
    folder = run_dir / "exports" / f"bits_{bits:g}_gguf"
    if not (folder / "manifest.json").is_file():
        command = [sys.executable, "-m", "coalora.export", f"run_dir={run_dir}", f"bits={bits}"]
        subprocess.run([*command, "format=gguf", f"out={folder}"], check=True, cwd=ROOT)
    return folder


def write_report(out: Path, rows: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    lines = [
        "# llama.cpp runs coalora's GGUF exports: SmolLM2-135M, WikiText-2",
        "",
        f"Command: `{setup['command']}`. Run: `{setup['run_dir']}` (`experiment=gguf_smollm2`"
        f"{', ' + ' '.join(setup['overrides']) if setup['overrides'] else ''}). SmolLM2 ships "
        "as a Q4_1 GGUF file: its weights were already 4-bit before coalora quantizes them. "
        f"Test: {rows[0]['blocks']} blocks of {rows[0]['block_tokens']} tokens, each scored "
        f"from an empty context. llama-cpp-python {setup['llama_cpp']}, {setup['threads']} "
        "threads.",
        "",
        "| bits asked | avg bits | types | model.gguf (MB) | adapter.gguf (MB) | coalora ppl "
        "| llama.cpp + adapter ppl | difference | llama.cpp base ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = {k: v / 1e6 for k, v in r["file_bytes"].items()}
        lines.append(
            f"| {r['bits']:g} | {r['avg_bits']:.3f} | {' '.join(r['types'])} "
            f"| {mb[MODEL_FILE]:.1f} | {mb[ADAPTER_FILE]:.2f} | {r['coalora_perplexity']:.3f} "
            f"| {r['llamacpp_perplexity']:.3f} | {100 * r['relative_difference']:+.2f} % "
            f"| {r['llamacpp_base_perplexity']:.3f} |"
        )
    within = all(abs(r["relative_difference"]) <= TOLERANCE for r in rows)
    better = all(r["llamacpp_perplexity"] < r["llamacpp_base_perplexity"] for r in rows)
    lines += [
        "",
        f"- llama.cpp with the adapter within {100 * TOLERANCE:g} % of coalora at every "
        f"budget: {'yes' if within else 'no'}",
        f"- llama.cpp with the adapter below llama.cpp without it at every budget: "
        f"{'yes' if better else 'no'}",
        "",
        "![perplexity](perplexity.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    bits = [r["avg_bits"] for r in rows]
    for key, label, style in (
        ("coalora_perplexity", "coalora (same configuration)", "o-"),
        ("llamacpp_perplexity", "llama.cpp + adapter", "s--"),
        ("llamacpp_base_perplexity", "llama.cpp, base only", "^:"),
    ):
        ax.plot(bits, [r[key] for r in rows], style, label=label)
    ax.set_xlabel("average bits per target weight")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title("SmolLM2-135M GGUF exports")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("outputs/gguf_smollm2"))
    parser.add_argument("--bits", type=float, nargs="+", default=[4.25, 5.0, 6.0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training run")
    args = parser.parse_args(argv)
    llama_cpp = import_llama_cpp()  # before training: names the install target if missing
    run_dir = args.run_dir.resolve()
    shown = str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir)
    if not (run_dir / "summary.json").is_file():
        train_run(run_dir, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done = {r["bits"]: r for r in saved.get("rows", []) if saved.get("run_dir") == shown}
    dep = Deployment.from_run(run_dir)
    setup = {
        "command": " ".join(["python experiments/gguf_llamacpp.py", *sys.argv[1:]]),
        "run_dir": shown,
        "overrides": args.overrides,
        "llama_cpp": llama_cpp.__version__,
        "threads": args.threads,
    }
    for bits in args.bits:
        if bits not in done:
            scores = compare_export(dep, export(run_dir, bits), args.threads)
            done[bits] = {"bits": bits, **scores}
            rows = [done[b] for b in sorted(done)]
            results_path.write_text(json.dumps({**setup, "rows": rows}, indent=1))
            print(json.dumps(done[bits], indent=1), flush=True)
    rows = [done[b] for b in sorted(done) if b in args.bits]
    write_report(args.out, rows, setup)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
