"""Score tables: parquet files keyed by (``shard``, ``key``), read, joined and written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

KEY_COLUMNS = ("shard", "key")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # pragma: no cover - pyarrow is in the data/dev extras
        raise RuntimeError("score tables need pyarrow: pip install 'mmpt[data]'") from e
    return pyarrow


def shard_name(url: str) -> str:
    """The name a score table uses for a shard: its file name (folders may move)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def score_files(path: str | Path) -> list[Path]:
    """The parquet files of a score folder (recursively) or the file itself.

    Raises:
        FileNotFoundError: No such path, or a folder without parquet files.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--scores {path}: no such file or folder")
    files = sorted(f for f in p.rglob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(
            f"--scores {path}: no .parquet files in it (write them with `mmpt data dedup` or "
            "any tool: columns shard, key and one column per score)"
        )
    return files


def read_scores(path: str | Path) -> Any:
    """One pyarrow Table of every parquet file under ``path``.

    Raises:
        ValueError: A file lacks the ``shard``/``key`` columns, or a (shard, key) repeats.
    """
    pa = _pyarrow()
    tables = []
    for f in score_files(path):
        t = pa.parquet.read_table(f)
        missing = [c for c in KEY_COLUMNS if c not in t.column_names]
        if missing:
            raise ValueError(
                f"{f}: score table without column(s) {missing}; it has {t.column_names}"
            )
        tables.append(t.cast(pa.schema([_string_keys(pa, fld) for fld in t.schema])))
    table = pa.concat_tables(tables, promote_options="default")
    _check_unique(table, str(path))
    return table


def _string_keys(pa: Any, fld: Any) -> Any:
    return pa.field(fld.name, pa.string()) if fld.name in KEY_COLUMNS else fld


def _check_unique(table: Any, where: str) -> None:
    pa = _pyarrow()
    grouped = table.group_by(list(KEY_COLUMNS)).aggregate([([], "count_all")])
    repeated = grouped.filter(pa.compute.greater(grouped["count_all"], 1))
    if repeated.num_rows:
        first = repeated.slice(0, 1).to_pylist()[0]
        raise ValueError(
            f"{where}: {repeated.num_rows} (shard, key) pairs appear more than once, e.g. "
            f"{first['shard']}/{first['key']}; a score table has one row per sample"
        )


def join_scores(paths: Sequence[str | Path]) -> Any:
    """Full outer join of the tables of ``paths`` on (shard, key).

    Raises:
        ValueError: Two tables share a score column name (name it apart when writing).
    """
    joined = None
    for path in paths:
        table = read_scores(path)
        if joined is not None:
            clash = (set(table.column_names) & set(joined.column_names)) - set(KEY_COLUMNS)
            if clash:
                raise ValueError(
                    f"--scores {path}: column(s) {sorted(clash)} also in another table"
                )
            joined = joined.join(table, keys=list(KEY_COLUMNS), join_type="full outer")
        else:
            joined = table
    if joined is None:
        raise ValueError("--scores: give at least one score folder or file")
    return joined


def write_table(columns: dict[str, Any], path: str | Path) -> Path:
    """Write ``columns`` (name -> list/array) as one parquet file, atomically."""
    pa = _pyarrow()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pa.parquet.write_table(pa.table(columns), tmp)
    tmp.replace(path)
    return path
