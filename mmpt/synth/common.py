"""Helpers shared by the synthetic generators: argument checks and split folders/writers."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.build import prepare_out_dir
from mmpt.shards.index import load_index
from mmpt.shards.writer import ShardWriter


def clear_previous(folder: Path, overwrite: bool, generator: str) -> None:
    """Let a rerun replace a generator's own earlier output; anything else needs ``overwrite``.

    Args:
        folder: A split folder (``out/train``) about to be written.
        overwrite: Also delete shards that ``generator`` did not write.
        generator: Name recorded as ``meta["generator"]["name"]`` in the folder's
            ``index.json`` by the generator about to write.

    Raises:
        ValueError: ``folder`` holds other shards and ``overwrite`` is False.

    """
    try:
        index = load_index(folder) if folder.is_dir() else None
    except ValueError:
        index = None
    if index is not None:
        ours = index.meta.get("generator", {}).get("name") == generator
    else:  # an interrupted run leaves finished shards and no index.json
        ours = all(re.fullmatch(r"shard-\d{6}\.tar", p.name) for p in folder.glob("*.tar"))
    prepare_out_dir(folder, overwrite=overwrite or ours)


def check_minimums(checks: dict[str, tuple[int, int]]) -> None:
    """Raise for the first ``name: (value, low)`` whose value is below ``low``.

    Raises:
        ValueError: ``"{name} must be >= {low} (--{flag}), got {value}"``.

    """
    for name, (value, low) in checks.items():
        if value < low:
            raise ValueError(f"{name} must be >= {low} (--{name.replace('_', '-')}), got {value}")


def split_folders(
    out: Path, splits: Iterable[str], overwrite: bool, generator: str
) -> dict[str, Path]:
    """``out/<split>`` for each split, each cleared for ``generator`` by :func:`clear_previous`."""
    folders = {split: out / split for split in splits}
    for folder in folders.values():
        clear_previous(folder, overwrite, generator=generator)
    return folders


@contextlib.contextmanager
def split_writer(
    result: dict[str, Any],
    split: str,
    folder: Path,
    count: int,
    samples_per_shard: int,
    modalities: list[str],
    meta: dict[str, Any],
) -> Iterator[ShardWriter]:
    """A :class:`ShardWriter` for one split's folder, recording the split in ``result``.

    Once the writer closes, ``result`` gets ``{split}`` (the folder), ``{split}_samples``
    (``count``) and ``{split}_shards``.
    """
    writer = ShardWriter(folder, samples_per_shard, modalities=modalities, meta=meta)
    with writer:
        yield writer
    result |= {
        split: str(folder),
        f"{split}_samples": count,
        f"{split}_shards": len(writer.index.shards),
    }
