"""Perplexity of a GGUF export as llama.cpp computes it (through llama-cpp-python).

Optional: llama-cpp-python is built from its source package with the CPU backend by
``make install-llamacpp``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from coalora.data.factory import build_datamodule, build_metric, build_task
from coalora.evaluation.evaluate import score_model

if TYPE_CHECKING:
    from coalora.serve.deployment import Deployment

INSTALL_HINT = "install it with `make install-llamacpp` (builds llama-cpp-python's CPU backend)"


def import_llama_cpp():
    """The ``llama_cpp`` module, or an ImportError naming the install target."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from err
    return llama_cpp


def llamacpp_perplexity(
    model_path: str | Path,
    blocks: Sequence[Sequence[int]],
    lora_path: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> float:
    """``exp`` of the mean negative log-likelihood that llama.cpp gives each next token of
    ``blocks`` (token-id blocks, each scored from an empty context as coalora scores its test
    blocks), with the LoRA adapter ``lora_path`` applied when given."""
    llama_cpp = import_llama_cpp()
    if not blocks or any(len(b) < 2 for b in blocks):
        raise ValueError("llamacpp_perplexity needs blocks of at least 2 tokens")
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=None if lora_path is None else str(lora_path),
        n_ctx=max(len(b) for b in blocks),
        n_batch=max(len(b) for b in blocks),
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    total, count = 0.0, 0
    for block in tqdm(blocks, desc="llama.cpp perplexity", disable=not progress):
        llm.reset()
        llm.eval(list(block))
        logits = np.asarray(llm.scores[: len(block) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        targets = np.asarray(block[1:])
        total += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    llm.close()
    return math.exp(total / count)


def run_test_batches(run_config: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """A run's test batches, as its evaluation batches them."""
    data = {k: v for k, v in run_config["data"].items() if k != "_target_"}
    datamodule = build_datamodule(run_config["task"], **data)
    datamodule.setup("test")
    return list(datamodule.test_dataloader())


def compare_export(
    dep: Deployment, folder: str | Path, threads: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Perplexity of a GGUF export's configuration on its run's test blocks: coalora's served
    model (``Deployment.at``), llama.cpp on the base GGUF with the adapter, and without it."""
    from coalora.serve.gguf_export import ADAPTER_FILE, MODEL_FILE

    folder = Path(folder)
    summary = json.loads((folder / "quantization.json").read_text())
    batches = run_test_batches(dep.config)
    task = build_task(dep.config["task"])
    start = time.perf_counter()
    served = dep.at(config=summary["choice"])
    coalora = score_model(served, batches, build_metric(task), task.metric_inputs).value
    coalora_s = time.perf_counter() - start
    blocks = [row.tolist() for batch in batches for row in batch["input_ids"]]
    model, adapter = folder / MODEL_FILE, folder / ADAPTER_FILE
    start = time.perf_counter()
    with_adapter = llamacpp_perplexity(model, blocks, adapter, threads, progress)
    llamacpp_s = time.perf_counter() - start
    return {
        "avg_bits": summary["avg_bits"],
        "config_id": summary["config_id"],
        "file_bytes": summary["file_bytes"],
        "types": sorted({m["config"]["type_name"] for m in summary["matrices"].values()}),
        "blocks": len(blocks),
        "block_tokens": len(blocks[0]),
        "coalora_perplexity": coalora,
        "llamacpp_perplexity": with_adapter,
        "llamacpp_base_perplexity": llamacpp_perplexity(model, blocks, None, threads, progress),
        "relative_difference": with_adapter / coalora - 1,
        "coalora_s": coalora_s,
        "llamacpp_s": llamacpp_s,
    }
