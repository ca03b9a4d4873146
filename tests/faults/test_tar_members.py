"""Tar members with absolute or ``..`` paths: a counted skip for readers, an error for writers.

A shard holding ``../evil.txt`` and ``/tmp/abs.txt`` (written with Python's ``tarfile``) keeps
its good samples in the training stream and in ``mmpt data inspect``, with every bad member
counted and named with its shard (``mmpt data index`` leaves them out of its counts too); the
shard writer every builder uses refuses such keys, and nothing is ever written outside the
output folder.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mmpt.datamodules.stages import SkipCounter, read_shards
from mmpt.shards import ShardWriter
from mmpt.shards.inspect import inspect_shards
from mmpt.shards.members import member_problem
from tests.helpers import jpeg_bytes

BAD = ("../evil.txt", "/tmp/mmpt-abs-evil.txt", "a/../../evil.jpg")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """Two good samples around three members with unsafe paths."""
    folder = tmp_path / "shards"
    folder.mkdir()
    path = folder / "evil-000000.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "000.jpg", jpeg_bytes(0))
        _add(tf, "000.txt", b"a caption")
        for name in BAD:
            _add(tf, name, b"payload")
        _add(tf, "001.jpg", jpeg_bytes(1))
        _add(tf, "001.txt", b"another caption")
    return path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.txt", "'..'"),
        ("a/../b.jpg", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:/x.jpg", "absolute"),
        ("..\\evil.txt", "'..'"),
        ("000.jpg", None),
        ("dir/000.0.jpg", None),
        ("..foo.jpg", None),
    ],
)
def test_member_problem(name: str, problem: str | None) -> None:
    got = member_problem(name)
    assert (got is None) if problem is None else (problem in got)


def test_training_stream_skips_and_counts_them(shard: Path, caplog) -> None:
    counter = SkipCounter()
    samples = list(read_shards([str(shard)], counter))
    assert [s["__key__"] for s in samples] == ["000", "001"]
    assert all(set(s) >= {"jpg", "txt"} for s in samples)
    assert counter.total == len(BAD)
    # the worker counts by reason; the main process logs each reason once an epoch (SkipLog)
    messages = counter.summary()
    for name in BAD:
        assert f"{shard}: tar member {name!r} refused" in messages or name in messages, messages
    assert not (shard.parent.parent / "evil.txt").exists()


def test_inspect_counts_and_names_them(shard: Path) -> None:
    report = inspect_shards(shard.parent)
    assert report.unsafe_member == len(BAD)
    assert sum(s.samples for s in report.shards) == 2
    named = [e["problem"] for e in report.examples if e["kind"] == "unsafe_member"]
    assert len(named) == len(BAD)
    assert all(shard.name in p for p in named)
    assert any("'../evil.txt'" in p for p in named)


def test_data_index_counts_what_the_reader_reads(shard: Path) -> None:
    from mmpt.shards.indexer import count_shard

    count = count_shard(str(shard))
    assert count.error is None and count.samples == 2
    assert count.keys == {"jpg", "txt"}


@pytest.mark.parametrize("key", ["../evil", "/tmp/mmpt-abs-evil", "x/../../evil"])
def test_writer_refuses_unsafe_keys(tmp_path: Path, key: str) -> None:
    out = tmp_path / "out"
    refused = r"sample key/member .* has (an absolute|a '\.\.')"
    with pytest.raises(ValueError, match=refused), ShardWriter(out, samples_per_shard=4) as w:
        w.write({"__key__": "000", "txt": "fine"})
        w.write({"__key__": key, "txt": "payload"})
    assert not (tmp_path / "evil.txt").exists()
    assert not list(out.glob("*.tar"))  # the half-written shard is removed
