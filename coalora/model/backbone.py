"""A Hugging Face model whose target linears are quantized, switchable, LoRA-adapted layers."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from coalora.model.config_net import ConfigAwareNetwork, layer_features
from coalora.model.dequant_cache import DequantCache
from coalora.model.layers import QuantLoRALinear
from coalora.model.targets import MODULE_TYPES, Target, find_targets, num_blocks, target_weights
from coalora.quant import QuantConfig, average_bits, config_space, quantize
from coalora.quant.config import Format

Choice = tuple[int, ...]
"""A model configuration: one option index (into ``config_space(fmt)``) per target matrix."""


def check_rank(rank: int, model: nn.Module, targets: Sequence[Target]) -> None:
    """The LoRA rank must be an integer in [1, the smallest dimension of any target matrix]."""
    sizes = {t.name: min(model.get_submodule(t.name).weight.shape) for t in targets}
    smallest = min(sizes, key=sizes.__getitem__)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= sizes[smallest]:
        raise ValueError(
            f"rank={rank!r} must be an integer in [1, {sizes[smallest]}]: a LoRA rank cannot "
            f"exceed the smallest dimension of a target matrix ({smallest})"
        )


class QuantizedLoRAModel(nn.Module):
    """Frozen quantized backbone + shared LoRA factors + (optionally) the network θ.

    The active configuration changes with :meth:`set_configuration` at any step; dequantized
    weights come from a memory-bounded cache, so a switch reloads nothing. Trainable
    parameters: every ``lora_A``/``lora_B``, θ, and the task head.

    Args:
        model: a Hugging Face model (e.g. ``AutoModelForSequenceClassification``).
        fmt: quantization format, ``"nf"`` or ``"int"``.
        rank: LoRA rank r.
        alpha: LoRA alpha (scale = alpha / r).
        dropout: LoRA dropout.
        module_types: target module types (default: all of ``MODULE_TYPES`` present).
        config_aware: build θ (CoA-LoRA); ``False`` gives plain shared LoRA.
        embed_dim: θ's embedding width.
        hidden_dim: θ's hidden width.
        cache_bytes: bound on the dequantized-weight cache.
        head_modules: names of the task-head submodules to train (those present).
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: Format = "nf",
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        module_types: Sequence[str] | None = None,
        config_aware: bool = True,
        embed_dim: int = 16,
        hidden_dim: int = 256,
        cache_bytes: int = 2 * 1024**3,
        head_modules: Sequence[str] = ("classifier", "score"),
    ) -> None:
        super().__init__()
        self.model = model
        self.options: list[QuantConfig] = config_space(fmt)
        self.targets: list[Target] = find_targets(model, module_types)
        check_rank(rank, model, self.targets)
        model.requires_grad_(False)
        for target in self.targets:
            parent_name, _, child = target.name.rpartition(".")
            base = model.get_submodule(target.name)
            setattr(
                model.get_submodule(parent_name), child, QuantLoRALinear(base, rank, alpha, dropout)
            )
        for name in head_modules:
            if hasattr(model, name):
                getattr(model, name).requires_grad_(True)
        self.config_net = (
            ConfigAwareNetwork(
                rank, len(MODULE_TYPES), num_blocks(self.targets), embed_dim, hidden_dim
            )
            if config_aware
            else None
        )
        self.type_ids = [MODULE_TYPES.index(t.module_type) for t in self.targets]
        self.block_ids = [t.block_index for t in self.targets]
        self.cache = DequantCache(cache_bytes)
        self.active: Choice | None = None
        self._features: torch.Tensor | None = None
        self.train()  # from_pretrained returns eval mode; fine-tuning uses the model's dropout

    @property
    def layers(self) -> list[QuantLoRALinear]:
        return [self.model.get_submodule(t.name) for t in self.targets]

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The pre-trained weight of every target matrix, by target name."""
        return target_weights(self.model, self.targets)

    @property
    def numels(self) -> list[int]:
        return [layer.weight.numel() for layer in self.layers]

    def average_bits(self, choice: Sequence[int]) -> float:
        """Numel-weighted average bits per weight of a configuration."""
        return average_bits(self.numels, [self.options[j].bits_per_param for j in choice])

    def check_choice(self, choice: Sequence[int]) -> Choice:
        choice = tuple(int(j) for j in choice)
        if len(choice) != len(self.targets):
            raise ValueError(
                f"a configuration needs {len(self.targets)} option indices, got {len(choice)}"
            )
        bad = [j for j in choice if not 0 <= j < len(self.options)]
        if bad:
            raise ValueError(f"option indices {bad} are outside [0, {len(self.options)})")
        return choice

    def dequantized(self, index: int, option: int) -> torch.Tensor:
        """The dequantized weight of target ``index`` under ``option`` (cached)."""
        return self._dequantized(self.layers[index], self.targets[index].name, option)

    def _dequantized(self, layer: QuantLoRALinear, name: str, option: int) -> torch.Tensor:
        key = (name, option, str(layer.weight.device))
        return self.cache.get(
            key, lambda: quantize(layer.weight, self.options[option]).dequantize()
        )

    def features(self, choice: Sequence[int]) -> torch.Tensor:
        """θ's input (the layer embeddings' indices) for the configuration ``choice``."""
        return layer_features([self.options[j] for j in choice], self.type_ids, self.block_ids)

    def set_configuration(self, choice: Sequence[int]) -> None:
        """Make ``choice`` the active configuration of every target layer."""
        choice = self.check_choice(choice)
        for target, layer, option in zip(self.targets, self.layers, choice, strict=True):
            layer.weight_source = functools.partial(self._dequantized, layer, target.name, option)
        self._features = self.features(choice)
        self.active = choice

    def adjustments(self) -> torch.Tensor | None:
        """U for every target layer under the active configuration (one batched call)."""
        if self.config_net is None:
            return None
        if self._features is None:
            raise RuntimeError("no quantization configuration is active: call set_configuration")
        device = self.config_net.mlp[-1].weight.device
        return self.config_net(self._features.to(device))

    def forward(self, **batch: torch.Tensor):
        adjustments = self.adjustments()
        for i, layer in enumerate(self.layers):
            layer.adjustment = None if adjustments is None else adjustments[i]
        return self.model(**batch)

    def init_lora_from_residual(self, choice: Sequence[int], iterations: int = 1) -> None:
        """LQ-LoRA initialisation of every adapter for the configuration ``choice``.

        Round t quantizes ``W − L_{t−1}`` (``L_0 = 0``) to ``Q_t`` and sets the adapter
        ``L_t = scale · B A`` to the rank-r SVD of ``W − Q_t``, so ``W ≈ Q_t + L_t``. One round
        is the SVD of ``W − Q(W)``. With more rounds, the layer keeps ``Q_T`` as its quantized
        weight: from then on it quantizes ``W − L_{T−1}`` instead of ``W`` (for every option;
        the dequantization cache is emptied).
        """
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        choice = self.check_choice(choice)
        with torch.no_grad():
            for layer, option in zip(self.layers, choice, strict=True):
                original = layer.weight.clone()
                for t in range(iterations):
                    if t:
                        layer.weight.copy_(original - layer.scale * layer.lora_B @ layer.lora_A)
                    q = quantize(layer.weight, self.options[option]).dequantize()
                    layer.init_from_residual(original - q)
        self.cache.clear()

    @classmethod
    def from_run_config(cls, backbone: nn.Module, cfg: Mapping[str, Any]) -> QuantizedLoRAModel:
        """Wrap ``backbone`` as a run's ``model``/``quant``/``method`` config describes;
        ``model.gradient_checkpointing`` recomputes each block's activations in the backward
        pass instead of keeping them (and the dequantized weights they saved)."""
        method = cfg["method"]
        if cfg["model"].get("gradient_checkpointing"):
            backbone.gradient_checkpointing_enable({"use_reentrant": False})
        return cls(
            backbone,
            fmt=cfg["quant"]["fmt"],
            rank=method["rank"],
            alpha=method["alpha"],
            dropout=method["dropout"],
            module_types=cfg["model"]["module_types"],
            config_aware=method["config_aware"],
            embed_dim=method["embed_dim"],
            hidden_dim=method["hidden_dim"],
            cache_bytes=cfg["quant"]["cache_bytes"],
        )

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part: LoRA factors, θ, task head."""
        lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers)
        theta = (
            0 if self.config_net is None else sum(p.numel() for p in self.config_net.parameters())
        )
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"lora": lora, "config_net": theta, "head": total - lora - theta, "total": total}
