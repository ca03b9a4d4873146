"""``mmpt data index``: counts from tar headers or img2dataset/open_clip files, corrupt shards,
URLs, and a CLIP fit whose run length comes from the written index."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mmpt.data_cli import main as data_main
from mmpt.datamodules.urls import resolve_source
from mmpt.shards import load_index
from mmpt.shards.indexer import count_shard, index_shards
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def img2dataset_shards(folder: Path, sizes: list[int], stats: bool = True) -> int:
    """img2dataset's layout: ``00000.tar`` of ``{key}.jpg/.txt/.json`` and ``00000_stats.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = 0
    for shard, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as w:
            for _ in range(n):
                k = f"{shard:05d}{key:04d}"
                info = {"key": k, "caption": f"photo {key}", "status": "success"}
                w.write({"__key__": k, "jpg": jpeg_bytes(key, 16), "txt": f"photo {key}",
                         "json": json.dumps(info).encode()})  # fmt: skip
                key += 1
        if stats:
            report = {"count": n + 2, "successes": n, "failed_to_download": 2, "status": "success"}
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps(report))
    return sum(sizes)


def webdataset_count(urls: list[str]) -> int:
    """The number of samples webdataset itself yields (the truth for the key rule)."""
    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_header_count_equals_webdataset_and_the_index_is_read_by_the_datamodules(
    tmp_path: Path,
) -> None:
    truth = img2dataset_shards(tmp_path / "s", [5, 3, 7], stats=False)
    # an odd shard: meta member, member without extension, interleaved numbered images
    with wds.TarWriter(str(tmp_path / "s" / "00003.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"doc{i}", "0.jpg": b"x", "1.jpg": b"y", "json": b"{}"})
    with tarfile.open(tmp_path / "s" / "00003.tar", "a") as tf:
        for name in ("__index__", "README"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    truth += 4
    urls = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    assert webdataset_count(urls) == truth
    report = index_shards(tmp_path / "s", workers=2)
    assert report.source == "tar headers" and not report.corrupt
    assert report.num_samples == truth
    assert [s.samples for s in report.shards] == [5, 3, 7, 4]
    index = load_index(tmp_path / "s")
    assert index is not None and index.num_samples == truth
    assert {"jpg", "txt", "json", "0.jpg"} <= set(index.keys)
    assert index.modalities == ["image", "text"]
    assert index.meta["indexed"]["source"] == "tar headers"
    resolved = resolve_source(str(tmp_path / "s"))
    assert resolved.counts == [5, 3, 7, 4] and resolved.urls == urls


def test_img2dataset_stats_are_used_when_consistent(tmp_path: Path, capsys) -> None:
    truth = img2dataset_shards(tmp_path / "s", [4, 6])
    assert data_main(["index", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"indexed {truth} samples in 2 shard(s) (counts from img2dataset" in out
    assert load_index(tmp_path / "s").num_samples == truth
    # stats that disagree with the first shard's headers are not trusted
    (tmp_path / "s" / "00000_stats.json").write_text(json.dumps({"successes": 9}))
    report = index_shards(tmp_path / "s")
    assert report.source == "tar headers" and "says 9 samples" in report.note
    assert report.num_samples == truth


def test_open_clip_sizes_json(tmp_path: Path) -> None:
    img2dataset_shards(tmp_path / "s", [2, 3], stats=False)
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({"00000.tar": 2, "00001.tar": 3}))
    report = index_shards(tmp_path / "s")
    assert report.source == "open_clip sizes.json" and report.num_samples == 5


def test_corrupt_shard_is_named_counted_and_left_out(tmp_path: Path, capsys) -> None:
    img2dataset_shards(tmp_path / "s", [3, 3, 3], stats=False)
    bad = tmp_path / "s" / "00001.tar"
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated inside a member
    (tmp_path / "s" / "00002.tar").write_bytes(b"not a tar at all" * 40)
    assert count_shard(str(bad)).error is not None
    assert data_main(["index", str(tmp_path / "s"), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "indexed 3 samples in 1 shard(s)" in out
    assert "2 unreadable shard(s)" in out and "00001.tar" in out and "00002.tar" in out
    index = load_index(tmp_path / "s")
    assert [s.name for s in index.shards] == ["00000.tar"]
    assert len(index.meta["indexed"]["corrupt"]) == 2


def test_pipe_url_pattern_and_out_file(tmp_path: Path, capsys) -> None:
    img2dataset_shards(tmp_path / "s", [2, 5], stats=False)
    spec = f"pipe:cat {tmp_path}/s/{{00000..00001}}.tar"
    assert data_main(["index", spec]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "meta" / "remote.json"
    assert data_main(["index", spec, "--out", str(out)]) == 0
    index = json.loads(out.read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 5]
    assert index["shards"][0]["name"] == f"pipe:cat {tmp_path}/s/00000.tar"
    # the datamodules take the index file as a source: remote shards with their counts
    resolved = resolve_source(str(out))
    assert resolved.counts == [2, 5] and resolved.urls[1] == f"pipe:cat {tmp_path}/s/00001.tar"
    # a local glob, indexed beside the shards
    assert data_main(["index", str(tmp_path / "s" / "*.tar")]) == 0
    assert load_index(tmp_path / "s").num_samples == 7


def test_errors_name_the_input(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert data_main(["index", str(tmp_path / "empty")]) == 2
    assert "holds no .tar shards" in capsys.readouterr().err
    assert data_main(["index", str(tmp_path / "nope-*.tar")]) == 2
    assert "not found" in capsys.readouterr().err


def test_existing_meta_is_kept(tmp_path: Path) -> None:
    img2dataset_shards(tmp_path / "s", [2], stats=False)
    (tmp_path / "s" / "index.json").write_text(
        json.dumps({"shards": [], "meta": {"zeroshot": {"classnames": ["a"], "templates": ["{}"]}}})
    )
    index_shards(tmp_path / "s")
    index = load_index(tmp_path / "s")
    assert index.meta["zeroshot"]["classnames"] == ["a"] and index.num_samples == 2


def test_clip_fit_takes_its_run_length_from_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an index the schedule cannot know the run length; with one, one epoch runs."""
    import yaml

    from mmpt.cli import main
    from tests.test_cli import tiny_fit_config

    img2dataset_shards(tmp_path / "s", [8, 8])
    cfg = tiny_fit_config(tmp_path / "s", tmp_path / "run")
    del cfg["trainer"]["max_steps"], cfg["trainer"]["val_check_interval"]
    cfg["trainer"] |= {"max_epochs": 1, "limit_val_batches": 0, "enable_checkpointing": False}
    cfg["trainer"]["callbacks"] = []
    cfg["model"]["init_args"]["lr_schedule"] = {
        "class_path": "mmpt.models.schedules.WarmupCosine",
        "init_args": {"warmup_steps": 1},
    }
    cfg["data"]["init_args"]["val_text_key"] = "txt"
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["fit", "-c", str(path)]) == 2
    assert "run length is unknown" in capsys.readouterr().err
    assert data_main(["index", str(tmp_path / "s")]) == 0
    assert main(["fit", "-c", str(path)]) == 0
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    steps = {row.split(",")[metrics[0].split(",").index("step")] for row in metrics[1:]}
    assert max(int(s) for s in steps if s) + 1 == 16 // 8  # 16 samples, batch 8: 2 steps


def test_fsspec_url(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    img2dataset_shards(tmp_path / "s", [3, 4], stats=False)
    for name in ("00000.tar", "00001.tar"):
        with fsspec.open(f"memory://idx/{name}", "wb") as f:
            f.write((tmp_path / "s" / name).read_bytes())
    report = index_shards("memory://idx/{00000..00001}.tar", out=tmp_path / "out")
    assert report.num_samples == 7 and report.index_path == tmp_path / "out" / "index.json"
    assert [s.samples for s in load_index(tmp_path / "out").shards] == [3, 4]
    # local shards indexed into another folder: listed by absolute path, found again
    index_shards(str(tmp_path / "s" / "*.tar"), out=tmp_path / "elsewhere.json")
    resolved = resolve_source(str(tmp_path / "elsewhere.json"))
    assert resolved.counts == [3, 4] and resolved.urls[0] == str(tmp_path / "s" / "00000.tar")
