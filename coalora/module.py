"""The LightningModule: trains the quantized LoRA model over a set of configurations."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from coalora.checkpoints import check_identity
from coalora.model.backbone import QuantizedLoRAModel
from coalora.quant import Choice
from coalora.quant.space import config_set_id

log = logging.getLogger(__name__)


class CoALoRAModule(L.LightningModule):
    """Each step samples ``configs_per_step`` training configurations, runs the batch under
    each, and averages their losses. Validation runs every configuration of ``val_configs``.

    Under several processes (DDP) every rank trains on the same configuration set and draws
    the same configurations each step (the sampler is seeded alike and advanced once per step
    on every rank), each on its own shard of the data; :meth:`check_ranks_agree` verifies it
    at every epoch start.

    Args:
        model: the quantized LoRA model (built outside, as in lightning-hydra-template).
        optimizer: a partial optimizer factory taking the trainable parameters.
        train_configs: the initial training configuration set.
        val_configs: configurations scored in validation.
        metric: the task metric (a torchmetrics object; cloned per split).
        metric_inputs: maps a batch's logits and labels to the metric's inputs (the task's
            ``metric_inputs``: class ids, or next-token logits and targets).
        configs_per_step: k, configurations per step (the authors use 2); each one's loss is
            back-propagated before the next forward pass (manual optimization), so activation
            memory does not grow with k.
        gradient_clip_val: clip the gradient norm of each step to this (``None``: no clipping).
        theta_lr_scale: θ's learning rate as a multiple of the optimizer's (θ's outputs move
            about ``hidden_dim`` times faster than a LoRA factor under Adam's per-weight steps).
        seed: seed of the configuration sampler.
        identity: what a checkpoint must match to be resumed by this module (model, quant
            format, method, option-space size, ...); saved in every checkpoint.
    """

    def __init__(
        self,
        model: QuantizedLoRAModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        train_configs: Sequence[Sequence[int]],
        val_configs: Sequence[Sequence[int]],
        metric: Metric,
        metric_inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        configs_per_step: int = 2,
        seed: int = 0,
        identity: Mapping[str, Any] | None = None,
        gradient_clip_val: float | None = 1.0,
        theta_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not theta_lr_scale > 0:
            raise ValueError(f"theta_lr_scale={theta_lr_scale!r} must be a positive number")
        if configs_per_step < 1:
            raise ValueError(f"configs_per_step={configs_per_step} must be >= 1")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(
                f"gradient_clip_val={gradient_clip_val!r} must be a positive number, or null "
                "for no clipping"
            )
        if not train_configs:
            raise ValueError(
                "train_configs is empty: at least one training configuration is needed"
            )
        self.save_hyperparameters(
            ignore=[
                "model",
                "optimizer",
                "metric",
                "metric_inputs",
                "train_configs",
                "val_configs",
                "identity",
            ],
            logger=False,
        )
        self.automatic_optimization = False  # one configuration's graph alive at a time
        self.gradient_clip_val = gradient_clip_val
        self.theta_lr_scale = theta_lr_scale
        self.model = model
        self.optimizer_factory = optimizer
        self.train_configs: list[Choice] = [model.check_choice(c) for c in train_configs]
        self.val_configs: list[Choice] = [model.check_choice(c) for c in val_configs]
        self.val_metric = metric.clone()
        self.metric_inputs = metric_inputs
        self.epoch_configs: list[Choice] = []  # the set the latest epoch trained on
        self.trained_configs: list[Choice] = []  # every configuration ever in a training set
        self.configs_per_step = configs_per_step
        self.sampler = torch.Generator().manual_seed(seed)
        self.identity = dict(identity or {})
        self.strict_loading = False  # checkpoints omit the frozen pre-trained weights

    def on_train_epoch_start(self) -> None:
        self.check_ranks_agree()
        self.epoch_configs = list(self.train_configs)
        self.model.expect_configurations(self.train_configs)
        known = set(self.trained_configs)
        self.trained_configs += [c for c in self.train_configs if c not in known]
        log.info(
            "epoch %d: rank %d of %d trains %d configurations, set %s",
            self.current_epoch,
            self.global_rank,
            self.trainer.world_size,
            len(self.train_configs),
            config_set_id(self.train_configs),
        )

    def check_ranks_agree(self) -> None:
        """Raise unless this rank's training set and sampler state equal rank 0's (a no-op in
        a single process): with different sets or draws, DDP would average gradients of
        different configuration mixes."""
        if self.trainer.world_size == 1:
            return
        mine = (config_set_id(self.train_configs), self.sampler.get_state())
        reference = self.trainer.strategy.broadcast(mine, src=0)
        if reference[0] != mine[0] or not torch.equal(reference[1], mine[1]):
            raise RuntimeError(
                f"rank {self.global_rank} would train epoch {self.current_epoch} on "
                f"configuration set {mine[0]} with its own sampler state, rank 0 on set "
                f"{reference[0]}: the ranks are out of step"
            )

    def sample_configs(self) -> list[Choice]:
        """k distinct configurations drawn uniformly from the training set."""
        k = min(self.configs_per_step, len(self.train_configs))
        picks = torch.randperm(len(self.train_configs), generator=self.sampler)[:k]
        return [self.train_configs[i] for i in picks.tolist()]

    def loss_under(self, choice: Choice, batch: dict[str, torch.Tensor]):
        self.model.set_configuration(choice)
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimizer step on the mean loss of the batch under k sampled configurations.

        Under DDP, gradients are synchronised once, after the last configuration's backward."""
        optimizer = self.optimizers()
        choices = self.sample_configs()
        backward_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        calls = iter(range(len(choices)))

        def backward(loss: torch.Tensor) -> None:
            last = next(calls) == len(choices) - 1
            with contextlib.nullcontext() if last or backward_sync is None else backward_sync():
                self.manual_backward(loss)

        loss = self.model.backward_over(choices, batch, backward)
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        size = batch["labels"].shape[0]
        for choice in self.val_configs:
            out = self.loss_under(choice, batch)
            self.val_metric.update(*self.metric_inputs(out.logits, batch["labels"]))
            self.log("val/loss", out.loss, batch_size=size, on_epoch=True, sync_dist=True)
        self.log("val/metric", self.val_metric, prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters; θ's form a group of their own, at
        ``theta_lr_scale`` times the learning rate, when that scale is not 1."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        net = self.model.config_net
        if net is None or self.theta_lr_scale == 1.0:
            return self.optimizer_factory(params=trainable)
        theta = {id(p) for p in net.parameters()}
        optimizer = self.optimizer_factory(
            params=[
                {"params": [p for p in trainable if id(p) not in theta]},
                {"params": [p for p in trainable if id(p) in theta]},
            ]
        )
        optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * self.theta_lr_scale
        return optimizer

    def frozen_keys(self) -> set[str]:
        return {
            name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_keys()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k not in frozen
        }
        checkpoint["coalora"] = {
            "identity": self.identity,
            "train_configs": [list(c) for c in self.train_configs],
            "val_configs": [list(c) for c in self.val_configs],
            "epoch_configs": [list(c) for c in self.epoch_configs],
            "trained_configs": [list(c) for c in self.trained_configs],
            "sampler_state": self.sampler.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_identity(checkpoint, self.identity)
        missing = {k for k, _ in self.named_parameters()} - self.frozen_keys()
        missing -= set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters {sorted(missing)[:5]}")
        state = checkpoint["coalora"]
        self.train_configs = [tuple(c) for c in state["train_configs"]]
        self.val_configs = [tuple(c) for c in state["val_configs"]]
        self.epoch_configs = [tuple(c) for c in state["epoch_configs"]]
        self.trained_configs = [tuple(c) for c in state["trained_configs"]]
        self.sampler.set_state(state["sampler_state"])
        torch.set_rng_state(state["torch_rng_state"])  # dropout continues as uninterrupted
