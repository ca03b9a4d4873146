"""``index.json``: the manifest written next to a folder of shards."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmpt.io import atomic_write_text

INDEX_NAME = "index.json"
FORMAT = "mmpt-shards/1"


@dataclass
class ShardInfo:
    """One shard file and its sample count."""

    name: str
    samples: int


@dataclass
class ShardIndex:
    """Manifest of a shard folder.

    Attributes:
        shards: Shard files (names relative to the folder) with their sample counts.
        keys: File extensions present in the samples (``jpg``, ``txt``, ``json`` ...).
        modalities: Modalities carried (``image``, ``text`` ...).
        meta: Free-form metadata: zero-shot class names and templates, normalisation
            statistics, the command that built the shards.
    """

    shards: list[ShardInfo] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        """Total number of samples over all shards."""
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the total sample count for human readers."""
        d = asdict(self)
        d["num_samples"] = self.num_samples
        return d

    def save(self, folder: str | Path) -> Path:
        """Write ``index.json`` into ``folder`` atomically (write to a temp file, then rename)."""
        return atomic_write_text(
            Path(folder) / INDEX_NAME, json.dumps(self.to_dict(), indent=2) + "\n"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardIndex:
        """Inverse of :meth:`to_dict`; tolerates unknown fields from newer writers."""
        return cls(
            shards=[ShardInfo(str(s["name"]), int(s["samples"])) for s in d.get("shards", [])],
            keys=list(d.get("keys", [])),
            modalities=list(d.get("modalities", [])),
            meta=dict(d.get("meta", {})),
            format=str(d.get("format", FORMAT)),
        )


def load_index(folder: str | Path) -> ShardIndex | None:
    """Read ``folder/index.json`` (or the index file ``folder`` itself names) if it exists.

    Args:
        folder: A local folder of shards, or a ``.json`` index file (``mmpt data index --out``).

    Returns:
        The index, or None when there is no such file.

    Raises:
        ValueError: The file exists but is not a valid index (names the file).
    """
    path = Path(folder)
    path = path if path.suffix == ".json" and not path.is_dir() else path / INDEX_NAME
    if not path.is_file():
        return None
    try:
        return ShardIndex.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a valid mmpt shard index ({e}); delete or rebuild it"
        ) from e
