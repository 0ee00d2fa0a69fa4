"""Diagonal empirical Fisher: the per-weight weights of a Fisher-weighted error table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def diagonal_fisher(
    model: torch.nn.Module,
    weights: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean squared gradient of the loss for each weight.

    ``model(**batch)`` must return an object with a ``loss`` (Hugging Face models do when the
    batch holds ``labels``); the batches' tensors are moved to the weights' device. Gradients
    of the listed weights are enabled for the duration.
    """
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    flags = {name: p.requires_grad for name, p in weights.items()}
    device = next((p.device for p in weights.values()), None)
    count = 0
    try:
        for p in weights.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            model(**batch).loss.backward()
            for name, p in weights.items():
                sums[name] += p.grad.float().square()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in weights.items():
            p.requires_grad_(flags[name])
    if count == 0:
        raise ValueError("diagonal_fisher got no batches")
    return {name: s / count for name, s in sums.items()}
