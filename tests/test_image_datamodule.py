"""ImageDataModule on tiny tile and RGB shards made here (ImageBatch, bands by name, labels,
normalisation against the formula), and ImageTextDataModule fed multispectral tiles."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from mmpt.bands import S2_L1C
from mmpt.batch import ImageBatch, ImageTextBatch
from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.images import ImageDataModule
from mmpt.datamodules.streams import StreamConfig
from mmpt.preprocess import ImagePreprocess, Preprocess
from mmpt.shards import ShardWriter
from tests.helpers import jpeg_bytes

BANDS = ("B4", "B3", "B2", "B8")
MEAN = (0.1, 0.12, 0.09, 0.3)
STD = (0.05, 0.04, 0.03, 0.1)
TILE_PRE = ImagePreprocess(size=8, mean=MEAN, std=STD, channels=4, bands=BANDS, scale=1e-4)


class CharTokenizer:
    """Characters -> ids (code point mod 97), padded/cut to 24: cheap, and exact to compare."""

    context_length, vocab_size = 24, 97

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % self.vocab_size for c in t[: self.context_length]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def raw_tile(i: int) -> np.ndarray:
    """A 13-band Sentinel-2 L1C tile (uint16 digital numbers), 8 x 8."""
    return np.random.default_rng(i).integers(0, 10000, (13, 8, 8)).astype(np.uint16)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def tile_samples(n: int) -> list[dict[str, Any]]:
    """``n`` tiles: npy with a sensor (even i) or a contiguous tif with shuffled band names."""
    out = []
    for i in range(n):
        array = raw_tile(i)
        meta: dict[str, Any] = {"label": i % 3, "caption": f"fields and a river {i}"}
        if i % 2 == 0:
            meta["sensor"] = "s2_l1c"
            out.append({"__key__": f"t{i:03d}", "npy": npy_bytes(array), "json": meta})
        else:  # stored in reversed band order, as (H, W, C)
            meta["bands"] = list(S2_L1C)[::-1]
            buf = io.BytesIO()
            tifffile.imwrite(buf, np.moveaxis(array[::-1], 0, -1), planarconfig="contig")
            out.append({"__key__": f"t{i:03d}", "tif": buf.getvalue(), "json": meta})
    return out


def expected_tile(i: int) -> torch.Tensor:
    """The model input of tile i, straight from the formula: (x[bands] * 1e-4 - mean) / std."""
    x = raw_tile(i).astype(np.float64)[[S2_L1C.index(b) for b in BANDS]]
    mean = np.array(MEAN).reshape(4, 1, 1)
    std = np.array(STD).reshape(4, 1, 1)
    return torch.from_numpy((x * 1e-4 - mean) / std).float()


def write(out: Path, samples: list[dict[str, Any]], per_shard: int = 100) -> Path:
    with ShardWriter(out, samples_per_shard=per_shard, modalities=["image"]) as w:
        for s in samples:
            w.write(s)
    return out


def config(urls: Path) -> StreamConfig:
    return StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)


def test_tiles_end_to_end(tmp_path: Path) -> None:
    samples = tile_samples(6)
    del samples[5]["json"]["label"]  # no label -> -1
    shards = write(tmp_path / "s", samples, per_shard=3)
    dm = ImageDataModule(
        train=config(shards),
        val=config(shards),
        batch_size=4,
        num_workers=0,
        preprocess=Preprocess(image=TILE_PRE),
    )
    dm.setup("fit")
    got = list(dm.val_dataloader())
    assert all(isinstance(b, ImageBatch) for b in got) and [len(b) for b in got] == [4, 2]
    assert [k for b in got for k in b.keys] == [f"t{i:03d}" for i in range(6)]
    assert [int(x) for b in got for x in b.labels] == [0, 1, 2, 0, 1, -1]
    assert sum(b.skipped for b in got) == 0
    b = got[0]
    assert b.images.dtype == torch.float32 and b.images.shape == (4, 4, 8, 8)
    out = dm.on_after_batch_transfer(b, 0)
    for row, key in zip(out.images, out.keys, strict=True):
        torch.testing.assert_close(row, expected_tile(int(key[1:])), rtol=1e-5, atol=1e-4)

    (train,) = list(dm.train_dataloader())  # 5 of 6 make one full batch
    assert train.images.shape == (4, 4, 8, 8) and train.labels.dtype == torch.long
    raw = torch.stack(
        [torch.from_numpy(raw_tile(int(k[1:])).astype(np.float32)) for k in train.keys]
    )
    # random crops and flips move pixels, but values stay within each band's raw range
    picked = raw[:, [S2_L1C.index(b) for b in BANDS]]
    lo, hi = picked.amin(dim=(2, 3)), picked.amax(dim=(2, 3))
    assert (train.images.amin(dim=(2, 3)) >= lo - 1e-2).all()
    assert (train.images.amax(dim=(2, 3)) <= hi + 1e-2).all()


def test_rgb_images_end_to_end(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"r{i:03d}", "jpg": jpeg_bytes(i, size=20), "json": {"label": i}}
        for i in range(5)
    ]
    shards = write(tmp_path / "s", samples)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    pre = Preprocess(image=ImagePreprocess(size=16, mean=mean, std=std))
    dm = ImageDataModule(val=config(shards), batch_size=8, num_workers=0, preprocess=pre)
    dm.setup("validate")
    (b,) = list(dm.val_dataloader())
    assert b.images.dtype == torch.uint8 and b.images.shape == (5, 3, 16, 16)
    assert b.labels.tolist() == [0, 1, 2, 3, 4]
    raw = b.images.clone()
    out = dm.normalize(b).images
    x = int(raw[2, 1, 3, 4])
    assert float(out[2, 1, 3, 4]) == pytest.approx((x / 255 - mean[1]) / std[1], abs=1e-5)


def test_image_datamodule_needs_image_preprocessing(tmp_path: Path) -> None:
    dm = ImageDataModule(val=config(tmp_path), num_workers=0, preprocess=Preprocess(image=None))
    with pytest.raises(ValueError, match="no image preprocessing"):
        dm.setup("validate")
    with pytest.raises(ValueError, match="no image preprocessing"):
        ImageDataModule(num_workers=0).stream(config(tmp_path), False, "--data")


def test_image_text_with_tiles_and_captions(tmp_path: Path) -> None:
    shards = write(tmp_path / "s", tile_samples(4))
    tok = CharTokenizer()
    dm = ImageTextDataModule(
        val=config(shards),
        batch_size=4,
        num_workers=0,
        text_key="json:caption",
        preprocess=Preprocess(image=TILE_PRE, tokenizer=tok),
    )
    assert dm.image_key is None  # by mode: npy;tif;tiff for a multispectral model
    dm.setup("validate")
    (b,) = list(dm.val_dataloader())
    assert isinstance(b, ImageTextBatch) and b.skipped == 0
    assert b.images.dtype == torch.float32 and b.images.shape == (4, 4, 8, 8)
    assert b.keys == [f"t{i:03d}" for i in range(4)]
    assert torch.equal(b.text_tokens, tok([f"fields and a river {i}" for i in range(4)]))
    assert b.text_to_image.tolist() == [0, 1, 2, 3]
    assert b.labels.tolist() == [0, 1, 2, 0]
    out = dm.normalize(b)
    for row, key in zip(out.images, out.keys, strict=True):
        torch.testing.assert_close(row, expected_tile(int(key[1:])), rtol=1e-5, atol=1e-4)
