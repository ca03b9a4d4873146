"""Check that shards hold the fields a run reads, on their first samples, before any work.

A caption or label key that no sample has would otherwise skip every validation sample one by
one (a run that "succeeds" without validation) or fail only after a whole embedding pass.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from mmpt.datamodules.decode import read_field
from mmpt.datamodules.stages import DataError, SkipCounter, read_shards

#: Samples read from the start of a set to check its fields.
PEEK_SAMPLES = 100


def peek_samples(urls: Sequence[str], n: int = PEEK_SAMPLES) -> list[dict[str, Any]]:
    """The first ``n`` raw samples (extension -> bytes) of ``urls``, read in order."""
    return list(itertools.islice(read_shards(urls, SkipCounter()), n))


def sample_fields(samples: Sequence[dict[str, Any]]) -> list[str]:
    """Every field the samples have: extensions, and ``json:<field>`` for json objects."""
    names: set[str] = set()
    for sample in samples:
        for ext, raw in sample.items():
            if ext.startswith("__"):
                continue
            names.add(ext)
            if ext == "json" or ext.endswith(".json"):
                try:
                    doc = json.loads(raw) if isinstance(raw, bytes | str) else raw
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    names.update(f"{ext}:{field}" for field in doc)
    return sorted(names)


def field_values(samples: Sequence[dict[str, Any]], spec: str) -> list[Any]:
    """The values of ``spec`` (``txt``, ``json:label``; ``;`` alternatives) where present."""
    values = []
    for sample in samples:
        try:
            values.append(read_field(sample, spec))
        except (KeyError, ValueError):  # absent, or json that does not parse
            continue
    return values


def require_fields(samples: Sequence[dict[str, Any]], fields: dict[str, str], where: str) -> None:
    """Raise when a field is in none of ``samples`` (or there are no samples).

    Args:
        samples: The set's first samples (:func:`peek_samples`).
        fields: Flag that sets it (``data.val_text_key``, ``--text-key``) -> field spec.
        where: The set, for the message (``data.val (shards/val)``).

    Raises:
        DataError: No samples, or a field that no sample has; the message names the field, the
            flag and the fields the samples do have.
    """
    if not samples:
        raise DataError(f"{where}: no sample could be read from its first shards")
    for flag, spec in fields.items():
        if not field_values(samples, spec):
            have = ", ".join(sample_fields(samples))
            example = "'cls;json:class'" if "label" in flag else "'txt;json:caption'"
            raise DataError(
                f"{where}: {spec!r} ({flag}) is in none of its first {len(samples)} samples, "
                f"which have: {have}. Set {flag} to the field that holds it (alternatives "
                f"separated by ';', e.g. {example})"
            )


__all__ = ["PEEK_SAMPLES", "field_values", "peek_samples", "require_fields", "sample_fields"]
