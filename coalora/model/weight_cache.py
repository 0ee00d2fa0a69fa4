"""Memory-bounded cache of quantized (packed) weights, keyed by (matrix, option, device)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from coalora.quant import QuantizedTensor


class QuantizedWeightCache:
    """Least-recently-used cache of packed quantized weights with a byte limit.

    A configuration switch quantizes a matrix under an option once while the pair stays
    cached; every forward and backward pass then only dequantizes it (into a transient buffer).
    The limit counts everything held: the packed codes and scales of every entry (no dense
    copy is ever kept). Entries are evicted oldest-first when the total would exceed
    ``max_bytes``; an entry larger than the whole limit is returned but not kept, and
    ``max_bytes=0`` disables caching.

    Args:
        max_bytes: upper bound on the bytes held.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"cache max_bytes={max_bytes!r} must be an integer >= 0")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, QuantizedTensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, build: Callable[[], QuantizedTensor]) -> QuantizedTensor:
        """The cached tensor for ``key``, built with ``build()`` on a miss."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = build()
        size = value.nbytes
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
            self._entries[key] = value
            self.nbytes += size
        return value

    def clear(self) -> None:
        """Drop every entry (after the weights they were built from change or move)."""
        self._entries.clear()
        self.nbytes = 0
