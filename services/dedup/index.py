"""An in-memory near-duplicate index: every stored hash pair in two numpy uint64 arrays.

A query XORs the query's pHash against every stored pHash and counts bits (numpy's
vectorised `bitwise_count`); only the few rows whose pHash distance alone is within the radius
have their dHash distance added. The arrays grow by doubling, so appends are amortised O(1).
The index mirrors a PostgreSQL table (the durable copy): the service refreshes it from rows
newer than the last sequence number it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    """The nearest stored image within the radius."""

    image_id: str
    distance: int
    """pHash plus dHash Hamming distance (0-128)."""
    phash_distance: int
    dhash_distance: int


class HashIndex:
    """Hash pairs of one project's accepted images, searchable by combined Hamming distance."""

    def __init__(self, capacity: int = 1024) -> None:
        self._phash = np.zeros(capacity, dtype=np.uint64)
        self._dhash = np.zeros(capacity, dtype=np.uint64)
        self._ids: list[str] = []
        self._scratch = np.zeros(capacity, dtype=np.uint64)
        self._counts = np.zeros(capacity, dtype=np.uint8)
        self._within = np.zeros(capacity, dtype=bool)
        self.last_seq = 0
        """Sequence number of the newest table row reflected here."""

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, image_id: str, phash: int, dhash: int) -> None:
        """Append one image's hashes."""
        n = len(self._ids)
        if n == len(self._phash):
            self._grow(2 * n)
        self._phash[n] = phash
        self._dhash[n] = dhash
        self._ids.append(image_id)

    def add_many(self, image_ids: list[str], phashes: np.ndarray, dhashes: np.ndarray) -> None:
        """Append many images' hashes at once (loading from the table)."""
        n, extra = len(self._ids), len(image_ids)
        if n + extra > len(self._phash):
            self._grow(max(2 * len(self._phash), n + extra))
        self._phash[n : n + extra] = phashes
        self._dhash[n : n + extra] = dhashes
        self._ids.extend(image_ids)

    def _grow(self, capacity: int) -> None:
        n = len(self._ids)
        for name in ("_phash", "_dhash"):
            grown = np.zeros(capacity, dtype=np.uint64)
            grown[:n] = getattr(self, name)[:n]
            setattr(self, name, grown)
        # Scratch buffers for queries, allocated once: no per-query allocation or page faults.
        self._scratch = np.zeros(capacity, dtype=np.uint64)
        self._counts = np.zeros(capacity, dtype=np.uint8)
        self._within = np.zeros(capacity, dtype=bool)

    def nearest(self, phash: int, dhash: int, radius: int) -> Match | None:
        """The stored image with the smallest combined distance, if it is within `radius`."""
        n = len(self._ids)
        if n == 0:
            return None
        scratch = self._scratch[:n]
        np.bitwise_xor(self._phash[:n], np.uint64(phash), out=scratch)
        p_dist = np.bitwise_count(scratch, out=self._counts[:n])
        # The combined distance is at least the pHash distance: only those rows can match.
        candidates = np.flatnonzero(np.less_equal(p_dist, radius, out=self._within[:n]))
        if candidates.size == 0:
            return None
        d_dist = np.bitwise_count(self._dhash[candidates] ^ np.uint64(dhash))
        total = p_dist[candidates].astype(np.int32) + d_dist
        best = int(np.argmin(total))
        if total[best] > radius:
            return None
        row = int(candidates[best])
        return Match(self._ids[row], int(total[best]), int(p_dist[row]), int(d_dist[best]))
