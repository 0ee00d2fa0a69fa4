"""A Hugging Face model whose target linears are quantized, switchable, LoRA-adapted layers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from coalora.model.config_net import ConfigAwareNetwork, layer_features
from coalora.model.layers import UNQUANTIZED, QuantLoRALinear, Storage, check_residual_rank
from coalora.model.targets import MODULE_TYPES, Target, find_targets, num_blocks
from coalora.model.weight_cache import QuantizedWeightCache
from coalora.quant import Choice, ConfigSpace, Option, option_space, quantize
from coalora.quant.options import packed_nbytes, usable_options

DEFAULT_CACHE_BYTES = 512 * 1024**2
MASTER_STORAGES: tuple[Storage, ...] = ("dense", "int8")
LayerState = tuple[Option | str | None, torch.Tensor | None]


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

    The active configuration changes with :meth:`set_configuration` at any step. Each target
    layer holds one master copy of its frozen weight (``storage``: the model's dtype, or an
    8-bit master that halves bf16) and quantizes it under the active option into a bounded
    cache of packed weights; forward and backward passes dequantize transiently, so no dense
    copy outlives a matmul. A method that trains one configuration keeps only its packed codes
    (:meth:`keep_only`). Trainable parameters: every ``lora_A``/``lora_B``, θ, and the task
    head.

    Args:
        model: a Hugging Face model (e.g. ``AutoModelForSequenceClassification``).
        fmt: quantization format, ``"nf"``, ``"int"`` or ``"gguf"`` (llama.cpp types).
        rank: LoRA rank r.
        alpha: LoRA alpha (scale = alpha / r).
        dropout: LoRA dropout.
        module_types: target module types (default: all of ``MODULE_TYPES`` present).
        config_aware: build θ (CoA-LoRA); ``False`` gives plain shared LoRA.
        embed_dim: θ's embedding width.
        hidden_dim: θ's hidden width.
        numeric_inputs: θ also reads each option field as a number (see
            :class:`ConfigAwareNetwork`).
        cache_bytes: bound on the cache of packed quantized weights (0 disables it).
        residual_rank: rank of every option's frozen residual correction (0: none; see
            :class:`QuantLoRALinear`).
        storage: the master copy of the frozen weights, ``"dense"`` or ``"int8"``.
        head_modules: names of the task-head submodules to train (those present).
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: str = "nf",
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        module_types: Sequence[str] | None = None,
        config_aware: bool = True,
        embed_dim: int = 16,
        hidden_dim: int = 256,
        numeric_inputs: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        head_modules: Sequence[str] = ("classifier", "score"),
        storage: Storage = "dense",
        residual_rank: int = 0,
    ) -> None:
        super().__init__()
        if storage not in MASTER_STORAGES:
            raise ValueError(
                f"storage={storage!r}; choose one of {MASTER_STORAGES} (packed storage of one "
                "configuration comes from keep_only)"
            )
        self.model = model
        self.residual_rank = residual_rank
        self.targets: list[Target] = find_targets(model, module_types)
        check_rank(rank, model, self.targets)
        smallest = min(min(model.get_submodule(t.name).weight.shape) for t in self.targets)
        check_residual_rank(residual_rank, smallest)
        model.requires_grad_(False)
        self.cache = QuantizedWeightCache(cache_bytes)
        for target in self.targets:
            parent_name, _, child = target.name.rpartition(".")
            base = model.get_submodule(target.name)
            layer = QuantLoRALinear(base, rank, alpha, dropout, residual_rank)
            setattr(model.get_submodule(parent_name), child, layer)  # frees the original weight
            layer.store(storage)
            layer.cache = self.cache
        options = option_space(fmt)
        shapes = [layer.weight_shape for layer in self.layers]
        self.space = ConfigSpace(options, self.numels, usable=usable_options(options, shapes))
        """The model's configurations (without error table: see ``ConfigSpace.from_table``)."""
        self.options: list[Option] = self.space.options
        for name in head_modules:
            if hasattr(model, name):
                getattr(model, name).requires_grad_(True)
        self.config_net = (
            ConfigAwareNetwork(
                rank,
                len(MODULE_TYPES),
                num_blocks(self.targets),
                embed_dim,
                hidden_dim,
                field_choices=type(options[0]).FIELD_CHOICES,
                numeric_inputs=numeric_inputs,
            )
            if config_aware
            else None
        )
        self.type_ids = [MODULE_TYPES.index(t.module_type) for t in self.targets]
        self.block_ids = [t.block_index for t in self.targets]
        self.active: Choice | None = None
        self._features: torch.Tensor | None = None
        self.train()  # from_pretrained returns eval mode; fine-tuning uses the model's dropout

    @property
    def layers(self) -> list[QuantLoRALinear]:
        return [self.model.get_submodule(t.name) for t in self.targets]

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The master weight of every target matrix (dense, detached), by target name."""
        pairs = zip(self.targets, self.layers, strict=True)
        return {t.name: layer.master().detach() for t, layer in pairs}

    def frozen_nbytes(self) -> int:
        """Bytes the target layers' frozen weights occupy as stored."""
        return sum(layer.frozen_nbytes() for layer in self.layers)

    @property
    def numels(self) -> list[int]:
        return [layer.weight_shape.numel() for layer in self.layers]

    def check_choice(self, choice: Sequence[int]) -> Choice:
        """``choice`` as a tuple, checked against this model's configuration space."""
        return self.space.check_choice(choice)

    def dequantized(self, index: int, option: int) -> torch.Tensor:
        """The dequantized weight of target ``index`` under ``option``."""
        return self.layers[index].quantized(self.options[option]).dequantize()

    def features(self, choice: Sequence[int]) -> torch.Tensor:
        """θ's input (the layer embeddings' indices) for the configuration ``choice``."""
        return layer_features([self.options[j] for j in choice], self.type_ids, self.block_ids)

    def set_configuration(self, choice: Sequence[int]) -> None:
        """Make ``choice`` the active configuration of every target layer."""
        choice = self.check_choice(choice)
        layers = self.layers
        fixed = [
            (t.name, layer.stored_config)
            for t, layer, j in zip(self.targets, layers, choice, strict=True)
            if layer.storage == "packed" and self.options[j] != layer.stored_config
        ]
        if fixed:
            name, kept = fixed[0]
            raise ValueError(
                f"this model keeps only one configuration packed ({name} holds {kept}); "
                f"{len(fixed)} target(s) would need another option"
            )
        for layer, option in zip(layers, choice, strict=True):
            layer.config = self.options[option]
        self._features = self.features(choice)
        self.active = choice

    def expect_configurations(self, choices: Sequence[Sequence[int]]) -> None:
        """Tell the cache which configurations training samples from (uniformly), and fill it
        with the (matrix, option) pairs most of them share (see :class:`QuantizedWeightCache`).
        Layers that keep one packed option need no cache."""
        pairs = [
            (layer, self.options[j])
            for choice in choices
            for layer, j in zip(self.layers, self.check_choice(choice), strict=True)
            if layer.storage != "packed"
        ]
        keys: list[tuple] = []
        builds: dict[tuple, tuple[int, Callable[[], object]]] = {}  # key: (bytes, build)
        for layer, option in pairs:
            keys.append(layer.cache_key(option))
            size = packed_nbytes(layer.weight_shape.numel(), option)
            builds[keys[-1]] = size, functools.partial(layer.quantized, option)
            if self.residual_rank:  # an option's correction is as needed as its packed weight
                keys.append(layer.residual_key(option))
                residual = functools.partial(layer.residual, option)
                builds[keys[-1]] = layer.residual_nbytes(), residual
        self.cache.expect(keys)
        chosen = self.cache.to_warm({key: size for key, (size, _) in builds.items()})
        for key in sorted(chosen, key=lambda k: "residual" in k):  # a correction needs its weight
            builds[key][1]()

    def set_unquantized(self) -> None:
        """Compute with the dense master weights, unquantized, and plain LoRA (no U): the
        reference a quantized configuration is judged against."""
        for layer in self.layers:
            layer.config = UNQUANTIZED
        self._features = None
        self.active = None

    def keep_only(self, choice: Sequence[int]) -> None:
        """Replace every master by the packed codes of ``choice`` and activate it: the memory of
        QuantLoRA for a method that trains this one configuration. Irreversible."""
        if self.residual_rank:
            raise ValueError(
                f"residual_rank={self.residual_rank} corrects each option from the master "
                "weights, which keeping one configuration packed discards: use residual_rank=0"
            )
        choice = self.check_choice(choice)
        for layer, option in zip(self.layers, choice, strict=True):
            layer.store("packed", self.options[option])
        self.clear_cached()
        self.set_configuration(choice)

    def adjustments(self) -> torch.Tensor | None:
        """U for every target layer under the active configuration (one batched call); None
        for plain LoRA, and without a configuration (unquantized, or none set yet: the layers
        then refuse to run)."""
        if self.config_net is None or self._features is None:
            return None
        device = self.config_net.mlp[-1].weight.device
        return self.config_net(self._features.to(device))

    @torch.no_grad()
    def folded_adapters(self, choice: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(A, B (I + U))`` of every target layer for the configuration ``choice``: its
        adapters as plain LoRA factors (detached; with a residual correction, rank r + k:
        :meth:`QuantLoRALinear.plain_lora`)."""
        choice = self.check_choice(choice)
        u = None if self.config_net is None else self.config_net(self.features(choice))
        return [
            layer.plain_lora(None if u is None else u[i], self.options[j])
            for i, (layer, j) in enumerate(zip(self.layers, choice, strict=True))
        ]

    def forward(self, **batch: torch.Tensor):
        adjustments = self.adjustments()
        for i, layer in enumerate(self.layers):
            layer.adjustment = None if adjustments is None else adjustments[i]
        return self.model(**batch)

    def backward_over(
        self,
        choices: Sequence[Choice],
        batch: Mapping[str, torch.Tensor],
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> torch.Tensor:
        """Accumulate the gradient of the mean loss of ``batch`` under each of ``choices``
        and return that mean, detached. Each configuration's loss is
        back-propagated (``backward``, e.g. Lightning's ``manual_backward``) before the next
        forward pass, so only one configuration's graph is alive at a time."""
        if not choices:
            raise ValueError("backward_over needs at least one configuration")
        total = None
        for choice in choices:
            self.set_configuration(choice)
            loss = self(**batch).loss
            backward(loss / len(choices))
            total = loss.detach() if total is None else total + loss.detach()
        return total / len(choices)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """``context_fn`` of ``torch.utils.checkpoint``: a checkpointed block is recomputed in
        the backward pass under the configuration (options and U) of the forward pass it
        recomputes, whatever configuration is active by then."""
        return contextlib.nullcontext(), self._layer_states(
            [self._state_of(x) for x in self.layers]
        )

    @staticmethod
    def _state_of(layer: QuantLoRALinear) -> LayerState:
        return layer.config, layer.adjustment

    @contextlib.contextmanager
    def _layer_states(self, states: list[LayerState]) -> Iterator[None]:
        layers = self.layers
        current = [self._state_of(layer) for layer in layers]
        try:
            for layer, (config, adjustment) in zip(layers, states, strict=True):
                layer.config, layer.adjustment = config, adjustment
            yield
        finally:
            for layer, (config, adjustment) in zip(layers, current, strict=True):
                layer.config, layer.adjustment = config, adjustment

    def _apply(self, fn, recurse: bool = True):
        self.clear_cached()  # cached weights and corrections belong to the old device or dtype
        return super()._apply(fn, recurse)

    def clear_cached(self) -> None:
        """Drop every cached packed weight and residual correction (after the master weights
        change or move)."""
        self.cache.clear()
        for layer in self.layers:
            layer.forget_residual()

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
        if iterations > 1 and any(layer.storage != "dense" for layer in self.layers):
            raise ValueError("init iterations > 1 rewrite the master weights: use dense storage")
        with torch.no_grad():
            for layer, option in zip(self.layers, choice, strict=True):
                original = layer.master().clone()
                for t in range(iterations):
                    if t:
                        layer.weight.copy_(original - layer.scale * layer.lora_B @ layer.lora_A)
                    q = quantize(layer.master(), self.options[option]).dequantize()
                    layer.init_from_residual(original - q)
        self.clear_cached()

    @classmethod
    def from_run_config(cls, backbone: nn.Module, cfg: Mapping[str, Any]) -> QuantizedLoRAModel:
        """Wrap ``backbone`` as a run's ``model``/``quant``/``method`` config describes;
        ``model.gradient_checkpointing`` recomputes each block's activations in the backward
        pass instead of keeping them, each under the configuration it ran with
        (:meth:`checkpoint_contexts`); ``quant.storage`` is the master copy's storage."""
        method = cfg["method"]
        model = cls(
            backbone,
            fmt=cfg["quant"]["fmt"],
            rank=method["rank"],
            alpha=method["alpha"],
            dropout=method["dropout"],
            module_types=cfg["model"]["module_types"],
            config_aware=method["config_aware"],
            embed_dim=method["embed_dim"],
            hidden_dim=method["hidden_dim"],
            numeric_inputs=method.get("numeric_inputs", False),
            cache_bytes=cfg["quant"]["cache_bytes"],
            storage=cfg["quant"].get("storage", "dense"),
            residual_rank=method.get("residual_rank", 0),
        )
        if cfg["model"].get("gradient_checkpointing"):
            backbone.activation_checkpointing_enable(
                {"use_reentrant": False, "context_fn": model.checkpoint_contexts}
            )
        return model

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part: LoRA factors, θ, task head."""
        lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers)
        theta = (
            0 if self.config_net is None else sum(p.numel() for p in self.config_net.parameters())
        )
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"lora": lora, "config_net": theta, "head": total - lora - theta, "total": total}
