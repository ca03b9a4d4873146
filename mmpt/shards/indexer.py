"""``mmpt data index``: count the samples of existing shards and write their ``index.json``.

Counts come from the tar headers (:mod:`~mmpt.shards.tar_headers`: nothing is decoded, and a
local tar is read by seeking past each member's data), grouped into samples by WebDataset's
own key rule, or from the counts
that img2dataset (``<shard>_stats.json``, field ``successes``) or open_clip (``sizes.json``)
wrote beside the shards, when those cover every shard and agree with the first shard's
headers.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmpt.shards.index import INDEX_NAME, ShardIndex, ShardInfo, load_index
from mmpt.shards.members import member_problem
from mmpt.shards.tar_headers import tar_members

SOURCES = ("tar headers", "img2dataset *_stats.json", "open_clip sizes.json")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skip_meta
_MODALITY_EXTS = {
    "image": {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "npy"},
    "text": {"txt", "json"},
    "audio": {"flac", "wav", "mp3", "ogg", "opus", "m4a"},
    "video": {"mp4", "webm", "mkv", "avi", "mov"},
}


@dataclass
class ShardCount:
    """One shard's count.

    Attributes:
        url: The shard's path or URL.
        samples: Samples found (up to the error, if any).
        keys: Member extensions seen (``jpg``, ``txt``, ``0.jpg`` ...).
        error: Why the shard could not be read to its end, or None.
    """

    url: str
    samples: int = 0
    keys: set[str] = field(default_factory=set)
    error: str | None = None


@dataclass
class IndexReport:
    """What ``mmpt data index`` wrote.

    Attributes:
        index_path: The ``index.json`` written.
        source: Where the counts came from, one of :data:`SOURCES`.
        shards: Counted shards (the corrupt ones are not in the index).
        corrupt: ``(url, error)`` of the shards that could not be read.
        note: Why the counts beside the shards were not used, if they were found.
    """

    index_path: Path
    source: str
    shards: list[ShardCount]
    corrupt: list[tuple[str, str]]
    note: str = ""

    @property
    def num_samples(self) -> int:
        """Samples over the indexed shards."""
        return sum(s.samples for s in self.shards)


def sample_keys(members: Iterator[tuple[str, bool]]) -> Iterator[tuple[str, str]]:
    """(key, extension) of each member that WebDataset reads, in tar order.

    Args:
        members: (name, is a regular file) of each tar member.

    Yields:
        The key and lower-case extension of each regular, non-meta member with an extension
        (``webdataset.tariterators.base_plus_ext``); consecutive equal keys are one sample.
        Members with an absolute or ``..`` path are left out, as the training reader skips
        them (:mod:`mmpt.shards.members`).
    """
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    for name, regular in members:
        if not regular or _SKIP_META.match(name) or member_problem(name) is not None:
            continue
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        key, ext = base_plus_ext(name)
        if key is not None:
            yield key, ext.lower()


def count_shard(url: str) -> ShardCount:
    """Count one shard's samples from its tar headers (never raises for a bad shard).

    Args:
        url: Local path, ``pipe:`` command or fsspec URL.

    Returns:
        The count; ``error`` says why reading stopped early.
    """
    from mmpt.datamodules.urls import open_url

    result = ShardCount(url)
    try:
        with open_url(url) as stream:
            last = None
            for key, ext in sample_keys(tar_members(stream)):
                result.keys.add(ext)
                if key != last:
                    result.samples, last = result.samples + 1, key
    except (OSError, EOFError, ValueError) as e:  # TarHeaderError is a ValueError
        result.error = f"{type(e).__name__}: {e} (after {result.samples} samples)"
    return result


def _stats_counts(urls: list[str]) -> tuple[list[int] | None, str, str]:
    """Per-shard counts from img2dataset's or open_clip's files beside local shards.

    Returns:
        (counts or None, the source's name, a note when files were found but not usable).
    """
    from mmpt.datamodules.urls import is_remote

    if not urls or any(is_remote(u) for u in urls):
        return None, "", ""
    paths = [Path(u) for u in urls]
    stats = [p.with_name(p.name.removesuffix(".tar") + "_stats.json") for p in paths]
    if all(s.is_file() for s in stats):
        try:
            counts = [int(json.loads(s.read_text())["successes"]) for s in stats]
            return counts, SOURCES[1], ""
        except (ValueError, KeyError, TypeError) as e:
            return None, "", f"unreadable *_stats.json ({type(e).__name__}: {e})"
    folders = {p.parent for p in paths}
    sizes = next(iter(folders)) / "sizes.json" if len(folders) == 1 else None
    if sizes is not None and sizes.is_file():
        try:
            table = json.loads(sizes.read_text())
            return [int(table[p.name]) for p in paths], SOURCES[2], ""
        except (ValueError, KeyError, TypeError) as e:
            return None, "", f"{sizes} does not list every shard ({type(e).__name__}: {e})"
    found = sum(s.is_file() for s in stats)
    note = f"only {found} of {len(stats)} shards have a *_stats.json" if found else ""
    return None, "", note


def _index_location(spec: str, urls: list[str], out: str | Path | None) -> Path:
    """Where ``index.json`` goes: ``out``, else beside the (local, one-folder) shards."""
    if out is not None:
        out = Path(out)
        return out / INDEX_NAME if out.is_dir() or not out.suffix else out
    from mmpt.datamodules.urls import is_remote

    folders = {Path(u).parent for u in urls}
    if any(is_remote(u) for u in urls) or len(folders) != 1:
        where = "remote shards" if any(is_remote(u) for u in urls) else "shards in several folders"
        raise ValueError(f"{spec}: {where}; say where index.json goes with --out FILE")
    return folders.pop() / INDEX_NAME


def _shard_urls(spec: str) -> list[str]:
    """The shards of a folder (its ``*.tar``), a pattern, or URLs (via the datamodules' rule)."""
    from mmpt.datamodules.urls import is_remote, resolve_source

    if not is_remote(spec) and Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{spec} holds no .tar shards; give a folder of shards")
        return urls
    return resolve_source(spec, field="PATH").urls


def _name(url: str, folder: Path) -> str:
    """A shard's name in the index: relative to the index's folder when inside it."""
    from mmpt.datamodules.urls import is_remote

    if is_remote(url):
        return url
    try:
        return str(Path(url).resolve().relative_to(folder.resolve()))
    except ValueError:
        return url


def index_shards(spec: str | Path, out: str | Path | None = None, workers: int = 1) -> IndexReport:
    """Count the samples of existing shards and write ``index.json``.

    Args:
        spec: A folder of ``.tar`` shards, a file, glob or brace pattern, a ``pipe:`` command
            or an fsspec URL (``::`` joins several).
        out: The ``index.json`` to write (a folder gets ``index.json`` inside it); default
            beside the shards (needed for remote shards).
        workers: Processes reading shards in parallel.

    Returns:
        An :class:`IndexReport`. Unreadable shards are listed in it and left out of the index;
        ``meta`` of an ``index.json`` already at the target is kept.

    Raises:
        FileNotFoundError: No shards match ``spec``.
        ValueError: ``workers`` < 1, the index location is ambiguous, or no shard is readable.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    spec = str(spec)
    urls = _shard_urls(spec)
    path = _index_location(spec, urls, out)
    counts, source, note = _stats_counts(urls)
    if counts is not None:
        first = count_shard(urls[0])
        if first.error is None and first.samples != counts[0]:
            note = f"{source} says {counts[0]} samples in {urls[0]}, its headers {first.samples}"
            counts = None
    if counts is not None:
        shards = [ShardCount(u, n) for u, n in zip(urls, counts, strict=True)]
        shards[0].keys = first.keys
    else:
        source = SOURCES[0]
        shards = _count_all(urls, workers)
    good = [s for s in shards if s.error is None]
    corrupt = [(s.url, s.error) for s in shards if s.error is not None]
    if not good:
        raise ValueError(f"no readable shard in {spec}: {corrupt[0][0]}: {corrupt[0][1]}")
    _write(path, good, source, corrupt)
    return IndexReport(path, source, good, corrupt, note)


def _count_all(urls: list[str], workers: int) -> list[ShardCount]:
    if workers == 1 or len(urls) == 1:
        return [count_shard(u) for u in urls]
    chunk = max(1, len(urls) // (workers * 8))
    with multiprocessing.Pool(min(workers, len(urls))) as pool:  # no torch here: fork is safe
        return list(pool.imap(count_shard, urls, chunk))


def _write(
    path: Path, shards: list[ShardCount], source: str, corrupt: list[tuple[str, str]]
) -> None:
    keys = sorted(set().union(*(s.keys for s in shards)))
    bare = {k.rpartition(".")[2] for k in keys}  # "0.jpg" is an image too
    modalities = [m for m, exts in _MODALITY_EXTS.items() if bare & exts]
    old = load_index(path) if path.is_file() else None  # keep its meta (class names ...)
    meta = dict(old.meta) if old is not None else {}
    meta["indexed"] = {"source": source, "corrupt": [{"url": u, "error": e} for u, e in corrupt]}
    index = ShardIndex(
        shards=[ShardInfo(_name(s.url, path.parent), s.samples) for s in shards],
        keys=keys,
        modalities=modalities,
        meta=meta,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    from mmpt.io import atomic_write_text

    atomic_write_text(path, json.dumps(index.to_dict(), indent=2) + "\n")
