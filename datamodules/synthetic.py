"""Synthetic datasets a datamodule renders on first use (``data.synthetic``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpt.datamodules.urls import is_remote

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
        options: More keyword arguments of the kind's generator (e.g. ``language: b`` and
            ``unlabelled: true`` for ``tone-speech``).
    """

    kind: str = "image-text"
    out: str = "data/shapes"
    train_samples: int = 6000
    image_size: int = 64
    seed: int = 0
    options: dict[str, Any] | None = None

    def read_by(self, urls: Iterable[str]) -> bool:
        """Whether any of ``urls`` (shard sources of the config) lies in ``out``.

        A recipe whose urls were pointed at other shards never renders its synthetic set.
        """
        out = Path(self.out).resolve()
        for url in urls:
            if is_remote(url):
                continue
            head = Path(_WILDCARD.split(url.strip(), maxsplit=1)[0] or ".").resolve()
            if head == out or out in head.parents:
                return True
        return False

    def ensure(self, urls: Iterable[str] = ()) -> None:
        """Render the set into ``out`` unless its train index, tokenizer and read folders exist.

        Args:
            urls: The config's shard sources; a plain local one inside ``out`` that does not
                exist (a folder a newer generator adds, e.g. ``data/shapes/qa``) also renders
                the set again.
        """
        out = Path(self.out)
        missing = [
            u
            for u in urls
            if not _WILDCARD.search(u) and self.read_by([u]) and not Path(u).exists()
        ]
        tokenizer = (out / "tokenizer").is_dir() or self.kind in _NO_TOKENIZER
        if (out / "train" / "index.json").exists() and tokenizer and not missing:
            return
        import inspect

        from mmpt.synth import SYNTH_KINDS, make_synthetic

        log.info("synthetic data missing: generating %s into %s", self.kind, self.out)
        options = {"train_samples": self.train_samples, "image_size": self.image_size}
        options["seed"] = self.seed
        if self.kind in SYNTH_KINDS:  # an unknown kind gets make_synthetic's error
            accepted = inspect.signature(SYNTH_KINDS[self.kind]).parameters
            options = {k: v for k, v in options.items() if k in accepted}
        make_synthetic(self.kind, self.out, **options, **(self.options or {}))


#: Synthetic kinds that write no tokenizer (image-only sets).
_NO_TOKENIZER = frozenset({"rs-dense"})
_WILDCARD = re.compile(r"[{*?\[]")  # where a brace pattern or glob starts


def config_urls(value: Any) -> list[str]:
    """Every ``urls`` entry in a (parsed) data config: splits, eval sets, replay sources."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if key == "urls":
                out += [item] if isinstance(item, str) else [u for u in item or [] if u]
            else:
                out += config_urls(item)
        return out
    if isinstance(value, list):
        return [u for item in value for u in config_urls(item)]
    if hasattr(value, "__dataclass_fields__"):
        return config_urls(vars(value))
    return []


def synthetic_to_render(value: Any, urls: Iterable[str]) -> list[SyntheticData]:
    """The ``data.synthetic`` sets that some of ``urls`` read (the others are never rendered)."""
    urls = list(urls)
    return [spec for spec in synthetic_specs(value) if spec.read_by(urls)]


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


__all__ = ["SyntheticData", "config_urls", "synthetic_specs", "synthetic_to_render"]
