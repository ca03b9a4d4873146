"""ImageTextDataModule on tiny shards made here: counted skips of bad samples, uint8 batches and
their normalisation, several captions per image in validation, caption/label fields, start-up
errors and on-demand synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmpt.batch import ImageTextBatch
from mmpt.datamodules.image_text import ImageTextDataModule, SyntheticData
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.streams import StreamConfig
from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer
from mmpt.preprocess import ImagePreprocess, Preprocess
from mmpt.shards import ShardWriter
from tests.helpers import jpeg_bytes

MEAN = (0.2, 0.4, 0.6)
STD = (0.5, 0.25, 0.125)
PRE = Preprocess(image=ImagePreprocess(size=16, mean=MEAN, std=STD), tokenizer=OpenCLIPTokenizer(8))


def good(i: int) -> dict[str, Any]:
    return {
        "__key__": f"good{i:03d}",
        "jpg": jpeg_bytes(i),
        "txt": f"caption {i}",
        "json": {"captions": [f"caption {i}", f"another {i}"], "label": i % 3},
    }


BAD = [
    {  # corrupt image bytes
        "__key__": "bad_jpeg",
        "jpg": b"\xff\xd8 this is not a jpeg",
        "txt": "a caption",
        "json": {"captions": ["a caption", "more"], "label": 0},
    },
    {"__key__": "no_caption", "jpg": jpeg_bytes(100), "json": {"label": 1}},  # no txt/caption
    {  # only blank captions
        "__key__": "empty_caption",
        "jpg": jpeg_bytes(101),
        "txt": "  ",
        "json": {"captions": ["", " "], "label": 2},
    },
]


def write_samples(out: Path, samples: list[dict[str, Any]], per_shard: int = 100) -> Path:
    with ShardWriter(out, samples_per_shard=per_shard, modalities=["image", "text"]) as w:
        for s in samples:
            w.write(s)
    return out


def datamodule(urls: Path | str, batch_size: int = 4, **kw: Any) -> ImageTextDataModule:
    cfg = StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)
    kw.setdefault("preprocess", PRE)
    return ImageTextDataModule(train=cfg, val=cfg, batch_size=batch_size, num_workers=0, **kw)


def batches(dm: ImageTextDataModule, train: bool) -> list[ImageTextBatch]:
    dm.setup("fit")
    return list(dm.train_dataloader() if train else dm.val_dataloader())


def tokens_of(texts: list[str]) -> torch.Tensor:
    return OpenCLIPTokenizer(8)(texts)


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_bad_samples_are_skipped_and_counted(tmp_path: Path, train: bool) -> None:
    samples = [good(i) for i in range(3)] + BAD[:1] + [good(i) for i in range(3, 6)]
    samples += BAD[1:] + [good(i) for i in range(6, 8)]
    shards = write_samples(tmp_path / "s", samples, per_shard=6)
    got = batches(datamodule(shards, val_text_key="json:captions"), train)
    assert sum(b.skipped for b in got) == 3
    assert [k for b in got for k in b.keys] == [f"good{i:03d}" for i in range(8)]
    for b in got:
        assert b.images.dtype == torch.uint8 and b.images.shape == (4, 3, 16, 16)
        assert b.text_tokens.dtype == torch.long and b.text_tokens.shape[1] == 8


def test_skips_after_the_last_batch_are_counted_in_validation(tmp_path: Path) -> None:
    shards = write_samples(tmp_path / "s", [good(i) for i in range(8)] + BAD)
    got = batches(datamodule(shards, val_text_key="json:captions"), train=False)
    assert [k for b in got for k in b.keys] == [f"good{i:03d}" for i in range(8)]
    assert sum(b.skipped for b in got) == 3


def test_training_tops_up_after_a_bad_tail_and_counts_it(tmp_path: Path) -> None:
    """12 indexed samples -> exactly 3 batches of 4; the 3 bad ones are read, counted, and
    the worker tops up from the start of its shards so the step count stays exact."""
    shards = write_samples(tmp_path / "s", [good(i) for i in range(9)] + BAD)
    got = batches(datamodule(shards), train=True)
    keys = [k for b in got for k in b.keys]
    assert len(got) == 3 and len(keys) == 12
    assert keys[:9] == [f"good{i:03d}" for i in range(9)]
    assert keys[9:] == [f"good{i:03d}" for i in range(3)]  # the top-up, from the start
    assert sum(b.skipped for b in got) == 3


def test_train_length_is_exact_despite_skips(tmp_path: Path) -> None:
    samples = [good(i) for i in range(3)] + BAD + [good(i) for i in range(3, 10)]
    shards = write_samples(tmp_path / "s", samples)
    dm = datamodule(shards)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(list(loader)) == len(loader)


def test_train_batches_one_caption_per_image(tmp_path: Path) -> None:
    shards = write_samples(tmp_path / "s", [good(i) for i in range(8)])
    got = batches(datamodule(shards, text_key="json:captions"), train=True)
    assert len(got) == 2
    for b in got:
        assert torch.equal(b.text_to_image, torch.arange(4))
        for key, row in zip(b.keys, b.text_tokens, strict=True):
            i = int(key[4:])
            options = tokens_of([f"caption {i}", f"another {i}"])
            assert any(torch.equal(row, opt) for opt in options)


def test_val_keeps_every_caption(tmp_path: Path) -> None:
    shards = write_samples(tmp_path / "s", [good(i) for i in range(6)])
    got = batches(datamodule(shards, val_text_key="json:captions"), train=False)
    assert [len(b) for b in got] == [4, 2]  # validation keeps the last short batch
    b = got[0]
    assert b.num_texts == 8
    assert b.text_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = [c for i in range(4) for c in (f"caption {i}", f"another {i}")]
    assert torch.equal(b.text_tokens, tokens_of(expected))
    assert got[1].text_to_image.tolist() == [0, 0, 1, 1]  # per batch, not global


def test_normalize_turns_uint8_into_model_inputs(tmp_path: Path) -> None:
    shards = write_samples(tmp_path / "s", [good(i) for i in range(4)])
    dm = datamodule(shards)
    (b,) = batches(dm, train=False)
    raw = b.images.clone()
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 16, 16)
    out = dm.normalize(b)
    assert out.images.dtype == torch.float32
    x = int(raw[1, 2, 5, 7])
    assert float(out.images[1, 2, 5, 7]) == pytest.approx((x / 255 - MEAN[2]) / STD[2], abs=1e-5)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out.images, (raw.float() / 255 - mean) / std)
    assert dm.on_after_batch_transfer(out, 0).images is out.images  # float passes through


def test_text_key_reads_a_json_caption(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"{i:03d}", "jpg": jpeg_bytes(i), "json": {"caption": f"json caption {i}"}}
        for i in range(4)
    ]
    shards = write_samples(tmp_path / "s", samples)
    (b,) = batches(datamodule(shards, text_key="json:caption", label_key=None), train=True)
    assert b.skipped == 0
    by_key = dict(zip(b.keys, b.text_tokens, strict=True))
    for i in range(4):
        assert torch.equal(by_key[f"{i:03d}"], tokens_of([f"json caption {i}"])[0])


def test_label_key_reads_labels(tmp_path: Path) -> None:
    no_label = {"__key__": "good999", "jpg": jpeg_bytes(999), "txt": "x", "json": {"other": 1}}
    shards = write_samples(tmp_path / "s", [good(i) for i in range(7)] + [no_label])
    got = batches(datamodule(shards), train=False)
    labels = {k: int(lab) for b in got for k, lab in zip(b.keys, b.labels, strict=True)}
    assert labels == {**{f"good{i:03d}": i % 3 for i in range(7)}, "good999": -1}
    got = batches(datamodule(shards, label_key=None), train=False)
    assert all((b.labels == -1).all() for b in got)


def test_missing_train_urls_fail_at_setup(tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match=r"data\.train\.urls") as exc:
        dm.setup("fit")
    assert "no_such_folder" in str(exc.value)


def test_model_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    shards = write_samples(tmp_path / "s", [good(i) for i in range(4)])
    dm = datamodule(shards, preprocess=Preprocess(image=ImagePreprocess(size=16)))
    with pytest.raises(ValueError, match="tokenizer"):
        dm.setup("fit")


def test_synthetic_data_is_generated_when_missing(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    synth = SyntheticData(train_samples=64, image_size=32, out=str(out))
    dm = datamodule(out / "train", synthetic=synth, batch_size=16)
    dm.val_cfg = StreamConfig(urls=str(out / "val"), shuffle_buffer=0)
    assert not (out / "train").exists()
    dm.prepare_data()
    index = out / "train" / "index.json"
    assert index.is_file() and (out / "val" / "index.json").is_file()
    stamp = index.stat().st_mtime_ns
    dm.prepare_data()  # present now: not generated again
    assert index.stat().st_mtime_ns == stamp

    dm.setup("fit")
    assert dm.train_stream.counts is not None and sum(dm.train_stream.counts) == 64
    assert len(dm.val_meta["zeroshot"]["classnames"]) == 24
    b = next(iter(make_loader(dm.train_stream, 0)))
    assert b.images.shape == (16, 3, 16, 16) and b.skipped == 0
