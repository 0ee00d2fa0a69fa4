"""The device a run trains on, known before the trainer exists (for the error table)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


def training_device(trainer: Mapping[str, Any]) -> torch.device:
    """The device of a run's ``trainer`` config (``accelerator``): ``cpu``, or the current CUDA
    device for ``gpu``/``cuda`` (and ``auto`` when CUDA is available).

    Raises ``ValueError`` for another accelerator, or for ``gpu``/``cuda`` without CUDA.
    """
    accelerator = str(trainer.get("accelerator", "cpu"))
    if accelerator not in ACCELERATORS:
        raise ValueError(f"trainer.accelerator={accelerator!r}; choose one of {ACCELERATORS}")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator!r} needs a CUDA GPU, and none is available; "
            "use trainer=cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())
