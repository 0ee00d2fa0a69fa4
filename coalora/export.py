"""Hydra entry point: ``python -m coalora.export run_dir=<run> bits=3.0 [out=<folder>]``.

Writes the run's model at one budget (``bits=``), memory limit (``memory_mb=``) or configuration
(``config=``) as an export folder (see :mod:`coalora.serve.export`).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from coalora.configs import config_id
from coalora.serve import Deployment


def default_folder(cfg: DictConfig, choice: tuple[int, ...]) -> Path:
    """``<run_dir>/exports/`` + ``bits_<b>``, ``memory_<m>mb`` or ``config_<id>``."""
    if cfg.bits is not None:
        name = f"bits_{cfg.bits:g}"
    elif cfg.memory_mb is not None:
        name = f"memory_{cfg.memory_mb:g}mb"
    else:
        name = f"config_{config_id(choice)}"
    return Path(cfg.run_dir) / "exports" / name


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> str:
    config = cfg.config
    if isinstance(config, int):  # an all-digit config_id parsed as a number
        config = str(config)
    elif config is not None and not isinstance(config, str):
        config = OmegaConf.to_container(config)
    dep = Deployment.from_run(cfg.run_dir)
    choice = dep.choose(cfg.bits, cfg.memory_mb, config)
    out = Path(cfg.out) if cfg.out else default_folder(cfg, choice)
    dep.export(out, cfg.bits, cfg.memory_mb, config, overwrite=cfg.overwrite)
    summary = json.loads((out / "quantization.json").read_text())
    Console().print(
        f"exported {summary['avg_bits']:.3f} bits (config {summary['config_id']}) to {out}: "
        f"{summary['export_bytes'] / 1e6:.1f} MB on disk, packed targets "
        f"{summary['packed_bytes'] / 1e6:.2f} MB "
        f"(fp32 weights {summary['fp32_bytes'] / 1e6:.1f} MB)",
        soft_wrap=True,
    )
    return str(out)


if __name__ == "__main__":
    main()
