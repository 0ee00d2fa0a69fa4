"""Serving and export: any configuration of a trained run as a ready, packed model.

Importable without Lightning or Hydra::

    from coalora.serve import Deployment
    dep = Deployment.from_run("outputs/<run>")
    model = dep.at(bits=3.0)                      # or memory_mb=..., or config=...
    dep.export("exports/sst2-3bit", bits=3.0)
"""

from coalora.quant.options import packed_nbytes
from coalora.serve.deployment import Deployment
from coalora.serve.export_load import load_dequantized_base, load_export
from coalora.serve.export_verify import verify_export
from coalora.serve.packed import PackedLoRALinear

__all__ = [
    "Deployment",
    "PackedLoRALinear",
    "load_dequantized_base",
    "load_export",
    "packed_nbytes",
    "verify_export",
]
