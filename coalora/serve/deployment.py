"""Serve any configuration of a trained run: allocate, quantize, fold θ, hand back or export
a model."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coalora.evaluation.report import read_configurations, read_results
from coalora.io import read_json
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_backbone, load_tokenizer, quiet_transformers
from coalora.quant import ErrorTable, quantize
from coalora.quant.space import Choice, ConfigSpace, config_id
from coalora.serve.export_format import (
    adapter_tensors,
    backbone_tensors,
    export_description,
    peft_adapter_config,
    served_lora_settings,
    write_export,
)
from coalora.serve.export_target import prepare_export_target
from coalora.serve.packed import PackedLoRALinear
from coalora.serve.run_files import RUN_CONFIG_NAME, RunFiles, read_run

BYTES_PER_MB = 1_000_000
"""``memory_mb`` counts megabytes of 10^6 bytes."""


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def check_request(
    bits: object = None, memory_mb: object = None, config: object = None
) -> tuple[float | None, float | None]:
    """Check a request before any model is loaded: exactly one of ``bits``, ``memory_mb`` and
    ``config``, numbers finite; returns ``(bits, memory_mb)`` as floats (or None)."""
    given = {k: v for k, v in (("bits", bits), ("memory_mb", memory_mb), ("config", config))}
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of bits=, memory_mb=, config=; got {chosen or 'none'}")
    return (
        None if bits is None else _check_number("bits", bits),
        None if memory_mb is None else _check_number("memory_mb", memory_mb),
    )


class Deployment:
    """A trained run ready to serve any configuration.

    Holds the pre-trained backbone, the trained LoRA factors, θ and task head, and the error
    table. :meth:`at` returns a transformers model whose target matrices are packed
    (:class:`PackedLoRALinear`) with θ's adjustment folded into each adapter; :meth:`export`
    writes it as a folder that peft and :func:`coalora.serve.load_export` load.

    Args:
        model: the quantized LoRA model with its trained weights.
        table: the error table of the model's target matrices.
        config: the run's resolved configuration (``model``, ``quant``, ``method``, ``task``).
        run_dir: the run folder, to look up configuration ids and measured metrics.
    """

    def __init__(
        self,
        model: QuantizedLoRAModel,
        table: ErrorTable,
        config: dict[str, Any],
        run_dir: Path | None = None,
    ) -> None:
        names = [t.name for t in model.targets]
        if table.names != names or [o for o in table.options] != model.options:
            raise ValueError(
                "the error table does not describe this model's target matrices and options"
            )
        self.model = model.eval()
        self.table = table
        self.space = ConfigSpace.from_table(table)
        """The run's configurations, with its error table to allocate from."""
        self.config = config
        self.run_dir = run_dir

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Deployment:
        """Rebuild a run's model from its folder (checkpoint, config, error table)."""
        run: RunFiles = read_run(run_dir)
        with quiet_transformers():
            backbone = load_backbone(run.config["model"], run.num_labels)
        try:
            model = QuantizedLoRAModel.from_run_config(backbone, run.config)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"{run.run_dir / RUN_CONFIG_NAME}: cannot build the model from its settings "
                f"({type(err).__name__}: {err})"
            ) from None
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(trainable) - set(run.state_dict))
        unexpected = sorted(set(run.state_dict) - set(trainable))
        resized = [
            f"{n} {tuple(t.shape)} in the checkpoint, {tuple(trainable[n].shape)} in the model"
            for n, t in run.state_dict.items()
            if n in trainable and t.shape != trainable[n].shape
        ]
        if missing or unexpected or resized:
            raise ValueError(
                f"the checkpoint of {run.run_dir} does not match its run_config.json "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {resized[:3]})"
            )
        model.load_state_dict(run.state_dict, strict=False)
        return cls(model, run.table, run.config, run.run_dir)

    # -- choosing a configuration ---------------------------------------------------------

    @property
    def fixed_nbytes(self) -> int:
        """Bytes of a served model besides its packed matrices: every other weight at its dtype
        (embeddings, norms, biases, head) and the adapters, with their residual corrections
        (k more rank, float32) when the run has them."""
        frozen = {f"{t.name}.weight" for t in self.model.targets}
        weights = sum(
            t.numel() * t.element_size()
            for key, t in self.model.model.state_dict().items()
            if key not in frozen
        )
        return weights + sum(layer.residual_nbytes() for layer in self.model.layers)

    def served_nbytes(self, choice: Sequence[int]) -> int:
        """Weight bytes of the model :meth:`at` returns for ``choice``."""
        return self.fixed_nbytes + self.space.nbytes(choice)

    def memory_range_mb(self) -> tuple[float, float]:
        """The smallest and largest served size (MB) any configuration reaches."""
        low, high = self.space.bytes_range()
        fixed = self.fixed_nbytes
        return (fixed + low) / BYTES_PER_MB, (fixed + high) / BYTES_PER_MB

    def allocate_memory(self, memory_mb: float) -> Choice:
        """The minimum-error configuration whose served model fits in ``memory_mb``."""
        low, high = self.memory_range_mb()
        if not low <= memory_mb <= high:
            raise ValueError(
                f"memory_mb={memory_mb:g} is outside the achievable range [{low:.3f}, {high:.3f}] "
                f"MB for this model"
            )
        try:
            return self.space.allocate_bytes(memory_mb * BYTES_PER_MB - self.fixed_nbytes)
        except ValueError as err:  # name the served megabytes, not the targets' bytes
            if not str(err).startswith("no configuration fits"):
                raise
            raise ValueError(
                f"memory_mb={memory_mb:g}: no configuration fits (smallest {low:.3f} MB)"
            ) from None

    def choose(
        self,
        bits: float | None = None,
        memory_mb: float | None = None,
        config: Sequence[int] | str | Path | None = None,
    ) -> Choice:
        """The configuration for exactly one of: an average-bits budget, a memory limit (MB of
        served weights), or an explicit configuration (option indices, a JSON file holding
        them, or a ``config_id`` from the run's ``eval/configurations.json``)."""
        bits, memory_mb = check_request(bits, memory_mb, config)
        if bits is not None:
            return self.space.allocate(bits)
        if memory_mb is not None:
            return self.allocate_memory(memory_mb)
        return self.space.check_choice(self.resolve_config(config))

    def resolve_config(self, config: Sequence[int] | str | Path) -> Sequence[int]:
        if not isinstance(config, str | Path):
            if not isinstance(config, Sequence) or any(
                isinstance(j, bool) or not isinstance(j, numbers.Integral) for j in config
            ):
                raise ValueError(f"config must hold integer option indices, got {config!r}")
            return config
        path = Path(config)
        if path.suffix == ".json" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"configuration file {path} does not exist")
            data = read_json(path)
            choice = data.get("choice") if isinstance(data, dict) else data
            if not isinstance(choice, list):
                raise ValueError(
                    f"config={path} must hold a list of option indices or an object with a "
                    "'choice' list"
                )
            return self.resolve_config(choice)
        known = self.known_configurations()
        if str(config) not in known:
            raise ValueError(
                f"config={config!r} is neither a JSON file nor a configuration id of this run "
                f"(known ids: {sorted(known) or 'none'})"
            )
        return known[str(config)]

    def known_configurations(self) -> dict[str, list[int]]:
        """``config_id → choice`` of every configuration the run evaluated."""
        known: dict[str, list[int]] = {}
        for folder in self.eval_dirs():
            known.update(read_configurations(folder))
        return known

    def eval_dirs(self) -> list[Path]:
        """The run's ``eval/`` folders: its own, and its parent's for a per-budget fit."""
        if self.run_dir is None:
            return []
        return [d for d in (self.run_dir / "eval", self.run_dir.parent / "eval") if d.is_dir()]

    # -- building the served model --------------------------------------------------------

    @torch.no_grad()
    def build(self, choice: Choice) -> nn.Module:
        """A transformers model (eval mode) with packed target matrices for ``choice``."""
        packed = {}
        for layer, option, (a, b) in zip(
            self.model.layers, choice, self.model.folded_adapters(choice), strict=True
        ):
            weight = quantize(layer.master(), self.model.options[option])
            bias = None if layer.bias is None else layer.bias.detach().clone()
            packed[id(layer)] = PackedLoRALinear(weight, bias, a.clone(), b.clone(), layer.scale)
        served = copy.deepcopy(self.model.model, memo=packed)  # every other weight is copied
        return served.requires_grad_(False).eval()

    def at(
        self,
        bits: float | None = None,
        memory_mb: float | None = None,
        config: Sequence[int] | str | Path | None = None,
    ) -> nn.Module:
        """A ready model at a budget, a memory limit or an explicit configuration (see
        :meth:`choose`)."""
        return self.build(self.choose(bits, memory_mb, config))

    def describe(self, choice: Choice) -> dict[str, Any]:
        """Bits, bytes and id of a configuration."""
        return {
            "config_id": config_id(choice),
            "avg_bits": self.space.bits(choice),
            "served_bytes": self.served_nbytes(choice),
        }

    # -- exporting ------------------------------------------------------------------------

    def head_modules(self) -> list[str]:
        """Modules outside the adapters that training changed (the task head), by name."""
        return sorted(
            {
                name.removeprefix("model.").rpartition(".")[0]
                for name, p in self.model.named_parameters()
                if p.requires_grad and name.startswith("model.") and ".lora_" not in name
            }
        )

    def measured_metrics(self, choice: Choice) -> list[dict[str, Any]]:
        """The run's evaluation rows for this configuration (empty when it was never scored)."""
        cid = config_id(choice)
        rows = []
        for folder in self.eval_dirs():
            if (folder / "results.csv").is_file():
                rows += [
                    r.__dict__ for r in read_results(folder / "results.csv") if r.config_id == cid
                ]
        return rows

    def export_parts(
        self, choice: Choice, request: dict[str, Any]
    ) -> tuple[nn.Module, dict[str, PackedLoRALinear], dict[str, Any]]:
        """What every export of ``choice`` starts from: the served model, its packed target
        layers by name and the ``quantization.json`` description."""
        served = self.build(choice)
        targets = [t.name for t in self.model.targets]
        layers: dict[str, PackedLoRALinear] = {n: served.get_submodule(n) for n in targets}
        lora = {f"{n}.{part}" for n in targets for part in ("lora_A", "lora_B")}
        _, tied = backbone_tensors(served.state_dict(), lora)
        description = export_description(
            type(served).__name__,
            self.config,
            request,
            self.describe(choice),
            sum(4 * n for n in self.table.numels) + self.fixed_nbytes,
            tied,
            self.measured_metrics(choice),
            layers,
            choice,
        )
        return served, layers, description

    def export(
        self,
        out: str | Path,
        bits: float | None = None,
        memory_mb: float | None = None,
        config: Sequence[int] | str | Path | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the model at a budget, memory limit or configuration to the folder ``out``
        (the format of :mod:`coalora.serve.export_format`).

        ``out`` must not exist, or with ``overwrite`` be an earlier export; stale temporary
        folders of killed exports beside it are removed first
        (:func:`coalora.serve.export_target.prepare_export_target`)."""
        choice = self.choose(bits, memory_mb, config)
        out = Path(out)
        prepare_export_target(out, overwrite)
        request = export_request(bits, memory_mb, config)
        served, layers, description = self.export_parts(choice, request)
        targets = list(layers)
        lora = {f"{n}.{part}" for n in targets for part in ("lora_A", "lora_B")}
        backbone, _ = backbone_tensors(served.state_dict(), lora)
        heads = self.head_modules()
        adapter = adapter_tensors(layers, {h: served.get_submodule(h).state_dict() for h in heads})
        architecture = description["architecture"]
        model_config = copy.deepcopy(served.config)
        model_config.architectures = [architecture]  # the class load_export rebuilds
        return write_export(
            out,
            backbone,
            adapter,
            peft_adapter_config(
                architecture, self.config, targets, heads, served_lora_settings(layers)
            ),
            description,
            model_config,
            load_tokenizer(self.config["model"]),
            overwrite,
        )


def export_request(
    bits: float | None, memory_mb: float | None, config: Sequence[int] | str | Path | None
) -> dict[str, Any]:
    """The request an export records (``quantization.json``, model card)."""
    return {"bits": bits, "memory_mb": memory_mb, "config": None if config is None else str(config)}
