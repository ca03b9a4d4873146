"""The result of a shard inspection (:class:`InspectReport`) and its rendering as Rich tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mmpt.shards.index import INDEX_NAME

MAX_SHARD_ROWS = 50  # rows of the per-shard table
PROBLEM_KINDS = (
    "missing_image",
    "missing_text",
    "missing_member",
    "corrupt_images",
    "corrupt_json",
    "unsafe_member",
)


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
        shapes: Sample shape (``pair``, ``interleaved``, ``conversation``, ``text``) -> samples.
        images: Image members over all samples.
        images_per_sample: Image members in a sample -> number of such samples.
        text_only: Whether the index marks the set as text-only, so samples need no image.
        missing_image: Samples (not interleaved, not conversations) with no image member;
            not counted when ``text_only``.
        missing_text: Samples with no text (``txt``, json ``caption``/``text``/``texts``/
            ``messages``/``conversations``), or only empty text.
        missing_member: Images named by an interleaved or conversation ``json`` that the
            sample lacks (one count per missing member).
        corrupt_images: Images that fail to decode (only counted with ``check``).
        corrupt_json: ``json`` files that fail to parse (only counted with ``check``), and
            interleaved ``json`` whose ``texts`` and ``images`` are not lists of one length.
        unsafe_member: Tar members with an absolute or ``..`` path, skipped unread.
        examples: The first few problem samples: ``shard``, ``key``, ``problem``, ``kind``.
        mismatches: Disagreements between the files and ``index.json``.
        index_found: Whether an ``index.json`` was compared against.
        checked: Whether images and json were decoded.

    """

    path: str
    shards: list[ShardStats] = field(default_factory=list)
    extensions: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    images_per_sample: dict[int, int] = field(default_factory=dict)
    text_only: bool = False
    missing_image: int = 0
    missing_text: int = 0
    missing_member: int = 0
    corrupt_images: int = 0
    corrupt_json: int = 0
    unsafe_member: int = 0
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
        problems = sum(getattr(self, kind) for kind in PROBLEM_KINDS)
        return not (problems or self.mismatches or self.errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``total_samples``, ``errors`` and ``ok``."""
        d = asdict(self)
        d.update(total_samples=self.total_samples, errors=self.errors, ok=self.ok)
        return d


def _images_summary(report: InspectReport) -> str:
    """``"27 (per sample: 1-4, mean 2.7)"``, or the count alone when no sample has an image."""
    per_sample = report.images_per_sample
    if not report.images or not per_sample:
        return str(report.images)
    low, high = min(per_sample), max(per_sample)
    mean = report.images / max(1, sum(per_sample.values()))
    spread = str(low) if low == high else f"{low}-{high}"
    return f"{report.images} (per sample: {spread}, mean {mean:.1f})"


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
    shapes = ", ".join(f"{shape} {n}" for shape, n in report.shapes.items()) or "-"
    summary.add_row("sample shapes", shapes + (" (text-only set)" if report.text_only else ""))
    summary.add_row("images", _images_summary(report))
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
    for kind in PROBLEM_KINDS:
        if getattr(report, kind):
            problems.add_row(kind, str(getattr(report, kind)))
    for e in report.examples:
        problems.add_row(f"  {e['shard']} / {e['key']}", e["problem"])
    for line in report.mismatches + report.errors:
        problems.add_row("[red]index or file[/]", line)
    if problems.row_count:
        console.print(problems)
    console.print("[green]OK[/]" if report.ok else "[red]problems found[/]")
