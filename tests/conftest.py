"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_shards


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """40 image-text samples in 8 shards of 5."""
    return write_shards(tmp_path / "shards", n=40, per_shard=5)
