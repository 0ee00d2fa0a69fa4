"""Lightning's side of checkpoints: atomic writing (a ``Trainer`` plugin) and the full
parameters of a sharded model for work outside the training step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from coalora.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O (the ``plugins`` of ``conf/trainer/cpu.yaml``), safer:

    - a checkpoint is written to a temporary file beside its target and renamed into place
      (:func:`coalora.io.atomic_write`), so a run killed while saving keeps its previous
      ``last.ckpt`` (Lightning's writer stages the file in the system's temporary folder and
      copies it over the target when that folder lies on another filesystem);
    - loading defaults to ``weights_only=True``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        options = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(
            path, weights_only=True if weights_only is None else weights_only, **options
        )


@contextlib.contextmanager
def full_parameters(trainer: L.Trainer) -> Iterator[None]:
    """Every parameter whole on this process inside the block, for work outside the training
    step (the configuration search, evaluation). Under FSDP the shards are gathered, a
    collective every rank must enter, and not written back; under other strategies nothing
    changes."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    else:
        yield
