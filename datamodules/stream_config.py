"""How a split's samples are drawn: :class:`StreamConfig` (sources, mixing, epoch size)."""

from __future__ import annotations

from dataclasses import dataclass

from mmpt.datamodules.mixing import (
    MixPoint,
    ReplayConfig,
    as_dataclass,
    check_replay,
    check_schedule,
    check_weights,
    default_names,
)
from mmpt.datamodules.urls import ResolvedSource, resolve_source


@dataclass
class StreamConfig:
    """Where a split's samples come from and how they are drawn.

    Attributes:
        urls: One source (folder, file, glob, brace pattern, ``pipe:`` or fsspec URL), or a list
            of sources (mixed by ``weights`` when resampled, concatenated otherwise).
        weights: One weight per source; needs ``resampled: true``.
        resampled: Draw shards with replacement (endless; needs ``epoch_samples``).
        epoch_samples: Samples per epoch over all ranks (resampled mode), replay included.
        shuffle_buffer: Sample shuffle buffer per worker (0: keep order); in resampled mode
            one per source (and one per replay source), so a schedule acts without delay.
        shuffle_shards: Shuffle each worker's shard order every epoch.
        names: One name per source for logs (``data/mix/<name>``); default: each source's
            folder name, made unique.
        weight_schedule: Weights that change over the run (:class:`MixPoint` list, increasing
            ``at``); ``weights`` (default: equal) hold before the first point. Needs
            ``resampled: true``.
        replay: A fixed fraction of every batch drawn from old data (:class:`ReplayConfig`).
    """

    urls: str | list[str]
    weights: list[float] | None = None
    resampled: bool = False
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    names: list[str] | None = None
    weight_schedule: list[MixPoint] | None = None
    replay: ReplayConfig | None = None

    def __post_init__(self) -> None:
        if self.weight_schedule is not None:
            self.weight_schedule = [as_dataclass(p, MixPoint) for p in self.weight_schedule]
        self.replay = as_dataclass(self.replay, ReplayConfig)

    def specs(self) -> list[str]:
        """The source specs as a list."""
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)

    def source_names(self) -> list[str]:
        """The log name of every source (``names``, else derived from the specs)."""
        return list(self.names) if self.names is not None else default_names(self.specs())

    def sources(self, field: str) -> list[ResolvedSource]:
        """Resolve and check every source, replay included (errors name ``field``)."""
        specs = self.specs()
        if not specs:
            raise ValueError(f"{field}.urls is empty: give at least one shard source")
        if self.weights is not None:
            check_weights(self.weights, len(specs), f"{field}.weights")
            if not self.resampled:
                raise ValueError(f"{field}.weights needs {field}.resampled: true")
        if self.resampled and not self.epoch_samples:
            raise ValueError(f"{field}.resampled: true needs {field}.epoch_samples (an epoch size)")
        if self.weight_schedule is not None:
            if not self.resampled:
                raise ValueError(f"{field}.weight_schedule needs {field}.resampled: true")
            check_schedule(self.weight_schedule, len(specs), field)
        names = self.source_names()
        if len(names) != len(specs) or len(set(names)) != len(names) or not all(names):
            raise ValueError(f"{field}.names must be {len(specs)} distinct non-empty names")
        if self.replay is not None:
            self.replay_sources(f"{field}.replay", names)
        urls_field = field if field.startswith("--") else f"{field}.urls"
        return [resolve_source(s, urls_field) for s in specs]

    def replay_sources(
        self, field: str = "replay", names: list[str] | None = None
    ) -> list[ResolvedSource]:
        """Check ``replay`` and resolve its sources (errors name ``field``, e.g. ``x.replay``)."""
        if self.replay is None:
            return []
        specs = check_replay(self.replay, field, names or self.source_names())
        return [resolve_source(s, f"{field}.urls") for s in specs]
