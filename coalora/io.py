"""File helpers: UTF-8 text and JSON input that names the bad file and line, torch files read
without running pickled code, and atomic output (readers see the old file or the new one, never
a half-written one)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def read_utf8(path: str | Path) -> str:
    """The text of ``path`` (a leading byte-order mark dropped); bytes that are not UTF-8 raise
    a ValueError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}, line {line}: byte {data[err.start]:#04x} is not UTF-8 text "
            "(save the file as UTF-8)"
        ) from None


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; an empty file, bytes that are not UTF-8 and text that is not
    JSON raise a ValueError naming the file (and the line)."""
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty: it holds no JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
        ) from None


def load_torch_file(path: str | Path, prefix: str, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only, so a
    pickled object that would run code on load is refused unloaded.

    Raises ``FileNotFoundError`` for a missing file and a ``ValueError`` starting with
    ``prefix`` (e.g. ``ckpt_path=<path>``) for an empty, truncated, foreign or unsafe one;
    ``what`` names the kind of file in the message (``checkpoint``).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{prefix}: no such file")
    if not path.is_file():
        raise ValueError(f"{prefix}: a folder, not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{prefix}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"the Python object {found.group(1)}" if found else "pickled Python objects"
        raise ValueError(
            f"{prefix}: refused: it holds {what}, not only tensors and plain values; loading it "
            "could run code, and coalora never writes such objects"
        ) from None
    except Exception as err:  # truncated, not a torch.save file
        reason = str(err).split(". ")[0].strip() or type(err).__name__
        raise ValueError(
            f"{prefix}: not a readable {what}, truncated or not written by torch.save ({reason})"
        ) from None


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | Path, path: Path, mode: int) -> None:
    """Give ``tmp`` the usual permissions (``mode`` less the umask), then rename it to ``path``."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        _publish(tmp, path, 0o666)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    On an error the temporary folder is removed and ``path`` is left as it was. An existing
    ``path`` is an error unless ``overwrite``, in which case it is replaced only at the end.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another folder or overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{tmp.name}.old")
            path.rename(old)
            _publish(tmp, path, 0o777)
            shutil.rmtree(old)
        else:
            _publish(tmp, path, 0o777)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
