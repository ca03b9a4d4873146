"""Shard sources: expand patterns, resolve folders, open any URL, check at start-up."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import braceexpand

from mmpt.shards.index import INDEX_NAME, ShardIndex, load_index

REMOTE_PREFIXES = ("pipe:",)


def is_remote(url: str) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs (s3, gs, http, hf ...)."""
    return url.startswith(REMOTE_PREFIXES) or ("://" in url and not url.startswith("file://"))


@dataclass
class ResolvedSource:
    """The shard list of one source.

    Attributes:
        urls: Shard URLs or local paths, in a stable order.
        counts: Samples per shard when an ``index.json`` gives them, else None.
        meta: The index's ``meta`` (class names, templates ...) when there is one.
        spec: The pattern the user wrote, for error messages.
    """

    urls: list[str]
    counts: list[int] | None
    meta: dict
    spec: str

    @property
    def num_samples(self) -> int | None:
        """Total samples when known from an index."""
        return sum(self.counts) if self.counts is not None else None


def resolve_source(spec: str, field: str = "data.train.urls") -> ResolvedSource:
    """Turn one user-written source into its list of shards.

    Accepts a local folder (its ``index.json``, else every ``*.tar`` in it), a local index
    ``.json`` file (``mmpt data index --out``: its shards, local or remote, with their counts),
    a local file or glob, a brace pattern (``shards-{000000..000099}.tar``), a ``pipe:``
    command or an fsspec URL (``s3://``, ``gs://``, ``https://`` ...). Local shards must
    exist: remote ones are checked when opened.

    Args:
        spec: The pattern.
        field: The config field it came from, named in errors.

    Raises:
        FileNotFoundError: A local folder, file or pattern matched nothing, or an indexed shard
            is missing. The message names the path and the config field.
    """
    spec = spec.strip()
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    if not is_remote(spec) and Path(spec).is_dir():
        return _resolve_folder(Path(spec), field)
    index = load_index(spec) if not is_remote(spec) and spec.endswith(".json") else None
    if index is not None:
        return _resolve_index(Path(spec), index, field)
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if any(is_remote(u) for u in urls):
        return ResolvedSource(urls, None, {}, spec)
    found: list[str] = []
    missing: list[str] = []
    for u in urls:
        matches = sorted(glob.glob(u)) if glob.has_magic(u) else ([u] if Path(u).is_file() else [])
        (found.extend(matches) if matches else missing.append(u))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shard(s) not found (from {field}={spec!r}): "
            f"{', '.join(repr(m) for m in missing[:3])}{' ...' if len(missing) > 3 else ''}. "
            "Check the path, or build shards with `mmpt data build` / `mmpt data synth`."
        )
    counts, meta = _counts_from_neighbouring_index(found)
    return ResolvedSource(found, counts, meta, spec)


def _resolve_folder(folder: Path, field: str) -> ResolvedSource:
    index = load_index(folder)
    if index is None:
        tars = sorted(str(p) for p in folder.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(
                f"no .tar shards and no index.json in {str(folder)!r} (from {field}); "
                "build shards with `mmpt data build` or `mmpt data synth`."
            )
        return ResolvedSource(tars, None, {}, str(folder))
    return _resolve_index(folder / INDEX_NAME, index, field)


def _resolve_index(path: Path, index: ShardIndex, field: str) -> ResolvedSource:
    """The shards an index file lists: names relative to its folder, or absolute/remote URLs."""
    urls = [s.name if is_remote(s.name) else str(path.parent / s.name) for s in index.shards]
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) listed in {path} are missing, first: "
            f"{missing[0]!r} (from {field}). Rebuild the shards or fix the index."
        )
    if index.num_samples == 0:
        raise ValueError(f"{path} lists no samples (from {field}): empty source")
    spec = str(path.parent) if path.name == INDEX_NAME else str(path)
    return ResolvedSource(urls, [s.samples for s in index.shards], index.meta, spec)


def _counts_from_neighbouring_index(paths: list[str]) -> tuple[list[int] | None, dict]:
    """Per-shard counts for local shards whose folder has an index listing them all."""
    by_name: dict[str, int] = {}
    meta: dict = {}
    for folder in {str(Path(p).parent) for p in paths}:
        index = load_index(folder)
        if index is None:
            return None, {}
        meta = meta or index.meta
        by_name.update({str(Path(folder) / s.name): s.samples for s in index.shards})
    if not all(p in by_name for p in paths):
        return None, meta
    return [by_name[p] for p in paths], meta


def open_url(url: str) -> IO[bytes]:
    """Open a shard for reading: local path, ``pipe:`` command, or any fsspec URL.

    Args:
        url: The shard URL.

    Returns:
        A binary stream; the caller closes it.
    """
    if url.startswith("pipe:") or not is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()
