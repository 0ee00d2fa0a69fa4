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
from collections.abc import Iterator

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

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
