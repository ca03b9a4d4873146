"""Building EgoClip-style video-text shards from a TSV over tiny source videos made in the test."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
wds = pytest.importorskip("webdataset")

from mmpt.data_cli import main  # noqa: E402
from mmpt.datamodules.video import probe, read_frames  # noqa: E402
from mmpt.shards import load_index  # noqa: E402
from mmpt.shards.video_build import build_video_text_shards, output_size  # noqa: E402

STEP = 6  # frame i is grey level STEP * i


def encode_source(path: Path, num_frames: int = 40, fps: int = 10, size=(64, 48)) -> Path:
    """A source video whose frame ``i`` is uniformly grey ``STEP * i`` (mpeg4, fine quant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps, options={"qmax": "2"})
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            rgb = np.full((size[1], size[0], 3), STEP * i, np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        c.mux(s.encode())
    return path


def frame_ids(mp4: bytes) -> list[int]:
    """Source frame index of every frame of a clip, read back from the grey level."""
    info = probe(mp4, "pyav")
    frames = read_frames(mp4, list(range(info.num_frames)), "pyav")
    return [round(float(f.float().mean()) / STEP) for f in frames]


ROWS = [  # video_uid, clip_start, clip_end, clip_text, tag_noun, tag_verb, video_path
    ("v1", "0.5", "1.5", "#C C opens the drawer", "[3, 17]", "[5]", ""),
    ("v2", "1.0", "2.0", "#C C picks a cup", "[1]", "[]", "sub/v2.mp4"),
    ("v1", "3.5", "5.0", "#C C closes the drawer", "", "", ""),  # past the end: clamped
    ("v9", "0.0", "1.0", "#C C waves", "", "", ""),  # no such video
    ("bad", "0.0", "1.0", "#C C waits", "", "", ""),  # not a video
    ("v1", "1.0", "2.0", "  ", "", "", ""),  # empty narration
    ("v1", "2.0", "2.0", "#C C stops", "", "", ""),  # zero-length window
    ("v2", "0.0", "0.3", "#C C looks", "[]", "[2]", "sub/v2.mp4"),
]
HEADER = "video_uid\tclip_start\tclip_end\tclip_text\ttag_noun\ttag_verb\tvideo_path"


@pytest.fixture(scope="module")
def ego(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ego/egoclip.tsv`` over ``ego/videos/{v1.mp4, sub/v2.mp4, bad.mp4}``."""
    root = tmp_path_factory.mktemp("ego")
    encode_source(root / "videos" / "v1.mp4")
    encode_source(root / "videos" / "sub" / "v2.mp4", size=(80, 64))
    (root / "videos" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    lines = [HEADER, *("\t".join(r) for r in ROWS)]
    (root / "egoclip.tsv").write_text("\n".join(lines) + "\n")
    (root / "nouns.txt").write_text("\n".join(f"noun{i}" for i in range(20)) + "\n")
    (root / "verbs.txt").write_text("\n".join(f"verb{i}" for i in range(10)) + "\n")
    return root


def read(out: Path) -> list[dict]:
    """Samples through a plain webdataset pipeline."""
    urls = [str(out / s.name) for s in load_index(out).shards]
    return [
        {
            "__key__": s["__key__"],
            "mp4": s["mp4"],
            "txt": s["txt"].decode(),
            **json.loads(s["json"]),
        }
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def test_build_cuts_windows_and_counts_skips(ego: Path, tmp_path: Path) -> None:
    report = build_video_text_shards(
        ego / "egoclip.tsv", tmp_path / "out", videos_root=ego / "videos", progress=False,
        samples_per_shard=2, nouns=ego / "nouns.txt", verbs=ego / "verbs.txt",
    )  # fmt: skip
    assert report.written == 4 and report.clamped == 1
    assert report.skipped == {
        "missing_video": 1, "corrupt_video": 1, "empty_narration": 1, "empty_window": 1,
    }  # fmt: skip
    assert {e["reason"] for e in report.skipped_examples} == set(report.skipped)
    samples = read(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000000007"]
    a, b, c, d = samples
    assert frame_ids(a["mp4"]) == list(range(5, 15))  # [0.5 s, 1.5 s) at 10 fps
    assert frame_ids(b["mp4"]) == list(range(10, 20))
    assert frame_ids(c["mp4"]) == list(range(35, 40))  # cut at the end of the 40 frames
    assert frame_ids(d["mp4"]) == [0, 1, 2]
    assert a["txt"] == a["narration"] == "#C C opens the drawer"
    assert (a["noun_ids"], a["verb_ids"], b["noun_ids"], d["verb_ids"]) == ([3, 17], [5], [1], [2])
    assert c["noun_ids"] == c["verb_ids"] == []
    assert [s["fps"] for s in samples] == [10.0] * 4
    assert [s["num_frames"] for s in samples] == [10, 10, 5, 3]
    assert (a["clip_start"], a["clip_end"], c["clip_start"], c["clip_end"]) == (0.5, 1.5, 3.5, 5.0)
    assert (c["source_frames"], c["clamped"], a["clamped"]) == ([35, 40], True, False)
    assert (a["video_uid"], a["source"], b["source"]) == ("v1", "v1.mp4", "sub/v2.mp4")
    assert (a["width"], a["height"], b["width"], b["height"]) == (64, 48, 80, 64)
    assert probe(a["mp4"], "decord").num_frames == 10  # decord reads the 64 px wide clips too
    with av.open(io.BytesIO(a["mp4"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.format.name) == ("h264", "yuv420p")
    index = load_index(tmp_path / "out")
    assert index.num_samples == 4 and len(index.shards) == 2
    assert index.modalities == ["video", "text"] and index.keys == ["json", "mp4", "txt"]
    meta = index.meta
    assert meta["kind"] == "video-text" and meta["clamped"] == 1
    assert meta["skipped"] == report.skipped
    assert meta["nouns"][17] == "noun17" and len(meta["verbs"]) == 10


def test_reencode_short_and_clip_uid_keys(ego: Path, tmp_path: Path) -> None:
    tsv = tmp_path / "clips.tsv"
    tsv.write_text(
        "video_uid\tclip_uid\tclip_start\tclip_end\tclip_text\n"
        "v1\tclip-a\t0.0\t0.5\tfirst\nv1\tclip-a\t0.5\t1.0\tagain\nv1\tclip.b\t0\t1\tdot\n"
        "v1\tclip-c\tx\t1\tbad time\n"
    )
    report = build_video_text_shards(
        tsv, tmp_path / "out", videos_root=ego / "videos", reencode_short=32, progress=False
    )
    assert report.written == 1 and report.skipped == {"duplicate_key": 1, "bad_row": 2}
    (s,) = read(tmp_path / "out")
    assert s["__key__"] == "clip-a" and (s["width"], s["height"]) == (42, 32)
    assert probe(s["mp4"], "pyav").num_frames == 5 and frame_ids(s["mp4"]) == [0, 1, 2, 3, 4]
    assert output_size(48, 64, 32) == (32, 42) and output_size(63, 47) == (64, 48)


def test_workers_give_the_same_shards(ego: Path, tmp_path: Path) -> None:
    args = {"videos_root": ego / "videos", "samples_per_shard": 3, "progress": False}
    one = build_video_text_shards(ego / "egoclip.tsv", tmp_path / "w1", workers=1, **args)
    two = build_video_text_shards(ego / "egoclip.tsv", tmp_path / "w2", workers=2, **args)
    assert one.to_dict() | {"out": ""} == two.to_dict() | {"out": "", "shards": one.shards}
    for a, b in zip(one.shards, two.shards, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_bad_arguments(ego: Path, tmp_path: Path) -> None:
    tsv = ego / "egoclip.tsv"
    with pytest.raises(ValueError, match="even"):
        build_video_text_shards(tsv, tmp_path / "o", reencode_short=33, progress=False)
    (tmp_path / "t.tsv").write_text("video_uid\tclip_text\nv1\thi\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['clip_start', 'clip_end'\]"):
        build_video_text_shards(tmp_path / "t.tsv", tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="--videos"):
        build_video_text_shards(tsv, tmp_path / "o", videos_root=tmp_path / "nope")


def test_cli_build_video_text(ego: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    argv = ["build", "--kind", "video-text", "--from", str(ego / "egoclip.tsv"), "--out", str(out)]
    extra = ["--videos", str(ego / "videos"), "--reencode-short", "32", "--no-progress"]
    assert main([*argv, *extra, "--nouns", str(ego / "nouns.txt"), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples in 1 shard(s)" in printed and "clamped 1 window(s)" in printed
    assert "skipped 4: corrupt_video=1, empty_narration=1, empty_window=1, missing_video=1" in (
        printed
    )
    index = load_index(out)
    assert index.meta["build"]["reencode_short"] == 32 and "verbs" not in index.meta
    assert {s["height"] for s in read(out)} == {32}
    assert main([*argv, "--images", str(ego), "--overwrite"]) == 2
    assert "--images does not apply to --kind video-text" in capsys.readouterr().err
