"""``mmpt data build --kind conversation|interleaved|retrieval|classification``: each source
format written by its own tool, bad rows counted by reason, and the result read by the
datamodules (VILA stage 2 on interleaved, stage 3 on conversations)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmpt.data_cli import main as data_main
from mmpt.shards import load_index

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


def image(path: Path, seed: int, fmt: str = "PNG", size: int = 20) -> Path:
    """A small random image saved by PIL (PNG by default: the builder re-encodes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(path, fmt)
    return path


def image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return path


def samples(folder: Path) -> list[dict[str, Any]]:
    """Every sample of a shard folder, with ``json`` parsed."""
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append({**s, "json": json.loads(s["json"])} if "json" in s else s)
    return out


def build(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert data_main(["build", *argv, "--no-progress"]) == 0
    return capsys.readouterr().out


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def llava_rows(tmp: Path) -> list[dict[str, Any]]:
    image(tmp / "a" / "coco" / "1.png", 1)
    image(tmp / "b" / "vg" / "2.jpg", 2, "JPEG")  # found in the second --images root
    corrupt(tmp / "a" / "coco" / "bad.jpg")
    return [
        {"id": "ok", "image": "coco/1.png", "conversations": turns("<image>\nwhat is it?", "a")},
        {"id": "root2", "image": "vg/2.jpg", "conversations": turns("<image>\nand this?", "b")},
        {"id": "text", "conversations": turns("hello", "hi there", "bye", "see you")},
        {"id": "gone", "image": "coco/missing.jpg", "conversations": turns("<image>", "x")},
        {"id": "bad", "image": "coco/bad.jpg", "conversations": turns("<image>", "x")},
        {"id": "mute", "image": "coco/1.png", "conversations": turns("<image>", "  ")},
        {"id": "two", "image": "coco/1.png", "conversations": turns("<image> <image>", "x")},
        {"id": "junk", "conversations": "not a list"},
    ]


def test_llava_conversations_with_two_roots_and_counted_skips(tmp_path: Path, capsys) -> None:
    (tmp_path / "mix.json").write_text(json.dumps(llava_rows(tmp_path)))
    out = build(capsys, "--kind", "conversation", "--from", str(tmp_path / "mix.json"),
                "--images", str(tmp_path / "a"), "--images", str(tmp_path / "b"),
                "--out", str(tmp_path / "sft"), "--workers", "2")  # fmt: skip
    assert "wrote 3 samples" in out
    assert ("skipped 5: bad_row=1, corrupt_image=1, empty_text=1, marker_image_mismatch=1, "
            "missing_image=1") in out  # fmt: skip
    assert "2 <image> marker(s) for 1 image(s)" in out
    got = {s["json"]["id"]: s for s in samples(tmp_path / "sft")}
    assert set(got) == {"ok", "root2", "text"}
    assert got["ok"]["json"]["images"] == ["0.jpg"] and got["ok"]["0.jpg"][:2] == b"\xff\xd8"
    assert got["ok"]["json"]["conversations"][1] == {"from": "gpt", "value": "a"}
    assert got["text"]["json"]["images"] == [] and "0.jpg" not in got["text"]
    index = load_index(tmp_path / "sft")
    assert index.meta["kind"] == "conversation" and index.meta["skipped"]["missing_image"] == 1


def test_llava_pretrain_file_as_pairs(tmp_path: Path, capsys) -> None:
    image(tmp_path / "img" / "00000" / "1.png", 1)
    rows = [
        {"id": "1", "image": "00000/1.png", "conversations": turns("<image>\nBrief.", "a cat")},
        {"id": "2", "conversations": turns("no image here", "so no pair")},
    ]
    (tmp_path / "pretrain.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = build(capsys, "--kind", "conversation", "--pairs", "--from",
                str(tmp_path / "pretrain.jsonl"), "--images", str(tmp_path / "img"),
                "--out", str(tmp_path / "pairs"))  # fmt: skip
    assert "wrote 1 samples" in out and "not_a_pair=1" in out
    (pair,) = samples(tmp_path / "pairs")
    assert pair["txt"] == b"a cat" and pair["json"]["prompt"] == "Brief." and "jpg" in pair


def mmc4_docs(tmp: Path) -> list[dict[str, Any]]:
    image(tmp / "images" / "a.png", 1)
    image(tmp / "images" / "b.png", 2)
    corrupt(tmp / "images" / "c.jpg")

    def info(name: str, index: int, sim: float) -> dict[str, Any]:
        return {"image_name": name, "matched_text_index": index, "matched_sim": sim}

    return [
        {"url": "u1", "text_list": ["first.", "second.", "third."],
         "image_info": [info("b.png", 2, 0.3), info("a.png", 0, 0.31),
                        info("low.png", 1, 0.1), info("nope.png", 1, 0.4)]},
        {"url": "u2", "text_list": ["", "  "], "image_info": [info("a.png", 0, 0.5)]},
        {"url": "u3", "text_list": ["only a bad image."], "image_info": [info("c.jpg", 0, 0.5)]},
        {"url": "u4", "text_list": ["under the bar."], "image_info": [info("a.png", 0, 0.2)]},
    ]  # fmt: skip


def test_mmc4_places_images_before_their_sentence_and_counts_drops(tmp_path: Path, capsys) -> None:
    docs = mmc4_docs(tmp_path)
    half = (tmp_path / "docs_shard_0.jsonl", tmp_path / "docs_shard_1.jsonl")
    half[0].write_text("".join(json.dumps(d) + "\n" for d in docs[:2]))
    half[1].write_text("".join(json.dumps(d) + "\n" for d in docs[2:]) + "{not json\n")
    out = build(capsys, "--kind", "interleaved", "--from", *map(str, half), "--images",
                str(tmp_path / "images"), "--out", str(tmp_path / "mmc4"))  # fmt: skip
    assert "wrote 1 samples" in out
    assert "skipped 4: bad_row=1, empty_text=1, no_image=2" in out
    assert "dropped 4 image(s) from documents (a document left with none is also skipped): " \
        "below_min_sim=2, corrupt_image=1, missing_image=1" in out  # fmt: skip
    (doc,) = samples(tmp_path / "mmc4")
    assert doc["json"]["texts"] == [None, "first.", "second.", None, "third."]
    assert doc["json"]["images"] == ["0.jpg", None, None, "1.jpg", None]
    assert doc["json"]["url"] == "u1" and {"0.jpg", "1.jpg"} <= set(doc)
    # the threshold is a flag: at 0.05 the low-similarity images stay
    out = build(capsys, "--kind", "interleaved", "--from", str(half[1]), "--images",
                str(tmp_path / "images"), "--out", str(tmp_path / "low"),
                "--min-sim", "0.05")  # fmt: skip
    assert "wrote 1 samples" in out  # u4's image at 0.2 now passes


def test_obelics_rows_from_jsonl_paths(tmp_path: Path, capsys) -> None:
    image(tmp_path / "img" / "x.png", 3)
    rows = [
        {"texts": ["intro", None, "outro"], "images": [None, "x.png", None]},
        {"texts": ["t", None], "images": [None, "https://example.com/y.jpg"]},
        {"texts": ["t"], "images": [None, None]},
        {"texts": [None, None], "images": [None, "x.png"]},
    ]
    (tmp_path / "obelics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = build(capsys, "--kind", "interleaved", "--from", str(tmp_path / "obelics.jsonl"),
                "--images", str(tmp_path / "img"), "--out", str(tmp_path / "ob"))  # fmt: skip
    assert "wrote 1 samples" in out and "bad_row=1, empty_text=1, no_image=1" in out
    assert "remote_url=1" in out
    (doc,) = samples(tmp_path / "ob")
    assert doc["json"]["texts"] == ["intro", None, "outro"]
    assert doc["json"]["images"] == [None, "0.jpg", None]
    assert data_main(["build", "--kind", "interleaved", "--from", str(tmp_path / "obelics.jsonl"),
                      "--min-sim", "0.2", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--min-sim applies to MMC4" in capsys.readouterr().err


def test_obelics_parquet_with_image_bytes(tmp_path: Path, capsys) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "texts": [["a doc", None, "end"], ["bad", None]],
            "images": [[None, image_bytes(1), None], [None, b"garbage"]],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    out = build(capsys, "--kind", "interleaved", "--from", str(tmp_path / "part-0.parquet"),
                "--images-from-bytes", "--out", str(tmp_path / "ob"))  # fmt: skip
    assert "wrote 1 samples" in out and "no_image=1" in out and "corrupt_image=1" in out
    (doc,) = samples(tmp_path / "ob")
    assert doc["json"]["images"] == [None, "0.jpg", None]


def test_karpathy_test_split_keeps_all_captions(tmp_path: Path, capsys) -> None:
    entries = []
    for i, split in enumerate(["test", "test", "test", "train", "test"]):
        if i != 2:  # image 2 is missing
            image(tmp_path / "coco" / "val2014" / f"{i}.jpg", i, "JPEG")
        sentences = [{"raw": f"caption {k} of {i} "} for k in range(5)] if i != 4 else []
        entries.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": split,
                        "sentences": sentences, "cocoid": i})  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    out = build(capsys, "--kind", "retrieval", "--from", str(tmp_path / "dataset_coco.json"),
                "--images", str(tmp_path / "coco"), "--split", "test",
                "--out", str(tmp_path / "ret"))  # fmt: skip
    assert "wrote 2 samples" in out and "skipped 2: empty_text=1, missing_image=1" in out
    got = samples(tmp_path / "ret")
    assert [s["json"]["cocoid"] for s in got] == [0, 1]
    assert got[1]["json"]["captions"] == [f"caption {k} of 1" for k in range(5)]
    assert load_index(tmp_path / "ret").meta["text_key"] == "json:captions"
    assert data_main(["build", "--kind", "retrieval", "--from", str(tmp_path / "dataset_coco.json"),
                      "--split", "val", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "the file has splits ['test', 'train']" in capsys.readouterr().err


def test_imagefolder_labels_and_zeroshot_meta(tmp_path: Path, capsys) -> None:
    for c, name in enumerate(["tabby_cat", "dog", "ant"]):
        for i in range(2):
            image(tmp_path / "val" / name / f"{i}.png", 10 * c + i)
    corrupt(tmp_path / "val" / "dog" / "broken.jpg")
    out = build(capsys, "--kind", "classification", "--from", str(tmp_path / "val"),
                "--out", str(tmp_path / "cls"))  # fmt: skip
    assert "wrote 6 samples" in out and "skipped 1: corrupt_image=1" in out
    zs = load_index(tmp_path / "cls").meta["zeroshot"]
    assert zs["classnames"] == ["ant", "dog", "tabby cat"]
    assert len(zs["templates"]) == 80 and all("{}" in t for t in zs["templates"])
    got = samples(tmp_path / "cls")
    assert [int(s["cls"]) for s in got] == [0, 0, 1, 1, 2, 2]
    assert got[4]["json"]["classname"] == "tabby cat" and got[4]["txt"].endswith(b"tabby cat.")
    (tmp_path / "names.txt").write_text("formica\ncanis\nfelis\n")
    build(capsys, "--kind", "classification", "--from", str(tmp_path / "val"),
          "--classnames", str(tmp_path / "names.txt"), "--out", str(tmp_path / "cls2"))  # fmt: skip
    assert load_index(tmp_path / "cls2").meta["zeroshot"]["classnames"][2] == "felis"


def test_flags_of_other_kinds_and_several_sources_are_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.csv").write_text("path,caption\n")
    argv = ["build", "--from", str(tmp_path / "a.csv"), str(tmp_path / "a.csv"), "--out", "o"]
    assert data_main(argv) == 2
    assert "only --kind conversation, interleaved and vqav2 take several" in capsys.readouterr().err
    argv = ["build", "--kind", "classification", "--from", str(tmp_path), "--pairs", "--out", "o"]
    assert data_main(argv) == 2
    assert "--pairs does not apply to --kind classification" in capsys.readouterr().err


def fit(config: str, shards: Path, *extra: str) -> None:
    from mmpt.cli import main

    argv = [
        "fit", "-c", str(CONFIGS / config),
        "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--model.init_args.init_from=null", "--data.init_args.synthetic=null",
        "--data.init_args.num_workers=0", "--data.init_args.buffer_size=8",
        "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
        f"--data.init_args.train.urls=[{shards}]", "--data.init_args.train.weights=[1.0]",
        "--data.init_args.train.epoch_samples=8", f"--data.init_args.val.urls={shards}",
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0


def assert_trained_without_skips(metrics: Path) -> None:
    """Training logged a loss, and the data stream skipped none of the built samples."""
    import csv

    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert rows and all(float(r["data/skipped"]) == 0 for r in rows)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """``tmp_path`` as the working directory, with the quickstart's tokenizer in place."""
    from mmpt.synth.vocab import write_synth_tokenizer

    monkeypatch.chdir(tmp_path)
    write_synth_tokenizer(Path("data/shapes/tokenizer"))
    return tmp_path


@pytest.mark.slow
def test_vila_stage2_trains_on_built_mmc4(workdir: Path, capsys) -> None:
    tmp_path = workdir
    docs = [d for d in mmc4_docs(tmp_path) if d["url"] == "u1"] * 4
    Path("docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    build(capsys, "--kind", "interleaved", "--from", "docs.jsonl", "--images", "images",
          "--out", "mmc4", "--samples-per-shard", "2")  # fmt: skip
    fit("vila_stage2.yaml", tmp_path / "mmc4")
    assert_trained_without_skips(Path("runs/vila_tiny_stage2/version_0/metrics.csv"))


@pytest.mark.slow
def test_vila_stage3_trains_on_built_llava(workdir: Path, capsys) -> None:
    tmp_path = workdir
    rows = [r for r in llava_rows(tmp_path) if r["id"] in ("ok", "root2", "text")] * 3
    Path("mix.json").write_text(json.dumps(rows))
    build(capsys, "--kind", "conversation", "--from", "mix.json", "--images", "a",
          "--images", "b", "--out", "sft", "--samples-per-shard", "3")  # fmt: skip
    fit("vila_stage3.yaml", tmp_path / "sft")
    assert_trained_without_skips(Path("runs/vila_tiny_stage3/version_0/metrics.csv"))


@pytest.mark.slow
def test_eval_reads_built_retrieval_and_classification_shards(tmp_path: Path, capsys) -> None:
    """`mmpt eval retrieval` scores all 5 captions per image; `eval zeroshot` finds the classes
    and templates in the built index."""
    import yaml

    from mmpt.cli import main
    from tests.test_cli import tiny_fit_config

    entries = []
    for i in range(6):
        image(tmp_path / "coco" / "val2014" / f"{i}.jpg", i, "JPEG")
        entries.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": "test",
                        "sentences": [{"raw": f"photo {k} of {i}"} for k in range(5)]})  # fmt: skip
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    build(capsys, "--kind", "retrieval", "--from", str(tmp_path / "karpathy.json"),
          "--images", str(tmp_path / "coco"), "--out", str(tmp_path / "ret"))  # fmt: skip
    for c, name in enumerate(["ant", "bee", "cat"]):
        for i in range(2):
            image(tmp_path / "val" / name / f"{i}.png", 10 * c + i)
    build(capsys, "--kind", "classification", "--from", str(tmp_path / "val"),
          "--out", str(tmp_path / "cls"))  # fmt: skip
    cfg = tiny_fit_config(tmp_path / "ret", tmp_path / "run")
    cfg["trainer"] |= {"max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1}
    cfg["data"]["init_args"] |= {"batch_size": 2, "val_text_key": "json:captions"}  # for fit
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["fit", "-c", str(tmp_path / "fit.yaml")]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = ["-c", str(tmp_path / "fit.yaml"), "--ckpt", str(last), "--num-workers", "0",
              "--device", "cpu"]  # fmt: skip
    # no --text-key: the retrieval shards' index.json names json:captions
    argv = ["eval", "retrieval", *common, "--data", str(tmp_path / "ret"),
            "--out", str(tmp_path / "e1")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "e1" / "retrieval.json").read_text())
    assert report["num_images"] == 6 and report["num_texts"] == 30
    argv = ["eval", "zeroshot", *common, "--data", str(tmp_path / "cls"),
            "--out", str(tmp_path / "e2")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "e2" / "zeroshot.json").read_text())
    assert report["num_images"] == 6 and 0.0 <= report["metrics"]["zeroshot/top1"] <= 1.0
