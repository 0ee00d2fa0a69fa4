"""Training-memory estimate of CoA-LoRA on causal LMs, from each model's architecture alone.

Builds each model on the meta device (no weights are read or downloaded), finds its target
matrices as a run does, and adds up what a training step holds:

- frozen weights: every other parameter at the model's dtype, and the target matrices as the
  method stores them (``dense`` master at the model's dtype, ``int8`` master at 8.625 bits per
  weight, or ``packed`` codes of one 4.127-bit NF4 configuration for ``qlora``/``lqlora``);
- quantized weights: the bounded cache of packed weights (``--cache-gib``, none for
  ``packed``) and one transient dense matrix (the largest target) being multiplied; no dense
  copy is saved for the backward pass;
- LoRA factors and θ in fp32 with their gradients and AdamW's two moments (4 copies);
- activations of one configuration's graph (each is back-propagated before the next): per
  block and token ``(34 h + 5 a s) · bytes`` without checkpointing
  (Korthikanti et al., 2022, for a transformer block at 2-byte precision, scaled to the
  dtype), ``h · bytes`` per block with it plus one block's full activations;
- logits and their softmax gradient: ``2 · tokens · V`` fp32 values.

It prints a table and writes ``memory_estimate.csv`` under ``--out``. The architectures are
the published configurations of each model (hidden size, layers, heads, vocabulary).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_quant import print_table, write_csv
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from coalora.model.config_net import ConfigAwareNetwork
from coalora.model.layers import INT8_MASTER
from coalora.model.targets import MODULE_TYPES, find_targets, num_blocks

GIB = 2**30
NF4_BITS = 4.127
"""QLoRA's NF4 with double quantization, (4, 8, fp32, 64, 256), in bits per weight."""
ARCHITECTURES = {
    "SmolLM2-135M": LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-1.5B": Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Llama-2-7b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def estimate(
    name: str,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    rank: int,
    cache_gib: float,
    checkpointing: bool,
    storage: str = "dense",
) -> dict[str, object]:
    config = ARCHITECTURES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    width = torch.empty((), dtype=dtype).element_size()
    targets = find_targets(model)
    shapes = [model.get_submodule(t.name).weight.shape for t in targets]
    target_numel = sum(o * i for o, i in shapes)
    stored_bits = {"dense": 8 * width, "int8": INT8_MASTER.bits_per_param, "packed": NF4_BITS}
    weights = (sum(p.numel() for p in model.parameters()) - target_numel) * width
    weights += target_numel * stored_bits[storage] / 8
    cache = 0.0 if storage == "packed" else cache_gib * GIB
    dequantized = cache + max(o * i for o, i in shapes) * width
    theta = sum(
        p.numel()
        for p in ConfigAwareNetwork(rank, len(MODULE_TYPES), num_blocks(targets)).parameters()
    )
    trainable = (sum(rank * (o + i) for o, i in shapes) + theta) * 4 * 4
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    tokens = batch * seq
    block_activations = tokens * (34 * h + 5 * a * seq) * width / 2
    activations = (
        tokens * h * width * layers + block_activations
        if checkpointing
        else block_activations * layers
    )
    logits = 2 * tokens * config.vocab_size * 4
    total = weights + dequantized + trainable + activations + logits
    return {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "storage": storage,
        "checkpointing": checkpointing,
        "batch x seq": f"{batch} x {seq}",
        "weights_gib": weights / GIB,
        "quantized_gib": dequantized / GIB,
        "trainable_gib": trainable / GIB,
        "activations_gib": activations / GIB,
        "logits_gib": logits / GIB,
        "total_gib": total / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/memory_estimate"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache-gib", type=float, default=0.5)
    args = parser.parse_args()
    settings = [
        ("SmolLM2-135M", torch.float32, 8, 128, False),  # as the SmolLM2 comparison runs
        ("Qwen2.5-1.5B", torch.bfloat16, 8, 512, False),
        ("Qwen2.5-1.5B", torch.bfloat16, 8, 512, True),
        ("Llama-2-7b", torch.bfloat16, 4, 512, False),
        ("Llama-2-7b", torch.bfloat16, 4, 512, True),
    ]
    rows = [
        estimate(name, dtype, batch, seq, args.rank, args.cache_gib, checkpointing, storage)
        for name, dtype, batch, seq, checkpointing in settings
        for storage in ("dense", "int8", "packed")
    ]
    formats = {k: ".2f" for k in rows[0] if k.endswith("_gib")}
    print_table("Estimated training memory per step (GiB)", rows, formats)
    write_csv(args.out / "memory_estimate.csv", rows)


if __name__ == "__main__":
    main()
