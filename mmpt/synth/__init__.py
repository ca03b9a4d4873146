"""Deterministic, learnable synthetic datasets written as mmpt shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _image_text(out: str | Path, **kw: Any) -> dict:
    from mmpt.synth.image_text import synth_image_text

    return synth_image_text(out, **kw)


#: ``mmpt data synth --kind`` -> generator(out, **options). Later modalities add a line here.
SYNTH_KINDS: dict[str, Callable[..., dict]] = {"image-text": _image_text}


def make_synthetic(kind: str, out: str | Path, **kw: Any) -> dict:
    """Generate the synthetic dataset ``kind`` into ``out``.

    Raises:
        ValueError: Unknown kind (lists the known ones).
    """
    if kind not in SYNTH_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(SYNTH_KINDS)}")
    return SYNTH_KINDS[kind](out, **kw)
