"""``mmpt data dedup`` and ``mmpt data filter`` on shards written with webdataset's TarWriter."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from mmpt.curation.expr import KeepExpression
from mmpt.curation.filter import filter_shards
from mmpt.data_cli import main as data_main


def _image(seed: int, size: int = 96) -> Image.Image:
    """A distinct natural-looking image: smooth random colour field (upsampled 6x6 noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write(folder: Path, samples: list[dict], per_shard: int = 5) -> Path:
    folder.mkdir(parents=True)
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"raw-{s // per_shard:04d}.tar")) as w:
            for sample in samples[s : s + per_shard]:
                w.write(sample)
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 distinct images + 3 planted duplicates of image 3: exact, re-encoded, resized."""
    tmp = tmp_path_factory.mktemp("curation")
    samples = [
        {"__key__": f"s{i:03d}", "jpg": _jpeg(_image(i)), "txt": f"caption {i}"} for i in range(20)
    ]
    original = samples[3]["jpg"]
    samples.append({"__key__": "exact", "jpg": original, "txt": "copy"})
    samples.append({"__key__": "reencoded", "jpg": _jpeg(Image.open(io.BytesIO(original)), 40)})
    half = Image.open(io.BytesIO(original)).resize((48, 48), Image.BILINEAR)
    samples.append({"__key__": "resized", "jpg": _jpeg(half)})
    raw = _write(tmp / "raw", samples)
    evalset = _write(tmp / "eval", [{"__key__": "e0", "jpg": _jpeg(_image(7), 60)}])
    return {"tmp": tmp, "raw": raw, "eval": evalset, "samples": samples}


def _dedup(planted: dict, *args: str) -> dict[str, dict]:
    out = planted["tmp"] / "dedup" / "-".join(args)
    assert data_main(["dedup", "--from", str(planted["raw"]), "--out", str(out), *args]) == 0
    rows = pq.read_table(out / "dedup.parquet").to_pylist()
    return {r["key"]: r for r in rows}


def test_phash_finds_every_planted_duplicate_and_no_false_positive(planted: dict) -> None:
    rows = _dedup(planted, "--method", "phash")
    assert len(rows) == 23
    dups = {k for k, r in rows.items() if r["duplicate"]}
    assert dups == {"exact", "reencoded", "resized"}
    assert all(rows[k]["dup_of"] == "raw-0000.tar/s003" for k in dups)
    assert rows["s003"]["duplicate"] is False  # the first occurrence is kept


def test_exact_finds_only_the_identical_bytes(planted: dict) -> None:
    rows = _dedup(planted, "--method", "exact")
    assert {k for k, r in rows.items() if r["duplicate"]} == {"exact"}


def test_against_an_eval_set(planted: dict) -> None:
    rows = _dedup(planted, "--method", "phash", "--against", str(planted["eval"]))
    assert rows["s007"]["duplicate"] and rows["s007"]["dup_of"] == "eval:raw-0000.tar/e0"


def test_embedding_dedup_from_predict_folder(planted: dict, tmp_path: Path) -> None:
    """Embeddings of an `mmpt predict` folder: near-equal vectors are duplicates."""
    rank = tmp_path / "pred" / "rank000"
    rank.mkdir(parents=True)
    keys = [s["__key__"] for s in planted["samples"]]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(keys), 16)).astype(np.float32)
    emb[keys.index("resized")] = emb[3] + 0.01  # same image, nearly the same embedding
    np.save(rank / "image_emb.npy", emb)
    (rank / "keys.json").write_text(json.dumps(keys))
    (rank / "manifest.json").write_text(json.dumps({"arrays": {"image_emb": list(emb.shape)}}))
    rows = _dedup(planted, "--method", "embedding", "--embeddings", str(tmp_path / "pred"))
    assert {k for k, r in rows.items() if r["duplicate"]} == {"resized"}


def _scores(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_filter_keeps_what_the_expression_says_byte_for_byte(planted: dict, tmp_path: Path) -> None:
    keys = [s["__key__"] for s in planted["samples"]]
    shard = {k: f"raw-{i // 5:04d}.tar" for i, k in enumerate(keys)}
    clip = {k: i / 22 for i, k in enumerate(keys)}
    del clip["s001"]  # not scored by the clip table
    clip_rows = [{"shard": shard[k], "key": k, "clip": v} for k, v in clip.items()]
    _scores(tmp_path / "clip" / "rank000.parquet", clip_rows)
    dedup = _dedup(planted, "--method", "phash")
    out = tmp_path / "curated"
    argv = ["filter", "--from", str(planted["raw"]), "--scores", str(tmp_path / "clip")]
    argv += [str(planted["tmp"] / "dedup" / "--method-phash"), "--keep"]
    argv += ["clip >= 0.28 and not duplicate", "--out", str(out), "--samples-per-shard", "4"]
    assert data_main(argv) == 0

    want = [k for k in keys if k in clip and clip[k] >= 0.28 and not dedup[k]["duplicate"]]
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == len(want) and all(s["samples"] <= 4 for s in index["shards"])
    got = {}
    for info in index["shards"]:
        with tarfile.open(out / info["name"]) as tar:
            for m in tar.getmembers():
                got[m.name] = tar.extractfile(m).read()
    originals = {s["__key__"]: s for s in planted["samples"]}
    assert sorted({n.split(".")[0] for n in got}) == sorted(want)
    for name, data in got.items():
        key, ext = name.split(".", 1)
        assert data == (originals[key][ext].encode() if ext == "txt" else originals[key][ext])
    curation = index["meta"]["curation"]
    assert curation["keep"] == "clip >= 0.28 and not duplicate" and curation["kept"] == len(want)
    dropped = curation["dropped"]
    # s001 has no clip score: it fails the clip term (a missing value compares False)
    assert dropped["clip >= 0.28"] == sum(1 for k in clip if clip[k] < 0.28) + 1
    assert dropped["not duplicate"] == 3 and dropped.get("no score", 0) == 0
    prov = pq.read_table(out / "provenance.parquet").to_pylist()
    assert [p["out_key"] for p in prov] == want
    assert all(p["source_shard"].endswith(shard[p["source_key"]]) for p in prov)
    assert prov[0]["clip"] == pytest.approx(clip[want[0]])


def _keys(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted({n.split(".")[0] for n in tar.getnames()})


def test_top_fraction_and_quota(planted: dict, tmp_path: Path) -> None:
    keys = [s["__key__"] for s in planted["samples"]][:20]
    rows = [{"shard": f"raw-{i // 5:04d}.tar", "key": k, "q": float(i)} for i, k in enumerate(keys)]
    scores = _scores(tmp_path / "q.parquet", rows)
    report = filter_shards([str(planted["raw"])], [str(scores)], "top(q, 0.25)", tmp_path / "top")
    assert report.kept == 5 and report.dropped["no score"] == 3
    assert _keys(tmp_path / "top" / "curated-000000.tar") == keys[15:]
    report = filter_shards(
        [str(planted["raw"])], [str(scores)], "q >= 0", tmp_path / "quota", quotas={"raw": 4},
        rank_by="q",
    )  # fmt: skip
    assert report.kept == 4 and report.dropped["quota raw"] == 16
    assert _keys(tmp_path / "quota" / "curated-000000.tar") == keys[16:]


def test_expressions_on_hand_columns() -> None:
    cols = {"a": np.array([0.1, 0.5, np.nan, 0.9]), "d": np.array([True, False, None, False])}
    assert KeepExpression.parse("a > 0.3").evaluate(cols).tolist() == [False, True, False, True]
    assert KeepExpression.parse("not d").evaluate(cols).tolist() == [False, True, True, True]
    assert KeepExpression.parse("missing(a) or 0.2 < a < 0.6").evaluate(cols).tolist() == [
        False, True, True, False,
    ]  # fmt: skip
    assert KeepExpression.parse("bottom(a, 0.34)").evaluate(cols).tolist() == [
        True, False, False, False,
    ]  # fmt: skip
    terms = [t.text for t in KeepExpression.parse("a > 0.3 and not d").conjuncts()]
    assert terms == ["a > 0.3", "not d"]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("clip >=", "not an expression"),
        ("__import__('os').system('x')", "only top, bottom, missing can be called"),
        ("clip.real > 0", "Attribute is not allowed"),
        ("clpi > 0.2", "no score column 'clpi'"),
    ],
)
def test_bad_expressions_are_named(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeepExpression.parse(expression, ["clip", "duplicate"])


def test_filter_cli_errors_are_one_line(planted: dict, tmp_path: Path, capsys) -> None:
    scores = _scores(tmp_path / "s.parquet", [{"shard": "raw-0000.tar", "key": "s000", "x": 1.0}])
    argv = ["filter", "--from", str(planted["raw"]), "--scores", str(scores), "--out"]
    assert data_main([*argv, str(tmp_path / "o"), "--keep", "clip > 0"]) == 2
    assert "no score column 'clip'" in capsys.readouterr().err
    assert data_main([*argv, str(tmp_path / "o"), "--keep", "x > 0", "--quota", "nope=3"]) == 2
    assert "no such source" in capsys.readouterr().err
    missing = ["filter", "--from", str(planted["raw"]), "--scores", str(tmp_path / "none")]
    assert data_main([*missing, "--out", str(tmp_path / "o2"), "--keep", "x > 0"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_filter_counts_a_corrupt_shard(planted: dict, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in planted["raw"].glob("*.tar"):
        (raw / f.name).write_bytes(f.read_bytes())
    (raw / "raw-0001.tar").write_bytes(b"not a tar at all")
    rows = [{"shard": f"raw-{i // 5:04d}.tar", "key": s["__key__"], "x": 1.0}
            for i, s in enumerate(planted["samples"])]  # fmt: skip
    scores = _scores(tmp_path / "s.parquet", rows)
    report = filter_shards([str(raw)], [str(scores)], "x > 0", tmp_path / "out")
    assert report.kept == 18  # 23 minus the 5 of the broken shard (no index: lost unknown)


def test_pyarrow_uses_the_system_allocator_so_forks_do_not_deadlock() -> None:
    """jemalloc's background thread (pyarrow's default pool) deadlocked a forked build pool."""
    assert pa.default_memory_pool().backend_name == "system"
