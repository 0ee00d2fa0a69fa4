"""Memory-bounded cache of dequantized weights, keyed by (matrix, option)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class DequantCache:
    """Least-recently-used cache of dense weights with a byte limit.

    Switching a layer's configuration is a dictionary look-up once its (matrix, option) pair
    has been seen; a miss quantizes and dequantizes that one matrix. Entries are evicted
    oldest-first when the total exceeds ``max_bytes``; an entry larger than the whole limit is
    returned but not kept.

    Args:
        max_bytes: upper bound on the bytes held.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor for ``key``, built with ``build()`` on a miss."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = build()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.numel() * evicted.element_size()
            self._entries[key] = value
            self.nbytes += size
        return value

    def clear(self) -> None:
        """Drop every entry (after the weights they were built from change)."""
        self._entries.clear()
        self.nbytes = 0
