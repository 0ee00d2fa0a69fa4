"""Checks of a run's settings before any work: what would otherwise fail late, after the data,
the error table or training, fails at once with the setting named."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from coalora.checkpoints import read_checkpoint
from coalora.data.factory import TASK_KINDS
from coalora.methods import LoraInit, TrainingPlan
from coalora.serve.positions import check_max_length

SEED_RANGE = (0, 2**32 - 1)
"""Seeds NumPy (and so ``lightning.seed_everything``) accepts."""


def check_settings(cfg: DictConfig, plan: TrainingPlan, init: LoraInit) -> dict[str, Any] | None:
    """Check the seed, the epoch count, ``trainer.*`` keys, the optimizer, the residual rank
    (which the method's ``plan`` and ``init`` must allow) and ``ckpt_path`` (which ``plan``
    must be able to resume); returns the checkpoint to resume from (None without one)."""
    check_seed(cfg.seed)
    residual_rank = check_residual_rank(cfg)
    plan.check_residual_rank(residual_rank)
    init.check_residual_rank(residual_rank)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise ValueError(
            f"trainer.max_epochs={max_epochs} trains nothing: use at least 1 (evaluation scores "
            "the configurations of the last trained epoch)"
        )
    resume = read_resume_checkpoint(cfg.ckpt_path, plan, cfg.method.name, cfg.eval.budgets)
    check_trainer_settings(cfg.trainer)
    check_optimizer(cfg.method.optimizer)
    return resume


def check_residual_rank(cfg: DictConfig) -> int:
    """``method.residual_rank`` as a whole number >= 0 (its upper bound, the smallest target
    matrix dimension, is checked with the model); the task kind it defaults by comes first."""
    kind = cfg.task.get("kind", "classification")
    if kind not in TASK_KINDS:
        raise ValueError(f"task.kind={kind!r}; choose one of {TASK_KINDS}")
    value = cfg.method.get("residual_rank", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"method.residual_rank={value!r} must be a whole number >= 0 (0: no correction)"
        )
    return value


def check_seed(seed: object, setting: str = "seed") -> int:
    """``seed`` as an int within :data:`SEED_RANGE`."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ValueError(f"{setting}={seed!r} must be an integer from {low} to {high}")
    return seed


def check_data_length(cfg: DictConfig) -> None:
    """Refuse a ``data.max_length`` longer than the model's token positions before any work (a
    longer example would fail only when one occurs, after training): reads the model's
    configuration only, not its weights."""
    from transformers import AutoConfig

    gguf = {"gguf_file": cfg.model.gguf_file} if cfg.model.get("gguf_file") else {}
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, **gguf)
    check_max_length(cfg.data.max_length, config, "data.max_length", cfg.model.name)


def read_resume_checkpoint(
    ckpt_path: str | None, plan: TrainingPlan, method: str, eval_budgets: Sequence[float]
) -> dict[str, Any] | None:
    """The checkpoint ``ckpt_path`` names (None without one), read before any work so that a
    missing, truncated, unsafe or foreign file is refused at once
    (:func:`coalora.checkpoints.read_checkpoint`); it resumes one run only."""
    if not ckpt_path:
        return None
    problem = plan.resumable(method, list(eval_budgets) if OmegaConf.is_list(eval_budgets) else [])
    if problem:
        raise ValueError(problem)
    return read_checkpoint(ckpt_path)


def check_trainer_settings(trainer: DictConfig) -> None:
    """Refuse ``trainer.<key>`` settings that ``lightning.Trainer`` does not take (a typo added
    with ``+trainer.<key>=...``) before any work, naming the nearest setting it does take."""
    if trainer.get("_target_") not in ("lightning.Trainer", "lightning.pytorch.Trainer"):
        return
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer) - accepted - {"_target_"})
    moved = {
        "gradient_clip_val": "method.gradient_clip_val",
        "accumulate_grad_batches": "a larger data.batch_size",
    }
    for key, instead in moved.items():
        if trainer.get(key) not in (None, 1 if key == "accumulate_grad_batches" else None):
            raise ValueError(
                f"trainer.{key}={trainer[key]!r} is not used: the module steps its optimizer "
                f"itself (one configuration's graph at a time); use {instead}"
            )
    if unknown:
        problems = []
        for key in unknown:
            near = difflib.get_close_matches(key, accepted, n=1)
            problems.append(
                f"trainer.{key} is not a setting of lightning.Trainer"
                + (f" (did you mean trainer.{near[0]}?)" if near else "")
            )
        raise ValueError("; ".join(problems))


def check_optimizer(optimizer: DictConfig) -> None:
    """Build ``method.optimizer`` once on a placeholder parameter, so that settings the
    optimizer refuses (a negative learning rate, betas outside [0, 1)) fail before any work."""
    try:
        instantiate(optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"method.optimizer ({optimizer._target_}): {err}") from None
