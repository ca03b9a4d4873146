"""Shards that cannot be read: what is wrong with the file, what it cost, and when to stop.

A shard that cannot be opened or read to its end (not a tar, empty, truncated, permission
denied, missing) is one :class:`ShardFault` per epoch, with the samples it lost when the
``index.json`` knows its count. :class:`SkipBudget` stops the run when the faults of an epoch
pass ``max_skipped_fraction`` of what it expected (samples when counted, else shards).
"""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpt.datamodules.urls import is_remote

#: The default ``max_skipped_fraction``: 1% of an epoch's samples (or shards) may be lost.
MAX_SKIPPED_FRACTION = 0.01
#: Bad shards named in full in an error; the rest are counted.
MAX_LISTED = 10


@dataclass(frozen=True)
class ShardFault:
    """One shard that could not be read (to its end) in an epoch.

    Attributes:
        url: The shard.
        reason: What is wrong with it (``not a tar archive``, ``truncated after 3 samples`` ...).
        read: Samples it gave before failing.
        expected: Its sample count in the index, or None without one.
    """

    url: str
    reason: str
    read: int = 0
    expected: int | None = None

    @property
    def lost(self) -> int | None:
        """Samples it should have given and did not (None: the index does not say)."""
        return None if self.expected is None else max(0, self.expected - self.read)

    def describe(self) -> str:
        """``shards/x.tar: not a tar archive (lost 12 samples)``."""
        lost = "" if self.lost is None else f" (lost {self.lost} samples)"
        return f"{self.url}: {self.reason}{lost}"


def fault_reason(url: str, exn: BaseException, read: int) -> str:
    """What is wrong with a shard, from the exception reading it raised after ``read`` samples."""
    if isinstance(exn, PermissionError):
        return "permission denied"
    if isinstance(exn, FileNotFoundError):
        return "missing (no such file)"
    text = str(exn).split(" @ ", 1)[0]
    if isinstance(exn, tarfile.ReadError | EOFError | gzip.BadGzipFile):
        if text == "empty file" or _size(url) == 0:
            return "empty file (0 bytes)"
        if "unexpected end" in text or isinstance(exn, EOFError):
            return f"truncated after {read} samples ({text})"
        return f"corrupt after {read} samples ({text})" if read else f"not a tar archive ({text})"
    return f"unreadable ({type(exn).__name__}: {text})"


def _size(url: str) -> int | None:
    try:
        return Path(url).stat().st_size
    except (OSError, ValueError):
        return None


def header_problem(path: str) -> str | None:
    """What is wrong with a local shard's first block (None: it starts like a tar archive).

    Reads at most 512 bytes (gunzipped for a gzip file), so every shard can be checked at
    start-up; a shard truncated further on is only found when read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            block = gzip.GzipFile(fileobj=f).read(512) if head == b"\x1f\x8b" else f.read(512)
    except PermissionError:
        return "permission denied"
    except FileNotFoundError:
        return "missing (no such file)"
    except (OSError, EOFError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if not block:
        return "empty file (0 bytes)"
    if len(block) < 512:
        return f"not a tar archive ({len(block)} bytes, less than one tar block)"
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EmptyHeaderError:
        return None  # an archive of end blocks only: a valid (empty) tar
    except tarfile.HeaderError as e:
        return f"not a tar archive ({e})"
    return None


@dataclass(frozen=True)
class SkipBudget:
    """How much of an epoch may be lost to unreadable shards before the run stops.

    Attributes:
        max_fraction: The limit (1.0: never stop).
        expected_samples: Samples the epoch expects (None: unknown, count shards).
        shards: Shards the epoch reads.
        where: The split and flag, for the error (``data.train (shards/train)``).
    """

    max_fraction: float = MAX_SKIPPED_FRACTION
    expected_samples: int | None = None
    shards: int = 0
    where: str = "data"

    def excess(self, faults: Sequence[ShardFault]) -> str | None:
        """The error when ``faults`` (one epoch's, each shard once) pass the limit, else None.

        The caller raises it as a :class:`~mmpt.datamodules.stages.DataError`: one screen
        listing the bad files and their reasons.
        """
        if not faults or self.max_fraction >= 1.0:
            return None
        counted = self.expected_samples and all(f.lost is not None for f in faults)
        if counted:
            lost, total, unit = sum(f.lost or 0 for f in faults), self.expected_samples, "samples"
        else:
            lost, total, unit = len(faults), max(1, self.shards), "shards"
        if lost <= self.max_fraction * total:
            return None
        listed = "; ".join(f.describe() for f in faults[:MAX_LISTED])
        more = f"; and {len(faults) - MAX_LISTED} more" if len(faults) > MAX_LISTED else ""
        return (
            f"{self.where}: {len(faults)} shard(s) could not be read, losing {lost} of {total} "
            f"{unit} ({lost / total:.1%}), over max_skipped_fraction={self.max_fraction:g}: "
            f"{listed}{more}. Rebuild or remove these files (`mmpt data index` recounts a "
            "folder), or raise data.max_skipped_fraction (1.0 never stops)"
        )


@dataclass
class SkipReport:
    """The skips of a worker that made no batch, yielded in place of one.

    The loader (:func:`~mmpt.datamodules.loader.make_loader`) takes it out of the stream and
    adds it to the next batch, so the counts reach the main process like any batch's.

    Attributes:
        skipped: Samples skipped or lost.
        skip_reasons: ``{reason: [count, example]}``.
        shard_faults: Shards found unreadable.
    """

    skipped: int
    skip_reasons: dict[str, list]
    shard_faults: list[ShardFault]

    def add_to(self, batch: Any) -> Any:
        """``batch`` with these skips added to its own; returns it."""
        batch.skipped = getattr(batch, "skipped", 0) + self.skipped
        reasons = dict(getattr(batch, "skip_reasons", None) or {})
        for reason, (count, example) in self.skip_reasons.items():
            before = reasons.get(reason, [0, example])
            reasons[reason] = [before[0] + count, before[1]]
        batch.skip_reasons = reasons
        batch.shard_faults = list(getattr(batch, "shard_faults", None) or []) + self.shard_faults
        return batch


def startup_faults(urls: Iterable[str], counts: Sequence[int] | None) -> list[ShardFault]:
    """The local shards whose first block is already wrong (see :func:`header_problem`)."""
    out = []
    for i, url in enumerate(urls):
        if is_remote(url):
            continue
        problem = header_problem(url)
        if problem is not None:
            out.append(ShardFault(url, problem, 0, None if counts is None else counts[i]))
    return out


__all__ = [
    "MAX_SKIPPED_FRACTION",
    "ShardFault",
    "SkipBudget",
    "SkipReport",
    "fault_reason",
    "header_problem",
    "startup_faults",
]
