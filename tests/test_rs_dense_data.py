"""rs-dense data: synthetic set, sample decoding with consistent flips, the per-task mixing
datamodule, and the builder on hand-written DOTA txt and COCO json files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpt.batch import DenseBatch
from mmpt.data_cli import main as data_main
from mmpt.datamodules.dense import DenseDataModule, DenseSample, collate_dense
from mmpt.datamodules.streams import StreamConfig
from mmpt.models.dense.rotated_ops import obb_to_corners, rotated_iou
from mmpt.preprocess import ImagePreprocess, Preprocess
from mmpt.shards.dense_format import encode_dense_sample, segmentation_mask
from mmpt.shards.index import load_index
from mmpt.synth import make_synthetic


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (several fight over a shared CPU, ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rsdense")
    make_synthetic(
        "rs-dense", out, train_samples=12, val_samples=6, image_size=32, samples_per_shard=4
    )
    return out


def _samples(folder: Path) -> list[dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_synth_writes_one_source_per_task(dense: Path) -> None:
    has = {}
    for split in ("train", "train-semseg", "train-instance", "train-rotated", "val"):
        samples = _samples(dense / split)
        assert len(samples) == (6 if split == "val" else 12)
        infos = [json.loads(s["json"]) for s in samples]
        has[split] = (
            all("mask.png" in s for s in samples),
            all("instances" in i for i in infos),
            all("obbs" in i for i in infos),
        )
        meta = load_index(dense / split).meta
        assert meta["object_classes"] == ["building", "vehicle"]
    assert has["train-semseg"] == (True, False, False)
    assert has["train-instance"] == (False, True, False)
    assert has["train-rotated"] == (False, False, True)
    assert has["val"] == has["train"] == (True, True, True)
    # the oriented box, the instance outline and the mask's class pixels agree
    d = DenseSample(32, train=False)(_samples(dense / "val")[0])
    for m, label, box in zip(
        d["instances"]["masks"], d["instances"]["labels"], d["obbs"]["boxes"], strict=True
    ):
        assert int(m.sum()) > 0 and (d["mask"][m.bool()] == 3 + label).float().mean() > 0.9
        corners = obb_to_corners(box[None].double())[0].numpy()
        poly = segmentation_mask([list(corners.reshape(-1))], 32, 32)
        inter = (poly.astype(bool) & m.numpy().astype(bool)).sum()
        assert inter / max(1, (poly.astype(bool) | m.numpy().astype(bool)).sum()) > 0.8


def _hand_sample() -> dict:
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 1:9] = 1  # an 8 x 4 box at the top left
    image[mask > 0] = 200
    inst = [{"label": 0, "segmentation": [[1, 2, 9, 2, 9, 6, 1, 6]]}]
    obbs = [{"label": 0, "obb": [5.0, 4.0, 8.0, 4.0, 0.2], "difficult": True}]
    sample = encode_dense_sample("k", image, mask, inst, obbs)
    sample["json"] = json.dumps(sample["json"]).encode()
    return sample


def test_flips_move_image_masks_and_boxes_together(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    monkeypatch.setattr(random, "random", lambda: 0.0)  # flip both ways
    d = DenseSample(16, train=True)(_hand_sample())
    assert d["mask"][10:14, 7:15].all() and int(d["mask"].sum()) == 32
    assert torch.equal(d["instances"]["masks"][0].bool(), d["mask"].bool())
    assert d["instances"]["boxes"].tolist() == [[7.0, 10.0, 15.0, 14.0]]
    assert (d["image"][:, 10:14, 7:15] == 200).all()
    cx, cy, w, h, a = d["obbs"]["boxes"][0].tolist()
    assert (cx, cy, w, h) == pytest.approx((11.0, 12.0, 8.0, 4.0)) and a == pytest.approx(0.2)
    assert d["obbs"]["difficult"].tolist() == [True]
    # resized to 32 px: everything scales by 2
    big = DenseSample(32, train=False)(_hand_sample())
    assert big["obbs"]["boxes"][0, :4].tolist() == pytest.approx([10.0, 8.0, 16.0, 8.0])
    assert big["instances"]["boxes"].tolist() == [[2.0, 4.0, 18.0, 12.0]]


def test_datamodule_mixes_task_sources(dense: Path) -> None:
    pre = ImagePreprocess(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    tasks = ["train-semseg", "train-instance", "train-rotated"]
    train = StreamConfig(
        urls=[str(dense / t) for t in tasks],
        weights=[1.0, 1.0, 1.0],
        resampled=True,
        epoch_samples=24,
        names=["s", "i", "r"],
    )
    dm = DenseDataModule(
        train=train,
        val=StreamConfig(urls=str(dense / "val"), shuffle_buffer=0),
        batch_size=12,
        num_workers=0,
        preprocess=Preprocess(image=pre),
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(isinstance(b, DenseBatch) for b in batches)
    b = batches[0]
    kinds = [
        (bool(m), i is not None, o is not None)
        for m, i, o in zip(b.has_mask, b.instances, b.obbs, strict=True)
    ]
    assert all(sum(k) == 1 for k in kinds)  # every sample holds one task's annotation
    assert sum(b.mix.values()) == 12 and len(b.mix) >= 2
    assert bool((b.masks[~b.has_mask] == 255).all())
    (val,) = list(dm.val_dataloader())
    out = dm.on_after_batch_transfer(val, 0)
    assert out.images.dtype == torch.float32 and out.images.shape == (6, 3, 32, 32)
    assert bool(out.has_mask.all()) and all(o is not None for o in out.obbs)


def test_build_from_dota_txt(tmp_path: Path) -> None:
    (tmp_path / "labelTxt").mkdir()
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "images" / "P1.png")
    (tmp_path / "labelTxt" / "P1.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.146\n"
        "10 10 30 10 30 20 10 20 small-vehicle 0\n"
        "50 30 40 40 30 30 40 20 plane 1\n"
    )
    assert (
        data_main(
            [
                "build",
                "--kind",
                "rs-dense",
                "--from",
                str(tmp_path / "labelTxt"),
                "--out",
                str(tmp_path / "out"),
                "--size",
                "32",
            ]
        )
        == 0
    )
    samples = {s["__key__"]: json.loads(s["json"]) for s in _samples(tmp_path / "out")}
    assert sorted(samples) == ["P1_0_0", "P1_0_28", "P1_8_0", "P1_8_28"]  # 2 x 2 tiles
    assert load_index(tmp_path / "out").meta["object_classes"] == ["plane", "small-vehicle"]
    (car,) = samples["P1_0_0"]["obbs"]
    assert car["label"] == 1 and not car["difficult"]
    assert car["obb"] == pytest.approx([20.0, 15.0, 20.0, 10.0, 0.0], abs=1e-6)
    (plane,) = samples["P1_8_28"]["obbs"]  # a square turned 45 degrees, centre (40, 30)
    assert plane["label"] == 0 and plane["difficult"]
    cx, cy, w, h, a = plane["obb"]
    assert (cx, cy, w, h) == pytest.approx([12.0, 22.0, math.sqrt(200), math.sqrt(200)])
    assert abs(abs(a) - math.pi / 4) < 1e-6
    assert "mask.png" not in _samples(tmp_path / "out")[0]  # DOTA: rotated boxes only


def test_build_from_coco_json(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 30, "width": 40}],
        "categories": [{"id": 3, "name": "ship"}, {"id": 9, "name": "harbor"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 9,
                "iscrowd": 0,
                "segmentation": [[2, 2, 22, 2, 22, 12, 2, 12]],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [[30, 20, 36, 20, 36, 28, 30, 28]],
            },
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    assert (
        data_main(
            [
                "build",
                "--kind",
                "rs-dense",
                "--from",
                str(tmp_path / "inst.json"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (sample,) = _samples(tmp_path / "out")
    d = DenseSample(40, train=False)  # 30 x 40 is not square: refused with the fix named
    with pytest.raises(ValueError, match="--tile-size|square"):
        d(sample)
    from mmpt.shards.dense_format import decode_dense_sample

    got = decode_dense_sample(sample)
    assert got["instances"]["labels"].tolist() == [1, 0]  # categories in id order
    assert sorted(np.unique(got["mask"]).tolist()) == [0, 1, 2]
    assert (got["mask"][3:11, 3:21] == 2).all() and (got["mask"][21:27, 31:35] == 1).all()
    boxes = torch.from_numpy(got["obbs"]["boxes"])
    ref = torch.tensor([[12.0, 7.0, 20.0, 10.0, 0.0], [33.0, 24.0, 8.0, 6.0, math.pi / 2]])
    assert torch.diag(rotated_iou(boxes, ref)).min() > 0.999
    meta = load_index(tmp_path / "out").meta
    assert meta["semantic_classes"] == ["background", "ship", "harbor"]


def test_build_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["build", "--kind", "rs-dense", "--out", str(tmp_path / "o"), "--from"]
    assert data_main([*args, str(tmp_path / "none")]) != 0
    assert "--from" in capsys.readouterr().err
    (tmp_path / "l").mkdir()
    (tmp_path / "images").mkdir()
    assert data_main([*args, str(tmp_path / "l")]) != 0
    assert "no DOTA .txt label files" in capsys.readouterr().err


def test_collate_marks_missing_masks() -> None:
    a = DenseSample(16, train=False)(_hand_sample())
    b = dict(a, mask=None, instances=None)
    batch = collate_dense([a, b])
    assert batch.has_mask.tolist() == [True, False] and batch.instances[1] is None
    assert bool((batch.masks[1] == 255).all())
