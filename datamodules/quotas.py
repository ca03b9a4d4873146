"""Per-worker batch quotas of a plain stream, in one pass over the shard counts.

Plain mode gives shard ``i`` to rank ``i % W`` and, in that rank's list, to worker
``(i // W) % N`` (:func:`~mmpt.datamodules.stages.split_shards` with no shuffle), so every
slot's sample count comes from one pass over the shards, not one pass per slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def slot_samples(counts: Sequence[int], world_size: int, num_workers: int) -> list[list[int]]:
    """Samples each (rank, worker) slot reads in a plain pass, in O(shards).

    Args:
        counts: Samples per shard, in the stream's shard order.
        world_size: Ranks ``W``.
        num_workers: Workers per rank ``N``.

    Returns:
        ``out[rank][worker]``: the summed counts of the slot's shards.
    """
    out = [[0] * num_workers for _ in range(world_size)]
    for i, n in enumerate(counts):
        rank, j = i % world_size, i // world_size
        out[rank][j % num_workers] += n
    return out


def trim_largest_first(quotas: Sequence[int], target: int) -> list[int]:
    """Take batches off the largest quotas, one at a time, until they sum to ``target``.

    The same result as repeatedly decrementing the first largest entry, in O(N log max):
    every entry above the final level ``m`` drops to ``m``, then the first ``r`` entries at
    ``m`` (in index order) drop to ``m - 1``.

    Args:
        quotas: Batches per worker.
        target: The sum to trim to (<= ``sum(quotas)``, >= 0).

    Returns:
        The trimmed quotas.
    """
    excess = sum(quotas) - target
    if excess <= 0:
        return list(quotas)

    def cost(level: int) -> int:  # decrements that bring every entry down to <= level
        return sum(q - level for q in quotas if q > level)

    lo, hi = 0, max(quotas)  # the smallest level whose cost fits in the excess
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(mid) <= excess else (mid + 1, hi)
    extra = excess - cost(lo)
    out = []
    for q in quotas:
        q = min(q, lo)
        if q == lo and extra > 0:
            q, extra = q - 1, extra - 1
        out.append(q)
    return out


def batch_count(samples: int, batch_size: int, partial: bool) -> int:
    """Batches made from ``samples`` items: a last short one kept when ``partial``."""
    return math.ceil(samples / batch_size) if partial else samples // batch_size
