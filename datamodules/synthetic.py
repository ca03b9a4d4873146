"""Synthetic datasets a datamodule renders on first use (``data.synthetic``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mmpt.data")


@dataclass
class SyntheticData:
    """Generate a synthetic dataset into ``out`` when its shards are missing.

    Attributes:
        kind: Dataset kind, as in ``mmpt data synth --kind``.
        out: Folder that receives ``train/`` and ``val/``.
        train_samples: Training samples to render.
        image_size: Rendered image size in pixels.
        seed: Generator seed (the data is a pure function of it).
    """

    kind: str = "image-text"
    out: str = "data/shapes"
    train_samples: int = 6000
    image_size: int = 64
    seed: int = 0

    def ensure(self) -> None:
        """Render the set into ``out`` unless its train index and tokenizer exist."""
        out = Path(self.out)
        if (out / "train" / "index.json").exists() and (out / "tokenizer").is_dir():
            return
        import inspect

        from mmpt.synth import SYNTH_KINDS, make_synthetic

        log.info("synthetic data missing: generating %s into %s", self.kind, self.out)
        options = {"train_samples": self.train_samples, "image_size": self.image_size}
        options["seed"] = self.seed
        if self.kind in SYNTH_KINDS:  # an unknown kind gets make_synthetic's error
            accepted = inspect.signature(SYNTH_KINDS[self.kind]).parameters
            options = {k: v for k, v in options.items() if k in accepted}
        make_synthetic(self.kind, self.out, **options)


def synthetic_specs(value: Any) -> list[SyntheticData]:
    """``data.synthetic`` as a list of :class:`SyntheticData` (from objects or parsed dicts)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if not isinstance(v, SyntheticData):
            v = SyntheticData(**(v.as_dict() if hasattr(v, "as_dict") else dict(v)))
        out.append(v)
    return out


__all__ = ["SyntheticData", "synthetic_specs"]
