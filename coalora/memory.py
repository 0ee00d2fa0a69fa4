"""Peak memory of a stretch of work: resident memory (sampled) and, on GPUs, CUDA's own peak."""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

SAMPLE_SECONDS = 0.05
MIB = 2**20


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Context manager: the highest resident memory of this process while it is open (sampled
    every :data:`SAMPLE_SECONDS` by a background thread) and the CUDA peak when CUDA is used.

    Attributes (MiB, set on exit): ``rss_mib``, ``cuda_mib`` (None without CUDA).
    """

    def __init__(self) -> None:
        self.rss_mib: float | None = None
        self.cuda_mib: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, resident_bytes())
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_mib = max(self._peak, resident_bytes()) / MIB
        if torch.cuda.is_available():
            self.cuda_mib = torch.cuda.max_memory_allocated() / MIB

    def as_dict(self) -> dict[str, float | None]:
        return {"peak_rss_mib": self.rss_mib, "peak_cuda_mib": self.cuda_mib}
