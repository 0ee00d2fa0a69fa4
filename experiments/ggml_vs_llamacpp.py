"""Compare ``quantize_ggml`` with llama.cpp's own ``ggml_quantize_chunk`` on Gaussian matrices.

Needs llama.cpp's ggml base library (``libggml-base.so``), built from the sources that
llama-cpp-python vendors::

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=OFF \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    make -C build -j1 ggml-base
    python experiments/ggml_vs_llamacpp.py build/bin/libggml-base.so

For each type it prints the share of bytes and of blocks that differ, and the relative squared
error ``|w - deq(q)|² / |w|²`` of both quantizations and their ratio (ours / llama.cpp's).
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import numpy as np
import torch

from coalora.quant.ggml_quants import dequantize_ggml, quantize_ggml
from coalora.quant.ggml_types import GGML_TYPES


def llamacpp_quantize(
    lib: ctypes.CDLL, w: np.ndarray, gguf_type: int, row_bytes: int
) -> np.ndarray:
    """``ggml_quantize_chunk(type, w, dst, 0, rows, n, NULL)``: llama.cpp's bytes for ``w``."""
    rows, n = w.shape
    src = np.ascontiguousarray(w, dtype=np.float32)
    dst = np.zeros((rows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(gguf_type, src.ctypes.data, dst.ctypes.data, 0, rows, n, None)
    if written != dst.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.size}")
    return dst


def relative_error(w: torch.Tensor, data: torch.Tensor, name: str) -> float:
    """``|w - dequantize(data)|² / |w|²``."""
    back = dequantize_ggml(data, name, w.shape).double()
    return ((back - w.double()).pow(2).sum() / w.double().pow(2).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib", type=Path, help="path to libggml-base.so")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=3, help="Gaussian matrices per type")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    lib = ctypes.CDLL(str(args.lib))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip

    results = []
    header = ("type", "bytes differ", "blocks differ", "ours", "llama.cpp", "ratio")
    print("{:6} {:>12} {:>13} {:>10} {:>10} {:>8}".format(*header))
    for kind in GGML_TYPES:
        differ_bytes = differ_blocks = total_blocks = 0
        ours_err = theirs_err = 0.0
        for seed in range(args.seeds):
            w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(seed))
            ours = quantize_ggml(w, kind.name)
            theirs = torch.from_numpy(
                llamacpp_quantize(lib, w.numpy(), kind.gguf_type.value, ours.shape[1])
            )
            blocks = (ours != theirs).reshape(-1, kind.bytes_per_block)
            differ_bytes += blocks.sum().item()
            differ_blocks += blocks.any(-1).sum().item()
            total_blocks += blocks.shape[0]
            ours_err += relative_error(w, ours, kind.name) / args.seeds
            theirs_err += relative_error(w, theirs, kind.name) / args.seeds
        row = {
            "type": kind.name,
            "bytes_differ": differ_bytes / (total_blocks * kind.bytes_per_block),
            "blocks_differ": differ_blocks / total_blocks,
            "relative_error_ours": ours_err,
            "relative_error_llamacpp": theirs_err,
            "error_ratio": ours_err / theirs_err,
        }
        results.append(row)
        print(
            f"{kind.name:6} {row['bytes_differ']:12.2e} {row['blocks_differ']:13.2e} "
            f"{ours_err:10.4e} {theirs_err:10.4e} {row['error_ratio']:8.5f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"rows": args.rows, "cols": args.cols, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
