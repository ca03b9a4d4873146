"""Small pipeline stages: shard order and splitting, weighted mixing, shuffling, skip counting."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.utils.data

from mmpt.datamodules.shard_faults import ShardFault, SkipBudget, fault_reason
from mmpt.datamodules.urls import open_url

log = logging.getLogger("mmpt.data")


class DataError(Exception):
    """The data does not fit the model (e.g. a tile lacks bands the model takes).

    Unlike a corrupt or incomplete sample, this is not skipped and counted: every sample
    would fail the same way, so it stops the run with its message (:func:`map_skipping`
    re-raises it).
    """


class SharedEpoch:
    """An epoch counter shared with (persistent) DataLoader worker processes."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        """Set the epoch seen by every worker from its next iteration on."""
        self._value.value = epoch

    def get(self) -> int:
        """The current epoch."""
        return int(self._value.value)


@dataclass(frozen=True)
class Slot:
    """Where this iterator runs: distributed rank and DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @classmethod
    def current(cls, rank: int, world_size: int) -> Slot:
        """The slot of the calling process (worker info from torch's DataLoader)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return cls(rank, world_size, 0, 1)
        return cls(rank, world_size, info.id, info.num_workers)

    def seed(self, base: int, epoch: int) -> int:
        """A seed unique to (base, epoch, rank, worker)."""
        return hash((base, epoch, self.rank, self.worker)) & 0x7FFFFFFF


def split_shards(urls: Sequence[str], slot: Slot, seed: int | None, epoch: int) -> list[str]:
    """The shards one (rank, worker) reads in a plain (non-resampled) pass.

    Shards are shuffled with ``seed + epoch`` (the same order on every rank), split by node
    (rank), then by worker, so the union over all slots is every shard exactly once.

    Args:
        urls: All shards of the source.
        slot: The caller's rank and worker.
        seed: Shuffle seed; None keeps the given order.
        epoch: Current epoch (changes the shuffle).
    """
    order = list(urls)
    if seed is not None:
        random.Random(seed + epoch).shuffle(order)
    per_rank = order[slot.rank :: slot.world_size]
    return per_rank[slot.worker :: slot.num_workers]


#: Distinct skip reasons kept per batch; the rest are counted as "other".
MAX_REASONS = 20
_LOCATION = re.compile(r" \(sample .* in .*\)$")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def skip_reason(exn: BaseException) -> str:
    """Why a sample was skipped, the same for every sample that failed the same way.

    The sample's key and shard and memory addresses are left out (they differ per sample).
    """
    text = _ADDRESS.sub("0x..", _LOCATION.sub("", str(exn)))
    return f"{type(exn).__name__}: {text}"[:200]


class SkipCounter:
    """Counts samples dropped as corrupt or incomplete in this process, by reason.

    Used as a webdataset-style exception handler (returns True: continue). It logs nothing:
    a worker would repeat the same lines every epoch. Each batch takes the skips since the
    previous one (:meth:`take`, :meth:`take_reasons`) to the main process, where
    :class:`~mmpt.datamodules.skip_log.SkipLog` logs each reason once an epoch with its count.

    Shards that cannot be read are counted apart, once each (:meth:`shard_failed`): a stream
    makes one counter per worker and epoch, and a top-up pass or a resampled draw of a known
    bad shard is not read again.

    Attributes:
        expected: Samples per shard from the index (url -> count), for the samples lost.
        budget: Stops the epoch when its bad shards pass ``max_skipped_fraction``.
        shards: This counter's bad shards (url -> fault).
    """

    def __init__(
        self, expected: dict[str, int] | None = None, budget: SkipBudget | None = None
    ) -> None:
        self.total = 0
        self._pending = 0
        self.reasons: dict[str, list] = {}  # reason -> [count, example] since creation
        self._pending_reasons: dict[str, list] = {}
        self.expected = expected or {}
        self.budget = budget
        self.shards: dict[str, ShardFault] = {}
        self._pending_shards: list[ShardFault] = []

    def __call__(self, exn: BaseException) -> bool:
        """Count ``exn`` under its reason; True tells the caller to continue."""
        self.total += 1
        self._pending += 1
        reason = skip_reason(exn)
        for tally in (self.reasons, self._pending_reasons):
            key = reason if reason in tally or len(tally) < MAX_REASONS else "other"
            entry = tally.setdefault(key, [0, f"{type(exn).__name__}: {exn}"])
            entry[0] += 1
        return True

    def take(self) -> int:
        """Skips since the previous call (attached to the next batch)."""
        n, self._pending = self._pending, 0
        return n

    def take_reasons(self) -> dict[str, list]:
        """``{reason: [count, example message]}`` since the previous call."""
        out, self._pending_reasons = self._pending_reasons, {}
        return out

    def summary(self) -> str:
        """Every reason so far with its count, e.g. ``16 x OSError: ... (e.g. ...)``."""
        reasons = [f"{n} x {r} (e.g. {ex})" for r, (n, ex) in self.reasons.items()]
        return "; ".join(reasons + [f.describe() for f in self.shards.values()])

    def shard_failed(self, url: str, reason: str, read: int) -> int:
        """Count a shard that could not be read (to its end), once; returns the samples lost.

        The lost samples (its index count minus ``read``; 1 without an index) are added to
        the skips of the next batch.

        Raises:
            DataError: The bad shards so far pass the budget (the message lists them).
        """
        if url in self.shards:
            return 0
        fault = ShardFault(url, reason, read, self.expected.get(url))
        self.shards[url] = fault
        self._pending_shards.append(fault)
        lost = 1 if fault.lost is None else fault.lost
        self.total += lost
        self._pending += lost
        if self.budget is not None and (message := self.budget.excess(list(self.shards.values()))):
            raise DataError(message)
        return lost

    def take_shards(self) -> list[ShardFault]:
        """Bad shards found since the previous call."""
        out, self._pending_shards = self._pending_shards, []
        return out


def read_shards(urls: Iterable[str], handler: SkipCounter) -> Iterator[dict[str, Any]]:
    """Open each shard and yield its samples (dicts keyed by extension, plus ``__key__``).

    A shard that cannot be opened, is not a tar, is empty or truncated, or gives fewer samples
    than its index says, is one :meth:`SkipCounter.shard_failed` (its good samples before the
    failure are kept) and reading goes on with the next; a shard already known bad to this
    handler is not read again. A member with an absolute or ``..`` path
    (:mod:`mmpt.shards.members`) is a counted skip, dropped before samples are grouped.
    """
    unread = 0  # shards in a row that gave nothing: a resampled stream of only bad shards
    for url in urls:
        if unread >= MAX_LEADING_FAILURES:
            raise DataError(f"{unread} shards in a row could not be read: {handler.summary()}")
        unread += 1
        if url in handler.shards:
            continue
        try:
            stream = open_url(url)
        except Exception as e:  # noqa: BLE001 - any open failure is a counted bad shard
            handler.shard_failed(url, fault_reason(url, e, 0), 0)
            continue
        read = 0
        try:
            for sample in _shard_samples(url, stream, handler):
                read, unread = read + 1, 0
                yield sample
            stream.close()  # a pipe: reports its command's failure here
        except Exception as e:  # noqa: BLE001 - a tar that breaks off is a counted bad shard
            handler.shard_failed(url, fault_reason(url, e, read), read)
            continue
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        expected = handler.expected.get(url)
        if expected is not None and read < expected:
            reason = f"ends after {read} of the {expected} samples its index lists"
            handler.shard_failed(url, reason, read)


def _shard_samples(url: str, stream: Any, handler: SkipCounter) -> Iterator[dict[str, Any]]:
    """The samples of one opened shard, then its tar error if it breaks off.

    The sample being grouped when the tar breaks off is still yielded (it may be whole).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from mmpt.shards.members import member_problem, refused_member

    def reraise(exn: Exception) -> bool:
        raise exn

    error: list[Exception] = []

    def members() -> Iterator[dict[str, Any]]:
        try:
            for file in tar_file_iterator(stream, handler=reraise):
                problem = member_problem(str(file.get("fname", "")))
                if problem is None:
                    yield file | {"__url__": url}
                else:
                    handler(ValueError(refused_member(url, file["fname"], problem)))
        except Exception as e:  # noqa: BLE001 - raised once the last sample is out
            error.append(e)

    yield from group_by_keys(members(), handler=handler)
    if error:
        raise error[0]


def repeat_passes(make: Callable[[], Iterable[Any]], passes: int | None) -> Iterator[Any]:
    """Items of ``make()``, then of a fresh ``make()`` again, for ``passes`` passes.

    None repeats until the consumer stops. A pass that yields nothing ends it, so it never spins.
    """
    done = 0
    while passes is None or done < passes:
        empty = True
        for item in make():
            empty = False
            yield item
        done += 1
        if empty:
            return


def resampled_urls(urls: Sequence[str], rng: random.Random) -> Iterator[str]:
    """Endless stream of shards drawn with replacement."""
    while True:
        yield urls[rng.randrange(len(urls))]


def mix(
    streams: list[Iterator[Any]],
    weights: Sequence[float] | Callable[[], Sequence[float]],
    rng: random.Random,
) -> Iterator:
    """Interleave endless streams, drawing each item's source with probability ~ weight.

    Args:
        streams: One endless iterator per source.
        weights: One weight per source, or a callable giving the weights in force for the
            next draw (a schedule, see :class:`~mmpt.datamodules.mixing.WeightSchedule`).
        rng: Draws the sources.
    """
    if len(streams) == 1:
        yield from streams[0]
        return
    current = weights if callable(weights) else lambda: weights
    last: Sequence[float] | None = None
    while True:
        w = current()
        if w is not last:  # a schedule returns the same list until the weights change
            last, total = w, float(sum(w))
            cum = list(itertools.accumulate(x / total for x in w))
            top = max(k for k, x in enumerate(w) if x > 0)  # rounding never picks a 0 weight
        r = rng.random()
        i = next((k for k, c in enumerate(cum) if r < c), top)
        yield next(streams[i])


def shuffle(data: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir shuffle with a buffer of ``bufsize`` items (0 or 1: pass through)."""
    if bufsize <= 1:
        yield from data
        return
    buf: list[Any] = []
    for item in data:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(bufsize)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _with_location(exn: Exception, where: str) -> Exception:
    """``exn`` with ``where`` in its message, of the same type where possible.

    ``JSONDecodeError``, ``UnicodeDecodeError`` ... cannot be rebuilt from one string: those
    become a RuntimeError naming the original type.
    """
    try:
        return type(exn)(f"{exn} ({where})")
    except Exception:  # noqa: BLE001 - any constructor signature
        return RuntimeError(f"{type(exn).__name__}: {exn} ({where})")


#: Failures before the first decoded sample that mean the data cannot feed this model.
MAX_LEADING_FAILURES = 1000


def map_skipping(
    data: Iterable[dict[str, Any]],
    fn: Callable[[dict[str, Any]], Any],
    handler: SkipCounter,
    max_leading_failures: int = MAX_LEADING_FAILURES,
) -> Iterator[Any]:
    """Apply ``fn`` to every sample; a sample whose ``fn`` raises is skipped and counted.

    Raises:
        DataError: ``fn`` raised one (a data/model mismatch stops the run), with the sample's
            key and shard added to its message; or the first ``max_leading_failures`` samples
            all failed (e.g. jpg shards for a multispectral model): corruption is never that
            uniform, and a training stream that tops up its quota would retry forever.
    """
    decoded, failures = False, 0
    for sample in data:
        try:
            out = fn(sample)
        except Exception as e:  # noqa: BLE001 - every per-sample failure is a counted skip
            key = sample.get("__key__", "?")
            url = sample.get("__url__", "?")
            located = _with_location(e, f"sample {key!r} in {url}")
            if isinstance(e, DataError):
                raise located from e
            handler(located)
            failures += 1
            if not decoded and failures >= max_leading_failures:
                raise DataError(
                    f"the first {failures} samples all failed to decode, the last with "
                    f"{type(located).__name__}: {located}. The shards do not fit this model "
                    "(image_key, tile layout or bands?)"
                ) from e
            continue
        decoded = True
        yield out


def batched(data: Iterable[Any], batch_size: int, partial: bool) -> Iterator[list[Any]]:
    """Group items into lists of ``batch_size``; the last short one is kept if ``partial``."""
    batch: list[Any] = []
    for item in data:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and partial:
        yield batch
