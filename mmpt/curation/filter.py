"""``mmpt data filter``: keep the samples a ``--keep`` expression over score tables selects.

Kept samples are copied member for member (the same bytes) into new shards with an
``index.json`` whose ``meta.curation`` records the expression, the score tables, the sources
and the counts kept and dropped by reason; ``provenance.parquet`` beside it maps every output
sample to its source shard and key with its scores.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.curation.expr import KeepExpression
from mmpt.curation.tables import KEY_COLUMNS, join_scores, shard_name, write_table

log = logging.getLogger(__name__)

#: the reason of a sample no score table has
NO_SCORE = "no score"


@dataclass
class FilterReport:
    """What ``mmpt data filter`` did.

    Attributes:
        kept: Samples written.
        dropped: Samples left out, by reason: the first ``and`` term of ``--keep`` they fail,
            ``no score``, ``quota <source>`` or ``unreadable``.
        out: The output folder.
    """

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    out: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"kept": self.kept, "dropped": dict(self.dropped), "out": self.out}


def decide(table: Any, keep: KeepExpression) -> tuple[np.ndarray, list[str | None]]:
    """Keep mask (N,) of the table's rows and, per dropped row, its reason.

    The reason is the first top-level ``and`` term of ``keep`` the row fails (the whole
    expression when it is not an ``and``).
    """
    columns = {c: _column(table, c) for c in keep.columns}
    mask = keep.evaluate(columns) if table.num_rows else np.zeros(0, dtype=bool)
    reasons: list[str | None] = [None] * table.num_rows
    pending = ~mask
    for term in keep.conjuncts():
        fails = pending & ~term.evaluate({c: columns[c] for c in term.columns})
        for i in np.flatnonzero(fails):
            reasons[i] = term.text
        pending &= ~fails
    for i in np.flatnonzero(pending):  # fails only as a whole (an `or` of terms)
        reasons[i] = keep.text
    return mask, reasons


def _column(table: Any, name: str) -> np.ndarray:
    col = table.column(name)
    values = col.to_numpy(zero_copy_only=False)
    if col.type.equals(_bool_type()) and col.null_count:
        return np.array(col.to_pylist(), dtype=object)
    if values.dtype.kind in "iu" and col.null_count:
        return np.array([np.nan if v is None else v for v in col.to_pylist()], dtype=np.float64)
    return values


def _bool_type() -> Any:
    import pyarrow as pa

    return pa.bool_()


def apply_quotas(
    mask: np.ndarray, sources: list[str], quotas: dict[str, int], rank: np.ndarray | None
) -> tuple[np.ndarray, list[int]]:
    """Cap the kept rows of each source at its quota (the best by ``rank``, else the first).

    Returns:
        The new mask and the rows the quotas dropped.
    """
    out = mask.copy()
    dropped: list[int] = []
    by_source: dict[str, list[int]] = {}
    for i in np.flatnonzero(mask):
        by_source.setdefault(sources[i], []).append(int(i))
    for source, rows in by_source.items():
        limit = quotas.get(source)
        if limit is None or len(rows) <= limit:
            continue
        order = (
            rows
            if rank is None
            else sorted(rows, key=lambda r: -np.nan_to_num(rank[r], nan=-np.inf))
        )
        for r in order[limit:]:
            out[r] = False
            dropped.append(r)
    return out, dropped


def filter_shards(
    sources: list[str],
    scores: list[str],
    keep: str,
    out: str | Path,
    samples_per_shard: int = 10000,
    quotas: dict[str, int] | None = None,
    rank_by: str | None = None,
    prefix: str = "curated",
) -> FilterReport:
    """Copy the samples of ``sources`` that ``keep`` selects into new shards under ``out``.

    Args:
        sources: Shard sources (folders, files, patterns; :func:`resolve_source`). A source's
            name for ``quotas`` is its folder (or file) name.
        scores: Score folders/files (parquet, keyed by shard file name and ``__key__``).
        keep: The ``--keep`` expression (:mod:`mmpt.curation.expr`).
        out: Output folder (must not hold shards yet).
        samples_per_shard: Samples per output shard.
        quotas: Source name -> most samples kept from it.
        rank_by: Column that orders a source's samples when its quota cuts (best first);
            default: shard order.
        prefix: Output shard file name prefix.

    Raises:
        ValueError: A bad expression, unknown column, quota of an unknown source, or an output
            folder that already has shards.
    """
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source
    from mmpt.shards.build import prepare_out_dir
    from mmpt.shards.writer import ShardWriter

    resolved = [resolve_source(s, "--from") for s in sources]
    names = [Path(s.rstrip("/")).name or s for s in sources]
    unknown = sorted(set(quotas or {}) - set(names))
    if unknown:
        raise ValueError(f"--quota {unknown}: no such source; the sources are {names}")
    table = join_scores(scores)
    score_columns = [c for c in table.column_names if c not in KEY_COLUMNS]
    expression = KeepExpression.parse(keep, score_columns)
    if rank_by is not None and rank_by not in score_columns:
        raise ValueError(f"--rank-by {rank_by!r}: no such score column; have {score_columns}")
    prepare_out_dir(out)

    source_of_shard = {
        shard_name(u): n for r, n in zip(resolved, names, strict=True) for u in r.urls
    }
    shards = table.column("shard").to_pylist()
    keys = table.column("key").to_pylist()
    mask, reasons = decide(table, expression)
    row_sources = [source_of_shard.get(s, "") for s in shards]
    rank = _column(table, rank_by).astype(np.float64) if rank_by else None
    mask, cut = apply_quotas(mask, row_sources, quotas or {}, rank)
    for r in cut:
        reasons[r] = f"quota {row_sources[r]}"
    rows = {(s, k): i for i, (s, k) in enumerate(zip(shards, keys, strict=True))}

    report = FilterReport(out=str(out))
    provenance: dict[str, list[Any]] = {"out_shard": [], "out_key": [], "source_shard": []}
    provenance |= {"source_key": [], **{c: [] for c in score_columns}}
    score_values = {c: table.column(c).to_pylist() for c in score_columns}
    meta = dict(resolved[0].meta) if resolved else {}
    meta["curation"] = {"keep": keep, "scores": list(map(str, scores)), "sources": list(sources)}
    with ShardWriter(out, samples_per_shard, prefix=prefix, meta=meta) as writer:
        for source in resolved:
            counter = SkipCounter(dict(zip(source.urls, source.counts or [], strict=False)))
            for sample in read_shards(source.urls, counter):
                shard = shard_name(sample["__url__"])
                row = rows.get((shard, sample["__key__"]))
                if row is None:
                    report.dropped[NO_SCORE] += 1
                    continue
                if not mask[row]:
                    report.dropped[reasons[row] or keep] += 1
                    continue
                n = report.kept
                writer.write(
                    {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
                )
                provenance["out_shard"].append(f"{prefix}-{n // samples_per_shard:06d}.tar")
                provenance["out_key"].append(sample["__key__"])
                provenance["source_shard"].append(sample["__url__"])
                provenance["source_key"].append(sample["__key__"])
                for c in score_columns:
                    provenance[c].append(score_values[c][row])
                report.kept += 1
            lost = sum(f.lost or 0 for f in counter.shards.values()) + counter.total
            for fault in counter.shards.values():
                log.warning("unreadable shard %s", fault.describe())
            if lost:
                report.dropped["unreadable"] += lost
        writer.index.meta["curation"] |= {"kept": report.kept, "dropped": dict(report.dropped)}
    write_table(provenance, Path(out) / "provenance.parquet")
    return report
