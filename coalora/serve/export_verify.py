"""Verification of an export folder before anything of it is used: every file against the
manifest, and ``quantization.json`` as the description of a consistent model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from coalora.io import read_json
from coalora.quant.options import option_from_dict, packed_nbytes
from coalora.quant.space import ConfigSpace, config_id
from coalora.serve.export_format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANTIZATION_NAME,
    WEIGHT_DTYPES,
    sha256,
    task_type,
)


def _plain_name(name: object) -> bool:
    """A file name of the folder itself: no path separator, not ``.`` or ``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def verify_export(folder: str | Path) -> dict[str, Any]:
    """Check an export folder before anything of it is used; returns ``quantization.json``.

    The folder must hold exactly the files its manifest lists (each a plain file inside it, not
    a link, with the recorded size and sha256), and ``quantization.json`` must describe a
    consistent model (:func:`check_description`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist")
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a coalora export: {MANIFEST_NAME} is missing")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or QUANTIZATION_NAME not in manifest:
        raise ValueError(
            f"export {folder}: {MANIFEST_NAME} is not an export's manifest (it does not list "
            f"{QUANTIZATION_NAME}); export it again"
        )
    outside = [name for name in manifest if not _plain_name(name)]
    if outside:
        raise ValueError(
            f"export {folder}: {MANIFEST_NAME} lists {outside[:3]}, which are not files of the "
            "folder itself; an export lists only its own files: export it again"
        )
    links = sorted(name for name in manifest if (folder / name).is_symlink())
    if links:
        raise ValueError(
            f"export {folder}: {', '.join(links)} is a symbolic link; an export holds its files "
            "themselves, never links to files elsewhere: export it again"
        )
    missing = [name for name in manifest if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"export {folder} is incomplete: {', '.join(missing)} is missing")
    unlisted = sorted({p.name for p in folder.iterdir()} - set(manifest) - {MANIFEST_NAME})
    if unlisted:
        raise ValueError(
            f"export {folder}: {', '.join(unlisted)} is not listed in {MANIFEST_NAME}; an "
            "export holds only the files it lists: remove it or export again"
        )
    for name, entry in manifest.items():
        path = folder / name
        if (
            not isinstance(entry, dict)
            or path.stat().st_size != entry.get("bytes")
            or sha256(path) != entry.get("sha256")
        ):
            raise ValueError(
                f"export {folder}: {name} was altered (its size or sha256 differs from "
                f"{MANIFEST_NAME}); export it again"
            )
    summary = read_json(folder / QUANTIZATION_NAME)
    check_description(folder, summary)
    return summary


def check_description(folder: Path, summary: Any) -> None:
    """Refuse a ``quantization.json`` that does not describe a consistent model: per matrix a
    valid option (``QuantConfig`` or ``GGMLConfig``), a 2-d shape, a weight dtype, and the bits
    per weight and byte count its option gives; a configuration (``choice``) of the matrices'
    options with its id; average bits and packed bytes that add up; the fields loading and
    prediction read.
    """
    where = f"export {folder}: {QUANTIZATION_NAME}"
    try:
        problems = list(_description_problems(summary))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        problems = [f"it is not an export's description ({type(err).__name__}: {err})"]
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems[:3])}; export it again")


def _description_problems(s: Mapping[str, Any]) -> Iterator[str]:
    if s["format_version"] != FORMAT_VERSION:
        yield f"format_version {s['format_version']!r}; this coalora reads {FORMAT_VERSION}"
        return
    if not isinstance(s["architecture"], str) or task_type(s["architecture"]) is None:
        yield f"architecture {s['architecture']!r} is not a supported transformers model class"
    matrices = s["matrices"]
    if not isinstance(matrices, dict) or not matrices:
        yield "it describes no quantized matrices"
        return
    numels, configs = [], []
    for name, spec in matrices.items():
        config = option_from_dict(spec["config"])
        shape = spec["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or any(type(n) is not int or n < 1 for n in shape)
        ):
            yield f"{name}: shape {shape!r} is not that of a matrix"
            continue
        numel = shape[0] * shape[1]
        nbytes = packed_nbytes(numel, config)
        if spec["dtype"] not in WEIGHT_DTYPES:
            yield f"{name}: dtype {spec['dtype']!r} is not one of {WEIGHT_DTYPES}"
        if spec["bits_per_param"] != config.bits_per_param:
            yield (
                f"{name}: bits_per_param {spec['bits_per_param']!r} is not that of its "
                f"configuration {config} ({config.bits_per_param})"
            )
        if spec["nbytes"] != nbytes:
            yield (
                f"{name}: nbytes {spec['nbytes']!r} is not that of its configuration {config} "
                f"on a {shape[0]}×{shape[1]} matrix ({nbytes})"
            )
        numels.append(numel)
        configs.append(config)
    choice = s["choice"]
    options = [spec["option"] for spec in matrices.values()]
    if choice != options or any(type(j) is not int for j in options):
        yield "choice does not list the option of every matrix in order"
    elif s["config_id"] != config_id(choice):
        yield f"config_id {s['config_id']!r} is not that of its choice ({config_id(choice)})"
    if len(numels) == len(matrices):
        avg = ConfigSpace(configs, numels).bits(range(len(configs)))  # each its own option
        if not isinstance(s["avg_bits"], float | int) or not math.isclose(
            s["avg_bits"], avg, rel_tol=1e-9
        ):
            yield f"avg_bits {s['avg_bits']!r} is not that of its matrices ({avg!r})"
        packed = sum(spec["nbytes"] for spec in matrices.values())
        if s["packed_bytes"] != packed:
            yield f"packed_bytes {s['packed_bytes']!r} is not the matrices' sum ({packed})"
    tied = s["tied"]
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        yield "tied is not a mapping of weight names"
    length = s["max_length"]
    if type(length) is not int or length < 1:
        yield f"max_length {length!r} is not a positive integer"
    if not isinstance(s["task_spec"], dict):
        yield "task_spec is not a mapping"
