"""The configuration-aware network θ: layer configuration → r×r adjustment U."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from coalora.quant import Option, QuantConfig

FIELD_CHOICES: tuple[tuple, ...] = QuantConfig.FIELD_CHOICES
"""The five fields of a :class:`QuantConfig` (b0, b1, b2, B0, B1), each with its choices."""


def field_indices(option: Option) -> list[int]:
    """Positions of an option's five field values among their choices (``FIELD_CHOICES`` of
    its kind: b0…B1 for ``nf``/``int``, a llama.cpp type's layout for ``gguf``)."""
    pairs = zip(type(option).FIELD_CHOICES, option.field_values(), strict=True)
    return [choices.index(v) for choices, v in pairs]


PRECISION_BITS = {"bf16": 8, "fp16": 11, "fp32": 24}
"""Significand bits of the scale dtypes, their value as a number."""


def field_numbers(choices: Sequence) -> torch.Tensor:
    """Each choice of a field as a number in [0, 1]: ``log2(1 + v)`` scaled over the field's
    choices (a dtype by its significand bits, a flag as 0/1), so nearby settings get nearby
    inputs and unseen combinations interpolate."""
    raw = torch.tensor(
        [float(PRECISION_BITS[c]) if isinstance(c, str) else float(c) for c in choices]
    )
    logs = torch.log2(1 + raw)
    spread = logs.max() - logs.min()
    return (logs - logs.min()) / spread if spread > 0 else torch.zeros_like(logs)


class ConfigAwareNetwork(nn.Module):
    """Maps each layer's embedding Q_i to U_θ(Q_i) ∈ R^{r×r}; shared by all layers.

    Q_i concatenates learned embeddings of the five fields of the layer's option (the
    quantization settings of ``nf``/``int``; code bits, scale bits, sub-block and super-block
    size and whether minimums are stored for a llama.cpp type), the module type and
    the block index. θ is LayerNorm → Linear → SiLU → Linear(r²); the last layer starts at
    zero so that U = 0 and the model begins as plain LoRA.

    Args:
        rank: LoRA rank r.
        num_module_types: size of the module-type table.
        num_blocks: size of the block-index table (the model's number of blocks).
        embed_dim: width of each embedding.
        hidden_dim: width of the hidden layer.
        field_choices: the choices of each option field (``FIELD_CHOICES`` of the option kind).
        numeric_inputs: append each field's value as a number (:func:`field_numbers`) to
            the embeddings.
    """

    def __init__(
        self,
        rank: int,
        num_module_types: int,
        num_blocks: int,
        embed_dim: int = 16,
        hidden_dim: int = 256,
        field_choices: tuple[tuple, ...] = FIELD_CHOICES,
        numeric_inputs: bool = False,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.numeric_inputs = numeric_inputs
        for i, choices in enumerate(field_choices):
            self.register_buffer(f"numbers_{i}", field_numbers(choices), persistent=False)
        self.field_embeddings = nn.ModuleList(
            nn.Embedding(len(choices), embed_dim) for choices in field_choices
        )
        self.type_embedding = nn.Embedding(num_module_types, embed_dim)
        self.block_embedding = nn.Embedding(num_blocks, embed_dim)
        width = embed_dim * (len(field_choices) + 2) + (len(field_choices) if numeric_inputs else 0)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, rank * rank),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: (layers, 7) long — five field indices, module type, block index.

        Returns the adjustments U, shape (layers, r, r), in one batched call.
        """
        parts = [emb(features[:, i]) for i, emb in enumerate(self.field_embeddings)]
        parts.append(self.type_embedding(features[:, 5]))
        parts.append(self.block_embedding(features[:, 6]))
        if self.numeric_inputs:
            numbers = [getattr(self, f"numbers_{i}") for i in range(len(self.field_embeddings))]
            parts.append(torch.stack([n[features[:, i]] for i, n in enumerate(numbers)], dim=-1))
        return self.mlp(torch.cat(parts, dim=-1)).view(-1, self.rank, self.rank)


def layer_features(
    configs: Sequence[Option], type_ids: Sequence[int], block_ids: Sequence[int]
) -> torch.Tensor:
    """The (layers, 7) input of :class:`ConfigAwareNetwork` for one model configuration."""
    rows = [[*field_indices(c), t, b] for c, t, b in zip(configs, type_ids, block_ids, strict=True)]
    return torch.tensor(rows, dtype=torch.long)
