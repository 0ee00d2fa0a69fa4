"""Memory-bounded cache of quantized (packed) weights, keyed by (matrix, option, device)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping

from coalora.quant import PackedTensor


class QuantizedWeightCache:
    """Cache of packed quantized weights with a byte limit, kept for the training set.

    A configuration switch quantizes a matrix under an option once while the pair stays
    cached; every forward and backward pass then only dequantizes it (into a transient buffer).
    The limit counts everything held: the packed codes and scales of every entry (no dense
    copy is ever kept).

    What stays is chosen by expected use: :meth:`expect` gives each key the number of
    training configurations that use it, and an entry's priority is that count per byte, so
    the pairs most configurations share stay (with uniform sampling from the set, the
    expected quantizations per step are then close to the least any cache of this size
    allows). When a new entry does not fit, entries of lower or equal priority are evicted,
    least recently used first; if only higher-priority entries could make room, the new one is
    returned but not kept. Keys no expectation names have priority 0: with no expectation set
    the cache is least-recently-used. An entry larger than the whole limit is never kept, and
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
        self._entries: OrderedDict[Hashable, PackedTensor] = OrderedDict()
        self._uses: Counter[Hashable] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def expect(self, keys: Iterable[Hashable]) -> None:
        """Set the expected use: each key counts once per occurrence in ``keys`` (one per
        training configuration that uses it); replaces the previous expectation."""
        self._uses = Counter(keys)

    def to_warm(self, sizes: Mapping[Hashable, int]) -> list[Hashable]:
        """Of the expected keys with their entries' ``sizes`` (bytes), those to build now
        (with :meth:`get`) so that the cache starts where its priorities would take it only
        after many misses: most expected uses per byte first, while they fit the free bytes."""
        ranked = sorted(sizes, key=lambda k: -self._uses[k] / max(sizes[k], 1))
        chosen, free = [], self.max_bytes - self.nbytes
        for key in ranked:
            if self._uses[key] and key not in self._entries and sizes[key] <= free:
                chosen.append(key)
                free -= sizes[key]
        return chosen

    def priority(self, key: Hashable, value: PackedTensor) -> float:
        """Expected uses of ``key`` per byte of ``value``."""
        return self._uses[key] / max(value.nbytes, 1)

    def get(self, key: Hashable, build: Callable[[], PackedTensor]) -> PackedTensor:
        """The cached tensor for ``key``, built with ``build()`` on a miss."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = build()
        victims = self._victims(self.priority(key, value), value.nbytes)
        if victims is not None:
            for victim in victims:
                self.nbytes -= self._entries.pop(victim).nbytes
            self._entries[key] = value
            self.nbytes += value.nbytes
        return value

    def _victims(self, priority: float, size: int) -> list[Hashable] | None:
        """The entries to evict so that ``size`` more bytes fit, lowest priority and least
        recently used first; None if that would evict an entry of higher priority."""
        if size > self.max_bytes:
            return None
        free = self.max_bytes - self.nbytes
        victims: list[Hashable] = []
        if free >= size:
            return victims
        ranked = sorted(self._entries.items(), key=lambda kv: self.priority(*kv))  # stable: LRU
        for key, value in ranked:
            if self.priority(key, value) > priority:
                return None
            victims.append(key)
            free += value.nbytes
            if free >= size:
                return victims
        return None

    def clear(self) -> None:
        """Drop every entry (after the weights they were built from change or move)."""
        self._entries.clear()
        self.nbytes = 0
