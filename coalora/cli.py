"""What the command-line entry points share: a refused input or Ctrl+C is reported as one line
on stderr (exit status 1 or 130) instead of a traceback.

Inside a Hydra task function::

    with reported_errors(interrupted="nothing was exported"):
        return export_run(cfg)

``HYDRA_FULL_ERROR=1`` shows the traceback of a refused input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    InstantiationException,
    OmegaConfBaseException,
)
"""Errors reported as one line, without a traceback: bad settings, data or files, refused with
a message that names them."""

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
"""The shell's status for a process stopped by SIGINT (128 + 2)."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: OmegaConf's messages lose their indented
    ``full_key:``/``object_type=`` details, others have their lines joined."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, OmegaConfBaseException):
        lines = lines[:1]
    return " ".join(lines) or type(err).__name__


def report_failure(message: str) -> None:
    """Print ``message`` on stderr and add it to the log files of the logging setup (Hydra's
    ``<job>.log``, when it writes one)."""
    print(message, file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextlib.contextmanager
def reported_errors(interrupted: str) -> Iterator[None]:
    """Turn what stops the block into one line and an exit status.

    - ``KeyboardInterrupt`` (Ctrl+C): ``interrupted: <its message, or interrupted>``, exit 130;
    - :data:`USER_ERRORS`: ``error: <message>``, exit 1 (re-raised with ``HYDRA_FULL_ERROR=1``).

    Args:
        interrupted: what an interruption left, said when the interrupt carries no message
            (e.g. ``nothing was written``).
    """
    try:
        yield
    except KeyboardInterrupt as err:
        report_failure(f"interrupted: {str(err) or interrupted}")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_failure(f"error: {one_line(err)}")
        raise SystemExit(EXIT_ERROR) from None


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a Hydra ``--multirun`` whose trainer would re-launch the script for its other
    processes (strategy ``ddp`` without a launcher that starts one process per device, e.g.
    SLURM tasks): each re-launched process would run the whole sweep again."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = trainer.strategy.launcher
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise ValueError(
            f"strategy={type(trainer.strategy).__name__} with {trainer.num_devices} devices "
            "re-launches `python -m coalora.run` for its other processes, which cannot be done "
            "inside --multirun: run each job on its own, or sweep with a launcher that starts "
            "one process per device (hydra/launcher=submitit_slurm with "
            "hydra.launcher.tasks_per_node=<devices>)"
        )


def quiet_console_off_rank_zero() -> None:
    """On a process of a multi-process run other than rank 0 (from the launcher's environment:
    ``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``), show only warnings and errors on the console;
    its Hydra log file (``train_ddp_process_<k>.log`` in the run folder) keeps everything."""
    if rank_zero_only.rank == 0:
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(max(handler.level, logging.WARNING))


def quiet_libraries() -> None:
    """Keep the libraries' chatter off an entry point's console: transformers' load reports
    and bars, datasets' ``Map`` bars, Lightning's information lines and tips, and the
    libraries' deprecation warnings. Progress bars of coalora and Lightning's training bar
    stay; warnings and errors of every library still show."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(lightning|torch|transformers|datasets)(\.|$)"
        )
