"""Target linear layers of a Hugging Face transformer: which matrices get quantized and adapted.

A target is an ``nn.Linear`` inside a transformer block (``...layer.N...`` in BERT/RoBERTa,
``...layers.N...`` in LLaMA/Qwen/Mistral) whose path within the block is listed in
:data:`MODULE_TYPE_TABLE`. Classifier heads, poolers and embeddings sit outside the blocks and
are never targets. Supporting a new architecture means adding rows to the tables, not code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

MODULE_TYPES: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attn_out",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
"""The distinct module types, in a fixed order (their index is the module-type id of θ)."""

BLOCK_CONTAINERS: tuple[str, ...] = ("layer", "layers")
"""Path components whose next component is the block index (``encoder.layer.3``, ``layers.3``)."""

MODULE_TYPE_TABLE: dict[str, str] = {
    # BERT / RoBERTa: encoder.layer.N.<path>
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    # LLaMA / Qwen / Mistral: model.layers.N.<path>
    "self_attn.q_proj": "query",
    "self_attn.k_proj": "key",
    "self_attn.v_proj": "value",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""A module's full path within its block → its module type; matched exactly, never by suffix
(BERT's ``attention.output.dense`` and ``output.dense`` are different types)."""

_unknown = sorted(set(MODULE_TYPE_TABLE.values()) - set(MODULE_TYPES))
if _unknown:
    raise ImportError(f"MODULE_TYPE_TABLE uses module types {_unknown} missing from MODULE_TYPES")


@dataclass(frozen=True)
class Target:
    """One target matrix.

    Attributes:
        name: full module name, e.g. ``"bert.encoder.layer.3.attention.self.query"``.
        module_type: one of :data:`MODULE_TYPES`.
        block_index: the block (transformer layer) number N.
    """

    name: str
    module_type: str
    block_index: int


def parse_module_name(name: str) -> tuple[int, str] | None:
    """``(block_index, path within the block)`` of a module name, or ``None`` outside blocks.

    The block is the first ``<container>.<N>`` pair with ``container`` in
    :data:`BLOCK_CONTAINERS` and ``N`` a non-negative integer.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in BLOCK_CONTAINERS and parts[i + 1].isdigit():
            return int(parts[i + 1]), ".".join(parts[i + 2 :])
    return None


def _check_module_types(module_types: Iterable[str]) -> set[str]:
    wanted = set(module_types)
    if not wanted:
        raise ValueError(f"module_types is empty; choose from {MODULE_TYPES}")
    unknown = sorted(wanted - set(MODULE_TYPES))
    if unknown:
        raise ValueError(f"unknown module_types {unknown}; choose from {MODULE_TYPES}")
    return wanted


def find_targets(model: nn.Module, module_types: Sequence[str] | None = None) -> list[Target]:
    """The target linear layers of ``model``, in module order.

    Args:
        model: a Hugging Face transformer (or any module with the same naming).
        module_types: keep only these types (default: every type in :data:`MODULE_TYPES`).

    Raises:
        ValueError: if ``module_types`` is empty or names an unknown type, or if the model has
            no target of the requested types.
    """
    wanted = set(MODULE_TYPES) if module_types is None else _check_module_types(module_types)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parsed = parse_module_name(name)
        if parsed is None:
            continue
        block_index, path = parsed
        module_type = MODULE_TYPE_TABLE.get(path)
        if module_type in wanted:
            targets.append(Target(name, module_type, block_index))
    if not targets:
        requested = "" if module_types is None else f" of types {sorted(wanted)}"
        raise ValueError(
            f"{type(model).__name__} has no target linear layers{requested}: expected nn.Linear "
            f"modules under {'/'.join(BLOCK_CONTAINERS)}.N with a path in MODULE_TYPE_TABLE "
            f"({sorted(MODULE_TYPE_TABLE)})"
        )
    return targets


def num_blocks(targets: Sequence[Target]) -> int:
    """Number of blocks the targets span: the largest block index plus one."""
    if not targets:
        raise ValueError("num_blocks needs at least one target")
    return max(t.block_index for t in targets) + 1


def target_weights(model: nn.Module, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """Name → weight (detached, sharing storage) of each target layer of ``model``."""
    weights = {}
    for target in targets:
        module = model.get_submodule(target.name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"target {target.name!r} ({type(module).__name__}) has no weight")
        weights[target.name] = weight.detach()
    return weights
