"""Corrupt media of each modality: exactly one counted skip per bad sample, nothing else lost.

For images (jpg), video (mp4), audio (wav, flac) and multispectral tiles (tif), a set of good
samples with two bad ones (garbage bytes, a file cut short or contradicting its json) goes
through its datamodule's evaluation loader: the skip count is exactly the bad samples, each
reason's example names the sample and its shard, and every good sample comes once.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import tifffile

from mmpt.datamodules.audio_text import AudioTextDataModule
from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.images import ImageDataModule
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.video_text import VideoTextDataModule
from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer
from mmpt.preprocess import AudioPreprocess, ImagePreprocess, Preprocess
from mmpt.shards import ShardWriter, load_index
from tests.helpers import jpeg_bytes

RGB = ImagePreprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TOKENIZER = OpenCLIPTokenizer(8)


def write(
    out: Path, samples: list[dict[str, Any]], modality: str, meta: dict | None = None
) -> Path:
    with ShardWriter(out, samples_per_shard=4, modalities=[modality], meta=meta) as w:
        for s in samples:
            w.write(s)
    return out


def config(urls: Path) -> StreamConfig:
    return StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)


def check_epoch(dm: Any, samples: list[dict[str, Any]], bad: set[str]) -> None:
    """One evaluation pass: ``len(bad)`` skips, named; every other sample exactly once."""
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(s["__key__"] for s in samples if s["__key__"] not in bad)
    assert sum(b.skipped for b in batches) == len(bad)
    reasons = {r: v for b in batches for r, v in b.skip_reasons.items()}
    assert sum(n for n, _ in reasons.values()) == len(bad)
    for _, example in reasons.values():  # each names its sample and shard
        assert any(f"sample {k!r} in " in example for k in bad), example
        assert ".tar)" in example, example
    assert not [f for b in batches for f in b.shard_faults]  # no shard is blamed


def test_corrupt_jpg(tmp_path: Path) -> None:
    samples = [{"__key__": f"i{i}", "jpg": jpeg_bytes(i), "txt": f"cap {i}"} for i in range(7)]
    samples[1]["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all" * 4
    samples[4]["jpg"] = samples[4]["jpg"][:40]  # a jpeg cut off in its header
    shards = write(tmp_path / "s", samples, "image")
    dm = ImageTextDataModule(
        val=config(shards), batch_size=3, num_workers=0,
        preprocess=Preprocess(image=RGB, tokenizer=TOKENIZER),
    )  # fmt: skip
    check_epoch(dm, samples, {"i1", "i4"})


def sine(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]


def audio_bytes(fmt: str, seconds: float = 0.2) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, sine(seconds), 16000, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_corrupt_audio(tmp_path: Path, ext: str) -> None:
    fmt = ext.upper()
    samples = [{"__key__": f"a{i}", ext: audio_bytes(fmt), "txt": f"sound {i}"} for i in range(6)]
    samples[2][ext] = b"RIFF\x00\x00\x00\x00WAVE garbage" if ext == "wav" else b"fLaC junk"
    samples[5][ext] = samples[5][ext][:30]  # cut inside the header
    shards = write(tmp_path / "s", samples, "audio")
    pre = AudioPreprocess(sample_rate=16000, max_seconds=0.4, min_seconds=0.025)
    dm = AudioTextDataModule(
        val=config(shards), batch_size=4, num_workers=0,
        preprocess=Preprocess(image=None, tokenizer=TOKENIZER, audio=pre),
    )  # fmt: skip
    check_epoch(dm, samples, {"a2", "a5"})


def tif_bytes(bands: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 10000, (bands, 8, 8)).astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack", planarconfig="separate")
    return buf.getvalue()


def test_corrupt_and_wrong_band_count_tif(tmp_path: Path) -> None:
    """A tif that is not one, and one with 3 channels while its json names 4 bands."""
    bands = ["B4", "B3", "B2", "B8"]
    samples = [
        {"__key__": f"t{i}", "tif": tif_bytes(4, i), "json": {"bands": bands, "label": i % 2}}
        for i in range(6)
    ]
    samples[0]["tif"] = b"II*\x00 broken tiff"
    samples[3]["tif"] = tif_bytes(3, 3)
    shards = write(tmp_path / "s", samples, "image")
    pre = ImagePreprocess(
        size=8, mean=(0.1,) * 4, std=(0.05,) * 4, channels=4, bands=tuple(bands), scale=1e-4
    )
    dm = ImageDataModule(
        val=config(shards), batch_size=4, num_workers=0, preprocess=Preprocess(image=pre)
    )
    check_epoch(dm, samples, {"t0", "t3"})


def test_corrupt_mp4(tmp_path: Path) -> None:
    from mmpt.synth import make_synthetic

    make_synthetic(
        "video-text", tmp_path / "synth", train_samples=6, image_size=32, num_frames=4, fps=4,
        val_samples=1, mcq_samples=1, samples_per_shard=6,
    )  # fmt: skip
    import webdataset as wds

    src = tmp_path / "synth" / "train"
    urls = [str(src / s.name) for s in load_index(src).shards]
    samples = [
        {"__key__": f"v{i}", "mp4": s["mp4"], "txt": "a clip", "json": s["json"]}
        for i, s in enumerate(wds.WebDataset(urls, shardshuffle=False))
    ]
    samples[1]["mp4"] = b"\x00\x00\x00\x18ftypmp42 not really a video"
    samples[4]["mp4"] = samples[4]["mp4"][: len(samples[4]["mp4"]) // 3]
    shards = write(tmp_path / "s", samples, "video", meta=load_index(src).meta)
    pre = Preprocess(image=RGB, tokenizer=TOKENIZER)
    dm = VideoTextDataModule(
        val=config(shards), batch_size=2, num_workers=0, backend="pyav", preprocess=pre,
        scene_negatives=False,
    )  # fmt: skip
    check_epoch(dm, samples, {"v1", "v4"})
