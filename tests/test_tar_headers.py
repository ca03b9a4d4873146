"""The tar header reader names the same members as Python's ``tarfile``, in every format."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from mmpt.shards.tar_headers import TarHeaderError, tar_members

LONG = "a" * 60 + "/" + "b" * 60 + "/sample.0.jpg"  # > 100 chars: ustar prefix / GNU / pax


def archive(fmt: int, mtime: float = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in [("k1.jpg", b"x" * 700), ("k1.txt", b"cap"), (LONG, b""),
                           ("ünï.json", b"{}"), ("k2.txt", b"y" * 1024)]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        link = tarfile.TarInfo("link.txt")
        link.type = tarfile.SYMTYPE  # GNU writes a long link name as its own header
        link.linkname = "x" * (90 if fmt == tarfile.USTAR_FORMAT else 150)
        tf.addfile(link)
    return buf.getvalue()


def reference(data: bytes) -> list[tuple[str, bool]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m.isreg()) for m in tf]


@pytest.mark.parametrize(
    ("fmt", "mtime"),
    [
        (tarfile.USTAR_FORMAT, 0),
        (tarfile.GNU_FORMAT, 0),
        (tarfile.PAX_FORMAT, 0),
        (tarfile.PAX_FORMAT, 1.5),
    ],  # fmt: skip
)
def test_same_members_as_tarfile(fmt: int, mtime: float) -> None:
    data = archive(fmt, mtime)
    want = reference(data)
    assert (LONG, True) in want and ("dir", False) in want
    assert list(tar_members(io.BytesIO(data))) == want
    assert list(tar_members(io.BytesIO(gzip.compress(data)))) == want


class Unseekable(io.RawIOBase):
    """A pipe-like stream: read only."""

    def __init__(self, data: bytes) -> None:
        self.inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self.inner.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_streams_and_webdataset_writer(tmp_path: Path) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as w:  # float mtime: a pax header per member
        for i in range(3):
            w.write({"__key__": f"{i:03d}", "jpg": b"j" * 600, "txt": "t"})
    data = (tmp_path / "s.tar").read_bytes()
    want = reference(data)
    assert len(want) == 6
    assert list(tar_members(io.BufferedReader(Unseekable(data)))) == want
    # a gzipped shard read through a pipe (pipe: URLs) is gunzipped too, not called corrupt
    assert list(tar_members(io.BufferedReader(Unseekable(gzip.compress(data))))) == want


@pytest.mark.parametrize("cut", [300, 1100, 1600])
def test_truncated_or_foreign_bytes_raise(cut: int) -> None:
    data = archive(tarfile.GNU_FORMAT)
    with pytest.raises(TarHeaderError):
        list(tar_members(io.BytesIO(data[:cut])))
    with pytest.raises(TarHeaderError):
        list(tar_members(io.BufferedReader(Unseekable(data[:cut]))))
    with pytest.raises(TarHeaderError, match="checksum"):
        list(tar_members(io.BytesIO(b"PK\x03\x04 a zip, not a tar" * 40)))
