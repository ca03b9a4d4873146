"""`mmpt data build --kind coco-caption|vqav2|mcq`: eval shards, counted skips, hand fixtures."""

from __future__ import annotations

import base64
import csv
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
from mmpt.shards.eval_sets import REQUIRED_FIELDS


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg"


def samples(folder: Path) -> list[dict[str, Any]]:
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [{**s, "json": json.loads(s["json"])} for s in ds]


def build(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert data_main(["build", *argv, "--no-progress"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def build_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert data_main(["build", *argv, "--no-progress"]) == 2
    return capsys.readouterr().err


def check_layout(folder: Path, task: str) -> list[dict[str, Any]]:
    meta = load_index(folder).meta
    assert meta["kind"] == "eval" and meta["task"] == task
    got = samples(folder)
    for s in got:
        assert set(REQUIRED_FIELDS[task]) <= set(s["json"]) and isinstance(s["json"]["id"], str)
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"
    return got


def test_coco_caption_set_keeps_every_reference(tmp_path: Path, capsys) -> None:
    root = tmp_path / "val2014"
    for i in (0, 1, 4):
        put(root / f"img{i}.jpg", png(i))
    put(root / "img2.jpg", CORRUPT)  # img3.jpg is missing
    images = [{"id": i, "file_name": f"img{i}.jpg"} for i in range(5)]
    images[1]["domain"] = "out-domain"  # NoCaps
    anns = [{"image_id": 0, "id": 10, "caption": "A dog on grass."}]
    anns += [{"image_id": i, "id": 20 + k, "caption": f"cap {k} of {i}"} for i in (1, 2, 3)
             for k in range(5)]  # fmt: skip
    anns += [
        {"image_id": 0, "id": 11, "caption": "  a brown dog "},
        {"image_id": 4, "caption": " "},
    ]
    src = tmp_path / "captions_val2014.json"
    src.write_text(json.dumps({"images": images, "annotations": anns}))
    out = build(capsys, "--kind", "coco-caption", "--from", str(src), "--images", str(root),
                "--out", str(tmp_path / "cap"))  # fmt: skip
    assert "wrote 2 samples" in out
    assert "skipped 3: corrupt_image=1, missing_image=1, no_reference=1" in out
    got = check_layout(tmp_path / "cap", "caption")
    assert [s["json"]["id"] for s in got] == ["0", "1"]
    assert got[0]["json"]["captions"] == ["A dog on grass.", "a brown dog"]
    assert got[1]["json"]["captions"] == [f"cap {k} of 1" for k in range(5)]
    assert got[1]["json"]["domain"] == "out-domain"

    (tmp_path / "test.json").write_text(json.dumps({"images": images}))
    err = build_error(capsys, "--kind", "coco-caption", "--from", str(tmp_path / "test.json"),
                      "--out", str(tmp_path / "x"))  # fmt: skip
    assert "'images' and 'annotations'" in err
    (tmp_path / "none.json").write_text(json.dumps({"images": images, "annotations": []}))
    err = build_error(capsys, "--kind", "coco-caption", "--from", str(tmp_path / "none.json"),
                      "--images", str(root), "--out", str(tmp_path / "y"))  # fmt: skip
    assert "no caption sample could be written (no_reference=5)" in err


def test_karpathy_shards_have_caption_ids(tmp_path: Path, capsys) -> None:
    put(tmp_path / "val2014" / "a.jpg", png(0))
    entry = {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 7,
             "sentences": [{"raw": "a cat"}, {"raw": "the cat"}]}  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps({"images": [entry]}))
    build(capsys, "--kind", "retrieval", "--from", str(tmp_path / "k.json"),
          "--out", str(tmp_path / "ret"))  # fmt: skip
    (s,) = samples(tmp_path / "ret")
    assert s["json"]["id"] == "7" and s["json"]["captions"] == ["a cat", "the cat"]


def vqa_files(tmp: Path) -> tuple[Path, Path, Path]:
    root = tmp / "coco"
    for i in (1, 2):
        put(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", png(i))
    put(root / "val2014" / f"COCO_val2014_{3:012d}.jpg", CORRUPT)  # image 4 is missing
    qs = [{"question_id": 10 * i + k, "image_id": i, "question": f"q{k} about {i}?"}
          for i in (1, 2, 3, 4) for k in (1, 2)]  # fmt: skip
    qs.append({"question_id": 99, "question": "no image id"})
    anns = []
    for q in qs[:-1]:
        if q["question_id"] == 22:
            continue  # no annotation
        answers = [{"answer": "yes", "answer_id": j} for j in range(7)]
        answers += [{"answer": "no", "answer_id": j} for j in range(7, 10)]
        anns.append({"question_id": q["question_id"], "answers": answers,
                     "answer_type": "yes/no", "question_type": "is the"})  # fmt: skip
    qfile = tmp / "questions.json"
    qfile.write_text(json.dumps({"questions": qs, "data_subtype": "val2014"}))
    afile = tmp / "annotations.json"
    afile.write_text(json.dumps({"annotations": anns}))
    return qfile, afile, root


def test_vqav2_set_from_questions_and_annotations(tmp_path: Path, capsys) -> None:
    qfile, afile, root = vqa_files(tmp_path)
    # Annotations first and --images at the subtype folder: both work.
    out = build(capsys, "--kind", "vqav2", "--from", str(afile), str(qfile),
                "--images", str(root / "val2014"), "--out", str(tmp_path / "vqa"))  # fmt: skip
    assert "wrote 3 samples" in out
    assert "skipped 6: bad_row=1, corrupt_image=2, missing_image=2, no_answers=1" in out
    got = check_layout(tmp_path / "vqa", "vqa")
    assert [s["json"]["id"] for s in got] == ["11", "12", "21"]
    assert got[0]["json"]["answers"] == ["yes"] * 7 + ["no"] * 3
    assert got[0]["json"]["question"] == "q1 about 1?" and got[0]["json"]["image_id"] == "1"
    assert got[0]["json"]["answer_type"] == "yes/no"
    # Built with --images at the COCO root, the same samples.
    build(capsys, "--kind", "vqav2", "--from", str(qfile), str(afile),
          "--images", str(root), "--out", str(tmp_path / "vqa2"))  # fmt: skip
    assert [s["json"]["id"] for s in samples(tmp_path / "vqa2")] == ["11", "12", "21"]

    err = build_error(capsys, "--kind", "vqav2", "--from", str(qfile),
                      "--out", str(tmp_path / "x"))  # fmt: skip
    assert "questions json" in err and "annotations json" in err
    afile.write_text(json.dumps({"annotations": []}))
    err = build_error(capsys, "--kind", "vqav2", "--from", str(qfile), str(afile),
                      "--images", str(root), "--out", str(tmp_path / "y"))  # fmt: skip
    assert "no vqa sample could be written (bad_row=1, no_answers=8)" in err


def test_mmbench_tsv_with_base64_images(tmp_path: Path, capsys) -> None:
    good = base64.b64encode(png(5)).decode()
    big = base64.b64encode(png(6) + b"\0" * 200_000).decode()  # over csv's default field limit
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        [0, "What colour?", "Look closely.", "red", "blue", "green", "pink", "B", "color", good],
        [1, "Is it round?", "nan", "yes", "no", "", "", "A", "shape", big],
        [1000000, "What colour? (rotated)", "", "blue", "green", "pink", "red", "A", "color", "0"],
        [3, "Corrupt?", "", "x", "y", "", "", "A", "c", base64.b64encode(CORRUPT).decode()],
        [4, "Not base64", "", "x", "y", "", "", "A", "c", "!!not-an-image!!"],
        [5, "Answer E?", "", "x", "y", "z", "", "E", "c", good],
        [6, "One option", "", "x", "", "", "", "A", "c", good],
        [7, "Dangling ref", "", "x", "y", "", "", "B", "c", "12345"],
    ]
    src = tmp_path / "MMBench_DEV_EN.tsv"
    with src.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(rows)
    out = build(capsys, "--kind", "mcq", "--from", str(src), "--out", str(tmp_path / "mcq"))
    assert "wrote 3 samples" in out
    assert "skipped 5: corrupt_image=2, missing_image=1, no_answer=1, no_options=1" in out
    got = check_layout(tmp_path / "mcq", "choice")
    first, second, third = (s["json"] for s in got)
    options = {"A": "red", "B": "blue", "C": "green", "D": "pink"}
    assert first == {"id": "0", "question": "What colour?", "options": options, "answer": "B",
                     "hint": "Look closely.", "category": "color", "key": first["key"]}  # fmt: skip
    assert second["options"] == {"A": "yes", "B": "no"} and second["hint"] is None
    assert third["id"] == "1000000" and third["answer"] == "A"
    assert got[2]["jpg"] == got[0]["jpg"]  # the circular copy reuses row 0's image

    with src.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow([c for c in cols if c != "answer"])  # MMBench's test split: no answers
        w.writerow([0, "q", "", "a", "b", "", "", "c", good])
    err = build_error(capsys, "--kind", "mcq", "--from", str(src), "--out", str(tmp_path / "x"))
    assert "no choice sample could be written (no_answer=1)" in err


def test_mcq_jsonl_with_paths_lists_and_indices(tmp_path: Path, capsys) -> None:
    put(tmp_path / "imgs" / "a.png", png(1))
    put(tmp_path / "imgs" / "b.jpg", png(2))
    recs = [
        {"id": "sq1", "question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
         "image": "a.png", "category": "biology"},
        {"id": "sq2", "question": "Pick red", "options": {"A": "red", "B": "blue"},
         "answer": "red", "image_path": "b.jpg"},
        {"id": "sq3", "question": "Missing file", "choices": ["x", "y"], "answer": 0,
         "image": "nope.png"},
        {"id": "sq4", "question": "No image", "choices": ["x", "y"], "answer": 0},
    ]  # fmt: skip
    src = tmp_path / "sqa.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    out = build(capsys, "--kind", "mcq", "--from", str(src), "--images", str(tmp_path / "imgs"),
                "--out", str(tmp_path / "mcq"))  # fmt: skip
    assert "wrote 2 samples" in out and "skipped 3: bad_row=1, missing_image=2" in out
    got = [s["json"] for s in check_layout(tmp_path / "mcq", "choice")]
    assert got[0]["options"] == {"A": "frog", "B": "whale"} and got[0]["answer"] == "B"
    assert got[0]["category"] == "biology" and got[0]["hint"] is None
    assert got[1]["answer"] == "A" and got[1]["id"] == "sq2"
