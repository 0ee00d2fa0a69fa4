"""Upper reference: the same LoRA training on the unquantized model.

Same backbone, data, rank, optimizer, batches and epochs as a coalora run, but every target
layer keeps its full-precision weight and there is no configuration-aware network. Prints the
test metric and writes it to JSON.

    python experiments/reference_lora.py task=sst2 task.data_dir=/data/glue \\
        data.max_train_samples=8000 data.max_length=64 trainer.max_epochs=2
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import coalora.run  # noqa: F401  (registers the package_path resolver)
from coalora.data import TaskSpec, TextClassificationDataModule, build_metric
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_classifier

CONF = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def evaluate(model: QuantizedLoRAModel, loader, metric) -> float:
    model.eval()
    for batch in loader:
        metric.update(model.model(**batch).logits.argmax(-1), batch["labels"])
    return metric.compute().item()


def main(overrides: list[str]) -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, "method.config_aware=false", "paths.output_dir=."]
        )
    torch.manual_seed(cfg.seed)
    task = TaskSpec(**OmegaConf.to_container(cfg.task, resolve=True))
    data = TextClassificationDataModule(task=task, **{
        k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"
    })  # fmt: skip
    data.setup()
    model = QuantizedLoRAModel.from_run_config(
        load_classifier(cfg.model.name_or_path, data.num_labels), cfg
    )
    model.set_unquantized()  # every target keeps its full-precision weight
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.method.optimizer.lr)
    loader = data.train_dataloader()
    start = time.perf_counter()
    for epoch in range(cfg.trainer.max_epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            optimizer.zero_grad()
            model.model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.method.gradient_clip_val)
            optimizer.step()
    seconds = time.perf_counter() - start
    value = evaluate(model, data.test_dataloader(), build_metric(task))
    result = {
        "task": task.name, "model": cfg.model.name, "metric": task.metric, "value": value,
        "train_seconds": seconds, "epochs": cfg.trainer.max_epochs, "seed": cfg.seed,
        "train_samples": len(data.split("train")), "test_samples": len(data.split("test")),
        "rank": cfg.method.rank, "lr": cfg.method.optimizer.lr,
    }  # fmt: skip
    out = Path("experiments/results") / f"reference_lora_{task.name}_seed{cfg.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
