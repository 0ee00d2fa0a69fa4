"""Where an export may be written: never over a user's files, and after killed exports.

``overwrite=True`` replaces only a folder that is an earlier export (:func:`export_problem`),
never other files. An export killed before it could clean up leaves its hidden temporary
folder holding :data:`PARTIAL_MARKER`; the next export into the same parent removes such
folders whose process no longer runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from coalora.io import read_json
from coalora.serve.export_format import MANIFEST_NAME, PARTIAL_MARKER, QUANTIZATION_NAME

log = logging.getLogger(__name__)


def export_problem(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier export that may be replaced; None when it is one.

    An export is a folder (not a link) holding only plain files: those its manifest lists (a
    complete export, or one with files missing or altered), or, for a partial export, a
    :data:`PARTIAL_MARKER` among them. Anything else (another folder's ``manifest.json``, a
    file the manifest does not list, a subfolder) is a user's.
    """
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.is_dir():
        return "is not a folder"
    entries = sorted(folder.iterdir())
    names = {p.name for p in entries}
    others = [p.name for p in entries if p.is_symlink() or not p.is_file()]
    if others:
        return f"holds folders or links that are not part of an export ({others[:3]})"
    if PARTIAL_MARKER in names:
        return None
    if MANIFEST_NAME not in names:
        return f"has no {MANIFEST_NAME} (it holds {sorted(names)[:3]})"
    try:
        manifest = read_json(folder / MANIFEST_NAME)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or QUANTIZATION_NAME not in manifest:
        return (
            f"has a {MANIFEST_NAME} that is not an export's (it does not list {QUANTIZATION_NAME})"
        )
    unlisted = sorted(names - set(manifest) - {MANIFEST_NAME})
    if unlisted:
        return f"holds files that are not part of the export ({unlisted[:3]})"
    return None


def check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` whose writing would lose a user's files: an existing path unless
    ``overwrite``, and with ``overwrite`` anything but an earlier export (:func:`export_problem`).
    """
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r} must be true or false")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another folder, or overwrite=true to replace an "
            "earlier export"
        )
    problem = export_problem(out)
    if problem is not None:
        raise FileExistsError(
            f"overwrite=true replaces only an earlier coalora export, but {out} {problem}; "
            "nothing was changed: choose another folder"
        )


def _writer_running(marker: Path) -> bool:
    """Whether the process named in a :data:`PARTIAL_MARKER` may still be writing (True when
    that cannot be told: another machine, an unreadable marker)."""
    try:
        owner = read_json(marker)
        pid, host = owner["pid"], owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname() or type(pid) is not int or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed exports left in ``parent`` (hidden
    ``.<name>.<random>.tmp`` folders of plain files with a :data:`PARTIAL_MARKER` naming a
    process of this machine that no longer runs); returns them."""
    removed = []
    for tmp in sorted(parent.glob(".*.tmp")) if parent.is_dir() else []:
        marker = tmp / PARTIAL_MARKER
        if export_problem(tmp) is None and marker.is_file() and not _writer_running(marker):
            shutil.rmtree(tmp)
            removed.append(tmp)
            log.info("removed %s, left by an export that was killed", tmp)
    return removed


def prepare_export_target(out: Path, overwrite: bool) -> None:
    """Before an export is built: refuse ``out`` (:func:`check_export_target`), then remove
    the stale temporary folders of killed exports beside it."""
    check_export_target(out, overwrite)
    remove_stale_partials(out.parent)
