"""Skipped samples: exact counts per batch, logged once per reason per epoch (not per sample)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmpt.datamodules.decode import MissingField
from mmpt.datamodules.skip_log import SkipLog
from mmpt.datamodules.stages import SkipCounter, skip_reason
from mmpt.datamodules.streams import ShardStream, StreamConfig
from tests.helpers import write_img2dataset_shards


@dataclass
class Keys:
    """A minimal batch: the decoded keys and the skip count the stream adds."""

    keys: list[int] = field(default_factory=list)
    skipped: int = 0
    clamped: int = 0


def decode(sample: dict) -> int:
    """Fails for every third key (no caption) and for keys 1, 4, 7, 10 (bad image)."""
    k = int(sample["__key__"])
    if k % 3 == 0:
        raise MissingField("no 'json:captions' in sample")
    if k % 3 == 1 and k < 12:
        raise OSError(f"cannot identify image file <_io.BytesIO object at 0x7f{k:04x}>")
    return k


def test_skips_are_logged_once_per_reason_per_epoch_with_exact_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards = write_img2dataset_shards(tmp_path / "s", n=24, per_shard=8)
    cfg = StreamConfig(urls=str(shards), shuffle_buffer=0, shuffle_shards=False)

    def collate(keys: list[int]) -> Keys:
        return Keys(keys, clamped=1)

    stream = ShardStream(
        cfg.sources("data.train"), cfg, decode, collate, batch_size=4, partial=True
    )
    skips = SkipLog()
    caplog.set_level(logging.WARNING, logger="mmpt.data")
    seen = 0
    for epoch in range(3):
        stream.set_epoch(epoch)
        for batch in stream:
            skips.record("train", epoch, batch)
            seen += batch.skipped
    skips.flush()
    assert seen == 3 * 12  # the counters stay exact: 8 without caption + 4 bad images an epoch
    lines = [r.getMessage() for r in caplog.records]
    summaries = [m for m in lines if m.startswith("train epoch")]
    assert len(summaries) == 3 * 3  # two reasons and the clamped clips, per epoch
    assert "train epoch 0: 8 samples skipped: MissingField: no 'json:captions' in sample" in lines
    assert sum("4 samples skipped: OSError: cannot identify image file" in m for m in lines) == 3
    assert "train epoch 2: 3 clip windows ran past their video and were clamped (kept)" in lines
    assert len(lines) - len(summaries) == 2  # each reason announced once, when first seen


def test_skip_reason_ignores_the_sample_and_addresses() -> None:
    a = OSError("cannot identify <obj at 0x7f00aa> (sample '000001' in a.tar)")
    b = OSError("cannot identify <obj at 0x7f11bb> (sample '000002' in b.tar)")
    assert skip_reason(a) == skip_reason(b) == "OSError: cannot identify <obj at 0x..>"


def test_counter_groups_reasons_beyond_the_limit() -> None:
    counter = SkipCounter()
    for i in range(30):
        counter(ValueError(f"reason {i}"))
    reasons = counter.take_reasons()
    assert len(reasons) == 21 and reasons["other"][0] == 10 and counter.take() == 30
