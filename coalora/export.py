"""``python -m coalora.export run_dir=<run> bits=3.0 [out=<folder>] [format=gguf]`` (Hydra).

Writes the run's model at one budget (``bits=``), memory limit (``memory_mb=``) or configuration
(``config=``) as an export folder: coalora's packed safetensors and a peft adapter
(``format=coalora``, see :mod:`coalora.serve.export_format`), or a GGUF base model and a GGUF
LoRA that llama.cpp runs (``format=gguf``, :mod:`coalora.serve.gguf_export`). The arguments are
checked before the model is loaded; a refused one is reported as one ``error:`` line (exit
status 1), Ctrl+C as one line (exit status 130).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from coalora.cli import reported_errors
from coalora.quant.space import config_id
from coalora.serve import Deployment
from coalora.serve.deployment import check_request
from coalora.serve.export_target import check_export_target
from coalora.serve.gguf_export import export_gguf

EXPORT_FORMATS = ("coalora", "gguf")


def default_folder(cfg: DictConfig, choice: tuple[int, ...] | None = None) -> Path | None:
    """``<run_dir>/exports/`` + ``bits_<b>``, ``memory_<m>mb`` or ``config_<id>``; None for a
    configuration until its ``choice`` is known."""
    if cfg.bits is not None:
        name = f"bits_{cfg.bits:g}"
    elif cfg.memory_mb is not None:
        name = f"memory_{cfg.memory_mb:g}mb"
    elif choice is not None:
        name = f"config_{config_id(choice)}"
    else:
        return None
    suffix = "_gguf" if cfg.format == "gguf" else ""
    return Path(str(cfg.run_dir)) / "exports" / (name + suffix)


def requested_config(cfg: DictConfig) -> list[int] | str | None:
    """``config=`` as option indices, a file name or a configuration id."""
    config = cfg.config
    if isinstance(config, int) and not isinstance(config, bool):  # an all-digit config_id
        return str(config)
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config)
    return config


def export_run(cfg: DictConfig) -> Path:
    """Check the arguments, then load the run and write the export; returns its folder."""
    config = requested_config(cfg)
    if cfg.format not in EXPORT_FORMATS:
        raise ValueError(f"format={cfg.format!r} is not supported; choose one of {EXPORT_FORMATS}")
    check_request(cfg.bits, cfg.memory_mb, config)
    out = Path(str(cfg.out)) if cfg.out else default_folder(cfg)
    if out is not None:
        check_export_target(out, cfg.overwrite)
    dep = Deployment.from_run(str(cfg.run_dir))
    choice = dep.choose(cfg.bits, cfg.memory_mb, config)
    out = out or default_folder(cfg, choice)
    export = export_gguf if cfg.format == "gguf" else type(dep).export
    return export(dep, out, cfg.bits, cfg.memory_mb, config, overwrite=cfg.overwrite)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> str:
    with reported_errors(interrupted="the export stopped; nothing was written"):
        out = export_run(cfg)
        summary = json.loads((out / "quantization.json").read_text())
        files = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in summary.get("file_bytes", {}).items())
        Console().print(
            f"exported {summary['avg_bits']:.3f} bits (config {summary['config_id']}) to {out}: "
            f"{summary['export_bytes'] / 1e6:.1f} MB on disk{f' ({files})' if files else ''}, "
            f"packed targets {summary['packed_bytes'] / 1e6:.2f} MB "
            f"(fp32 weights {summary['fp32_bytes'] / 1e6:.1f} MB)",
            soft_wrap=True,
        )
        return str(out)


if __name__ == "__main__":
    main()
