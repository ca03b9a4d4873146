"""Online sequence packing: first-fit-decreasing bins, restarting positions, flat cu_seqlens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
OVERLONG_POLICIES = ("truncate", "drop")


def first_fit_decreasing(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Bin packing by first-fit-decreasing: longest first, each into the first bin with room.

    Args:
        lengths: Item lengths, each in ``1..max_len``.
        max_len: Bin capacity.

    Returns:
        Bins of item indices, in the order the bins were opened; items inside a bin in
        placement order (longest first, ties by index). Every index appears exactly once.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    bad = [n for n in lengths if not 1 <= n <= max_len]
    if bad:
        raise ValueError(f"lengths must be in 1..{max_len}; got {bad[:5]}")
    # First fit in O(log bins): ``tree`` is a max segment tree over the bins' free room
    # (leaves from ``size``; bins not opened yet have room 0, so they never fit an item >= 1).
    # A scan of the bins made first-fit O(bins) per item.
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [0] * (2 * size)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if tree[1] >= n:  # the lowest-numbered bin with room: go left whenever it fits
            node = 1
            while node < size:
                node *= 2
                if tree[node] < n:
                    node += 1
            bins[node - size].append(i)
            room = tree[node] - n
        else:
            node = size + len(bins)
            bins.append([i])
            room = max_len - n
        tree[node] = room
        node //= 2
        while node:  # update the maxima above, up to the first that does not change
            left, right = tree[2 * node], tree[2 * node + 1]
            top = left if left > right else right
            if tree[node] == top:
                break
            tree[node] = top
            node //= 2
    return bins


def _fit(
    sample: dict[str, Any], max_len: int, overlong: str, token_keys: Sequence[str]
) -> tuple[dict[str, Any] | None, bool]:
    """Check one sample and apply the overlong policy: (sample or None if dropped, truncated)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    for key in ("input_ids", "labels"):
        if key not in sample:
            raise KeyError(f"packing needs {key!r} in every sample; got keys {sorted(sample)}")
    if sample["input_ids"].ndim != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(sample['input_ids'].shape)}")
    n = sample["input_ids"].shape[0]
    for key in ("labels", *token_keys):
        if sample[key].shape[:1] != (n,):
            raise ValueError(
                f"sample key {key!r} has shape {tuple(sample[key].shape)}; per-token tensors "
                f"must start with the sequence length {n}"
            )
    if n == 0 or (n > max_len and overlong == "drop"):
        return None, False
    if n <= max_len:
        return sample, False
    cut = dict(sample)
    for key in ("input_ids", "labels", *token_keys):
        cut[key] = sample[key][:max_len]
    return cut, True


def pack_row(
    samples: Sequence[dict[str, Any]], max_len: int, pad_id: int, token_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Concatenate samples (total length <= max_len) into one padded row.

    Args:
        samples: Dicts with ``input_ids`` (L,), ``labels`` (L,), the ``token_keys`` (L, ...)
            and any other per-sample values.
        max_len: Row length.
        pad_id: Token id of padding.
        token_keys: Extra per-token tensors (e.g. ``image_mask``), padded with zeros.

    Returns:
        ``input_ids`` (max_len,), ``labels`` (max_len,) with -100 on padding and on each
        sample's first token, ``position_ids`` (max_len,) restarting at 0 per sample and
        0.. on the pad tail, ``seq_lens`` long (S,) segment lengths summing to max_len (the
        pad tail is one extra segment), the token keys (max_len, ...), every other key as a
        list in row order, and the counts ``num_samples`` and ``num_real_tokens``.
    """
    lens = [int(s["input_ids"].shape[0]) for s in samples]
    real = sum(lens)
    if real > max_len:
        raise ValueError(f"samples of lengths {lens} do not fit in max_len={max_len}")
    pad = max_len - real
    seq_lens = lens + ([pad] if pad else [])
    ids = [s["input_ids"] for s in samples]
    labels = []
    for s in samples:
        lab = s["labels"].clone()
        lab[0] = IGNORE_INDEX  # HF shifts labels: it would be the previous sample's target
        labels.append(lab)
    row: dict[str, Any] = {
        "input_ids": torch.cat([*ids, ids[0].new_full((pad,), pad_id)]),
        "labels": torch.cat([*labels, labels[0].new_full((pad,), IGNORE_INDEX)]),
        "position_ids": torch.cat([torch.arange(n) for n in seq_lens]),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.long),
        "num_samples": len(samples),
        "num_real_tokens": real,
    }
    for key in token_keys:
        parts = [s[key] for s in samples]
        row[key] = torch.cat([*parts, parts[0].new_zeros((pad, *parts[0].shape[1:]))])
    for key in samples[0].keys() - {"input_ids", "labels", *token_keys}:
        row[key] = [s[key] for s in samples]
    return row


def collate_packed(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack packed rows into the batch that ``models.attention`` consumes.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (R, L) and token keys (R, L, ...);
        ``cu_seqlens`` int32 (S + 1,) offsets of every segment (pad tails included) in the
        row-major flattened R * L tokens, so each row start is a boundary and
        ``cu_seqlens[-1] == R * L``; ``max_seqlen`` (int, longest segment); per-sample
        lists concatenated in row order; summed counts ``num_samples``, ``num_real_tokens``,
        ``num_truncated``, ``num_dropped``; and ``fill_fraction`` = real tokens / (R * L).
    """
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    seq_lens = torch.cat([r["seq_lens"] for r in rows])
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = seq_lens.cumsum(0)
    out: dict[str, Any] = {"cu_seqlens": cu, "max_seqlen": int(seq_lens.max())}
    counts = ("num_samples", "num_real_tokens", "num_truncated", "num_dropped")
    for key, value in rows[0].items():
        if key == "seq_lens" or key in counts:
            continue
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([r[key] for r in rows])
        else:
            out[key] = [v for r in rows for v in r[key]]
    for key in counts:
        out[key] = sum(r.get(key, 0) for r in rows)
    out["fill_fraction"] = out["num_real_tokens"] / out["input_ids"].numel()
    return out


def pack_sequences(
    seqs: Sequence[dict[str, Any]],
    max_len: int,
    pad_id: int,
    overlong: str = "truncate",
    token_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Pack a list of samples into as few rows of ``max_len`` as first-fit-decreasing finds.

    Args:
        seqs: Samples as for ``pack_row``.
        max_len: Row length.
        pad_id: Token id of padding.
        overlong: ``"truncate"`` keeps the first ``max_len`` tokens of a longer sample (do
            not use it where that would cut an image's tokens); ``"drop"`` skips it.
        token_keys: Extra per-token tensors.

    Returns:
        ``collate_packed`` of the rows, plus ``bins``: the indices into ``seqs`` of each
        row's samples, in row order. Empty samples count as dropped.
    """
    kept, index, truncated, dropped = [], [], 0, 0
    for i, s in enumerate(seqs):
        fitted, cut = _fit(s, max_len, overlong, token_keys)
        truncated += cut
        if fitted is None:
            dropped += 1
            continue
        kept.append(fitted)
        index.append(i)
    if not kept:
        raise ValueError(f"nothing to pack: all {len(seqs)} samples were empty or dropped")
    bins = first_fit_decreasing([s["input_ids"].shape[0] for s in kept], max_len)
    rows = [pack_row([kept[i] for i in b], max_len, pad_id, token_keys) for b in bins]
    batch = collate_packed(rows)
    batch.update(num_truncated=truncated, num_dropped=dropped)
    batch["bins"] = [[index[i] for i in b] for b in bins]
    return batch


def pack_stream(
    samples: Iterable[dict[str, Any]],
    max_len: int,
    pad_id: int,
    buffer_size: int = 256,
    overlong: str = "truncate",
    token_keys: Sequence[str] = (),
    min_fill: float = 0.95,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: samples in, packed rows (``pack_row`` dicts) out.

    Every ``buffer_size`` samples are packed with first-fit-decreasing. Rows filled to at
    least ``min_fill`` are emitted; the samples of emptier rows (at most half a buffer) stay
    in the buffer to be packed with the next samples. The end of the stream flushes all.
    Batch the rows with ``collate_packed``.

    Args:
        samples: Dicts with ``input_ids`` (L,), ``labels`` (L,) and optional extras.
        max_len: Row length.
        pad_id: Token id of padding.
        buffer_size: Samples looked at together.
        overlong: ``"truncate"`` or ``"drop"`` (see ``pack_sequences``).
        token_keys: Extra per-token tensors.
        min_fill: Fill fraction a row needs to leave before the stream ends.

    Yields:
        Rows, each with ``num_truncated`` and ``num_dropped``: samples truncated or dropped
        (or empty) since the previous row.
    """
    buffer: list[dict[str, Any]] = []
    pending = {"num_truncated": 0, "num_dropped": 0}

    def emit(flush: bool) -> Iterator[dict[str, Any]]:
        nonlocal buffer
        bins = first_fit_decreasing([s["input_ids"].shape[0] for s in buffer], max_len)
        fill = [sum(buffer[i]["input_ids"].shape[0] for i in b) / max_len for b in bins]
        carry: list[int] = []
        room = 0 if flush else buffer_size // 2  # samples that may stay in the buffer
        for b in sorted(range(len(bins)), key=lambda b: fill[b]):
            if fill[b] >= min_fill or len(bins[b]) > room:
                break
            carry.append(b)
            room -= len(bins[b])
        carried = set(carry)
        rows = [
            pack_row([buffer[i] for i in b], max_len, pad_id, token_keys)
            for j, b in enumerate(bins)
            if j not in carried
        ]
        buffer = [buffer[i] for b in carry for i in bins[b]]
        for row in rows:
            row.update(pending)
            pending.update(num_truncated=0, num_dropped=0)
            yield row

    for sample in samples:
        fitted, cut = _fit(sample, max_len, overlong, token_keys)
        pending["num_truncated"] += cut
        if fitted is None:
            pending["num_dropped"] += 1
            continue
        buffer.append(fitted)
        if len(buffer) >= buffer_size:
            yield from emit(flush=False)
    if buffer:
        yield from emit(flush=True)
