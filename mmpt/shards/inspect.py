"""Inspect WebDataset shards: sample counts, keys, missing and corrupt samples, index drift."""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmpt.shards.index import INDEX_NAME, ShardIndex, load_index

MAX_EXAMPLES = 10  # problem samples listed per kind of problem
MAX_SHARD_ROWS = 50  # rows of the per-shard table


@dataclass
class ShardStats:
    """One shard as read from disk.

    Attributes:
        name: File name (relative to the inspected folder).
        samples: Samples read (up to the error, if any).
        expected: Sample count recorded in ``index.json``; None when it has no entry.
        error: Why the shard could not be read to the end (missing, truncated ...), or None.

    """

    name: str
    samples: int = 0
    expected: int | None = None
    error: str | None = None


@dataclass
class InspectReport:
    """What :func:`inspect_shards` found.

    Attributes:
        path: The inspected folder or ``.tar`` file.
        shards: Per-shard counts and read errors.
        extensions: File extension -> number of samples that carry it.
        missing_image: Samples with none of the image extensions.
        missing_text: Samples with no text extension, or only empty text.
        corrupt_images: Images that fail to decode (only counted with ``check``).
        corrupt_json: ``json`` files that fail to parse (only counted with ``check``).
        examples: The first few problem samples: ``shard``, ``key``, ``problem``.
        mismatches: Disagreements between the files and ``index.json``.
        index_found: Whether an ``index.json`` was compared against.
        checked: Whether images and json were decoded.

    """

    path: str
    shards: list[ShardStats] = field(default_factory=list)
    extensions: dict[str, int] = field(default_factory=dict)
    missing_image: int = 0
    missing_text: int = 0
    corrupt_images: int = 0
    corrupt_json: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    index_found: bool = False
    checked: bool = False

    @property
    def total_samples(self) -> int:
        """Samples read over all shards."""
        return sum(s.samples for s in self.shards)

    @property
    def errors(self) -> list[str]:
        """One line per shard that could not be read to the end."""
        return [f"{s.name}: {s.error}" for s in self.shards if s.error]

    @property
    def ok(self) -> bool:
        """True when nothing is missing, corrupt, unreadable or out of line with the index."""
        problems = self.missing_image + self.missing_text + self.corrupt_images
        return not (problems + self.corrupt_json or self.mismatches or self.errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``total_samples``, ``errors`` and ``ok``."""
        d = asdict(self)
        d.update(total_samples=self.total_samples, errors=self.errors, ok=self.ok)
        return d


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's naming rule: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:  # no extension, or a hidden file: the loader skips it too
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _decode_problem(ext: str, data: bytes, image_keys: tuple[str, ...]) -> str | None:
    """Why ``data`` fails to decode as its extension says, or None when it decodes."""
    try:
        if ext in image_keys:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        elif ext == "json" or ext.endswith(".json"):
            json.loads(data)
    except Exception as e:  # any failure is the sample's fault: report it, go on
        return f"corrupt {ext}: {type(e).__name__}: {e}"
    return None


def _scan_shard(
    args: tuple[Path, str, bool, tuple[str, ...], tuple[str, ...]],
) -> tuple[ShardStats, Counter, list[dict[str, str]]]:
    """Read one tar; returns its stats, problem counts and extension counts, and examples."""
    path, name, check, image_keys, text_keys = args
    stats, counts, examples = ShardStats(name), Counter(), []

    def note(key: str, problem: str, kind: str) -> None:
        counts[kind] += 1
        if len([e for e in examples if e["kind"] == kind]) < MAX_EXAMPLES:
            examples.append({"shard": name, "key": key, "problem": problem, "kind": kind})

    def finish(key: str | None, files: dict[str, bytes | None]) -> None:
        if key is None:
            return
        stats.samples += 1
        counts.update(f"ext:{ext}" for ext in files)
        if not any(ext in files for ext in image_keys):
            note(key, "no image", "missing_image")
        texts = [files[ext] for ext in text_keys if ext in files]
        if not any(t is not None and t.strip() for t in texts):
            note(key, "no text" if not texts else "empty text", "missing_text")
        for ext, data in files.items():
            problem = _decode_problem(ext, data, image_keys) if data is not None else None
            if problem:
                note(key, problem, "corrupt_images" if ext in image_keys else "corrupt_json")

    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                parts = _split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    finish(key, files)
                    key, files = parts[0], {}
                read = check or parts[1] in text_keys
                files[parts[1]] = tf.extractfile(member).read() if read else None
        finish(key, files)
    except (tarfile.TarError, OSError, EOFError) as e:
        stats.error = (
            f"unreadable or truncated tar ({type(e).__name__}: {e}) after {stats.samples} samples"
        )
    return stats, counts, examples


def _shard_paths(path: Path) -> tuple[list[tuple[Path, str]], ShardIndex | None]:
    """List the shards to read as (path, name), and the index to compare them with."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a folder of .tar shards or a .tar file"
        )
    if path.is_file():
        if ".tar" not in path.name:
            raise ValueError(f"{path} is not a .tar file; give a folder of shards or a .tar file")
        return [(path, path.name)], load_index(path.parent)
    index = load_index(path)
    names = [s.name for s in index.shards] if index else []
    names += [p.name for p in sorted(path.glob("*.tar")) if p.name not in names]
    if not names:
        raise ValueError(f"{path} holds no .tar shards and no {INDEX_NAME}; nothing to inspect")
    return [(path / n, n) for n in names], index


def inspect_shards(
    path: str | Path,
    check: bool = False,
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    text_keys: tuple[str, ...] = ("txt",),
    workers: int = 1,
) -> InspectReport:
    """Read every shard and report counts, extensions, problems and drift from ``index.json``.

    Args:
        path: A folder of shards (the shards named in its ``index.json`` plus any other
            ``*.tar``; sorted by name without an index) or a single ``.tar`` file (compared
            with its folder's ``index.json`` entry when there is one).
        check: Also decode every image (PIL verify + load) and parse every json.
        image_keys: Extensions that count as an image.
        text_keys: Extensions that count as a caption.
        workers: Processes reading shards in parallel.

    Returns:
        An :class:`InspectReport`; a truncated or unreadable tar is reported, not raised.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a shard folder nor a ``.tar`` file, or its
            ``index.json`` is invalid.

    """
    shards, index = _shard_paths(Path(path))
    report = InspectReport(path=str(path), index_found=index is not None, checked=check)
    expected = {s.name: s.samples for s in index.shards} if index else {}
    keys = (tuple(k.lower() for k in image_keys), tuple(k.lower() for k in text_keys))
    todo = [(p, name, check, *keys) for p, name in shards if p.is_file()]
    if workers > 1 and len(todo) > 1:
        with multiprocessing.Pool(min(workers, len(todo))) as pool:
            results = list(pool.imap(_scan_shard, todo))
    else:
        results = [_scan_shard(t) for t in todo]
    scanned = {stats.name: (stats, counts, examples) for stats, counts, examples in results}
    totals: Counter = Counter()
    for _, name in shards:
        stats, counts, examples = scanned.get(name, (ShardStats(name, error="missing"), {}, []))
        stats.expected = expected.get(name)
        report.shards.append(stats)
        totals.update(counts)
        for e in examples:  # keep the first few of each kind over all shards
            if sum(x["kind"] == e["kind"] for x in report.examples) < MAX_EXAMPLES:
                report.examples.append(e)
        if stats.error == "missing":
            report.mismatches.append(f"{name} is listed in {INDEX_NAME} but the file is missing")
        elif index is not None and stats.expected is None:
            report.mismatches.append(f"{name} is not listed in {INDEX_NAME}")
        elif stats.expected is not None and stats.expected != stats.samples:
            report.mismatches.append(
                f"{name}: {INDEX_NAME} says {stats.expected} samples, found {stats.samples}"
            )
    report.extensions = {k[4:]: v for k, v in sorted(totals.items()) if k.startswith("ext:")}
    for kind in ("missing_image", "missing_text", "corrupt_images", "corrupt_json"):
        setattr(report, kind, totals[kind])
    found = sorted(report.extensions)
    if index is not None and Path(path).is_dir() and index.keys and sorted(index.keys) != found:
        report.mismatches.append(
            f"{INDEX_NAME} lists keys {sorted(index.keys)}, shards hold {found}"
        )
    return report


def print_report(report: InspectReport, console: Any = None) -> None:
    """Render a report as Rich tables (summary, extensions, shards, problems).

    Args:
        report: From :func:`inspect_shards`.
        console: A ``rich.console.Console``; default a new one on stdout.

    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    expected = sum(s.expected or 0 for s in report.shards) if report.index_found else None
    summary = Table(title=f"shards: {report.path}", show_header=False)
    summary.add_row("shards", str(len(report.shards)))
    summary.add_row("samples", str(report.total_samples))
    summary.add_row(f"samples in {INDEX_NAME}", "no index" if expected is None else str(expected))
    summary.add_row("images decoded", "yes" if report.checked else "no (use --check)")
    console.print(summary)

    exts = Table(title="extensions")
    exts.add_column("ext")
    exts.add_column("samples", justify="right")
    exts.add_column("share", justify="right")
    for ext, n in report.extensions.items():
        exts.add_row(ext, str(n), f"{n / max(1, report.total_samples):.1%}")
    console.print(exts)

    shards = Table(title="per shard")
    for col in ("shard", "samples", "in index", "status"):
        shards.add_column(col)
    for s in report.shards[:MAX_SHARD_ROWS]:
        status = f"[red]{s.error}[/]" if s.error else "ok"
        shards.add_row(
            s.name, str(s.samples), "-" if s.expected is None else str(s.expected), status
        )
    if len(report.shards) > MAX_SHARD_ROWS:
        shards.add_row(f"... {len(report.shards) - MAX_SHARD_ROWS} more", "", "", "")
    console.print(shards)

    problems = Table(title="problems")
    problems.add_column("problem")
    problems.add_column("count / detail")
    for kind in ("missing_image", "missing_text", "corrupt_images", "corrupt_json"):
        if getattr(report, kind):
            problems.add_row(kind, str(getattr(report, kind)))
    for e in report.examples:
        problems.add_row(f"  {e['shard']} / {e['key']}", e["problem"])
    for line in report.mismatches + report.errors:
        problems.add_row("[red]index or file[/]", line)
    if problems.row_count:
        console.print(problems)
    console.print("[green]OK[/]" if report.ok else "[red]problems found[/]")
