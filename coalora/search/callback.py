"""Lightning callback running the configuration search between epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coalora.checkpoint_io import full_parameters
from coalora.io import atomic_write, atomic_write_text
from coalora.quant import Choice
from coalora.search.search import ParetoGPSearch, SearchRound

PLOT_DPI = 120


class ParetoSearchCallback(L.Callback):
    """Before the epoch that follows every ``interval``-th training epoch, run one search
    round on the model as that epoch left it and replace the module's ``train_configs`` by its
    result. A round runs only when an epoch will train on its result: the last epoch of a run
    (``max_epochs`` reached, or early stopping) is followed by none.

    Configurations are scored with the module in eval mode under ``torch.no_grad()``: the loss
    of :meth:`CoALoRAModule.loss_under` (adapters and θ included), averaged over the first
    ``heldout_size`` examples of the data module's ``val`` split, fixed for the whole run. They
    are scored shortest first in batches of ``heldout_batch_size`` (``heldout_batches``), which
    wastes far less compute on padding than one batch padded to the longest example.

    The round after epoch k writes ``<dirpath>/epoch_<k>.json`` (pool, proposals and training
    set with their bits and losses, the pool hypervolume, acquisition evaluations, seconds) and
    a plot ``epoch_<k>.png``, and logs ``search/train_set_size``, ``search/bits_min``,
    ``search/bits_max``, ``search/pool_hv``, ``search/seconds`` and ``search/scoring_seconds``
    (and the plot to W&B). Both
    files are written atomically (a temporary file renamed into place).

    Ordering: Lightning calls ``on_train_epoch_start`` of callbacks before the module's, which
    records the set the epoch trains on. The checkpoint written at the end of epoch k holds the
    model and the search state the round after epoch k starts from (the round draws from the
    search's own seeded generator), so a run resumed from it, with more epochs if wanted, runs
    that round as the uninterrupted run does and trains epoch k+1 on the same set.

    Several processes (DDP): only global rank 0 scores and searches (the others wait in the
    broadcast); its search state, and so the next training set, is broadcast, so every rank
    holds the same pool and trains on the same set. Rank 0 alone logs and writes the reports.

    Args:
        search: the search (its initial pool is the module's initial training set).
        dirpath: folder of the per-epoch reports.
        interval: run after epochs k with ``(k + 1) % interval == 0`` that another epoch follows.
        heldout_size: validation examples scored.
        heldout_batch_size: examples per forward pass.
    """

    def __init__(
        self,
        search: ParetoGPSearch,
        dirpath: str | Path,
        interval: int = 1,
        heldout_size: int = 64,
        heldout_batch_size: int = 16,
    ) -> None:
        if min(interval, heldout_size, heldout_batch_size) < 1:
            raise ValueError(
                f"need interval, heldout_size and heldout_batch_size >= 1, got {interval}, "
                f"{heldout_size} and {heldout_batch_size}"
            )
        self.search = search
        self.dirpath = Path(dirpath)
        self.interval = interval
        self.heldout_size = heldout_size
        self.heldout_batch_size = heldout_batch_size

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finished = trainer.current_epoch - 1  # the epoch the model has just trained
        if finished < 0 or (finished + 1) % self.interval:
            return
        with full_parameters(trainer):
            result = self._search(trainer, pl_module) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(self.search.state_dict(), src=0)
            if not trainer.is_global_zero:
                self.search.load_state_dict(state)
        pl_module.train_configs = list(self.search.configs)
        if result is not None:
            self._report(result, finished, trainer)

    def _search(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SearchRound:
        """One round, scored on this process's copy of the model."""
        batches = [
            {k: v.to(pl_module.device) for k, v in batch.items()}
            for batch in trainer.datamodule.heldout_batches(
                self.heldout_size, self.heldout_batch_size
            )
        ]

        def score(configs: list[Choice]) -> list[float]:
            return [heldout_loss(pl_module, c, batches) for c in configs]

        return self.search.step(score)

    def _report(self, result: SearchRound, epoch: int, trainer: L.Trainer) -> None:
        """Metrics to the loggers, ``epoch_<k>.json`` and ``.png`` (global rank 0 only)."""
        kept_bits = [result.bits[i] for i in result.kept]
        metrics = {
            "search/train_set_size": float(len(result.kept)),
            "search/bits_min": min(kept_bits),
            "search/bits_max": max(kept_bits),
            "search/pool_hv": result.pool_hypervolume,
            "search/seconds": result.seconds,
            "search/scoring_seconds": result.scoring_seconds,
        }
        for logger in trainer.loggers:  # rank 0 alone has them: straight to the loggers
            logger.log_metrics(metrics, step=trainer.global_step)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {"epoch": epoch, **result.to_dict()}
        atomic_write_text(self.dirpath / f"epoch_{epoch}.json", json.dumps(record, indent=1))
        plot = plot_round(
            result, self.dirpath / f"epoch_{epoch}.png", f"search after epoch {epoch}"
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("search/front", [str(plot)], step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.search.load_state_dict(state_dict)


def heldout_loss(
    module: L.LightningModule, config: Choice, batches: list[dict[str, torch.Tensor]]
) -> float:
    """Mean per-example loss of ``module.loss_under(config, ·)`` over ``batches``, in eval
    mode without gradients (the module's mode is restored)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            total = sum(
                module.loss_under(config, b).loss.item() * len(b["labels"]) for b in batches
            )
    finally:
        module.train(was_training)
    return total / sum(len(b["labels"]) for b in batches)


def plot_round(result: SearchRound, path: Path, title: str = "") -> Path:
    """Scatter of held-out loss against average bits: pool, proposals and the chosen set,
    written atomically to ``path``."""
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = result.pool_size
    ax.scatter(result.bits[:n], result.losses[:n], s=36, c="tab:blue", label="pool", alpha=0.6)
    ax.scatter(
        result.bits[n:], result.losses[n:], s=36, c="tab:orange", marker="^", label="proposals"
    )
    ax.scatter(
        [result.bits[i] for i in result.kept],
        [result.losses[i] for i in result.kept],
        s=90,
        facecolors="none",
        edgecolors="black",
        label="next training set",
    )
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=PLOT_DPI, format="png"))
