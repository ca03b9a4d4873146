"""Audio work per epoch, counted: clips decoded == clips yielded (no read past the epoch's
quota to fill a length bucket), and the cheap downmix equals ``mean(dim=0)`` bit for bit."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmpt.datamodules import audio
from mmpt.datamodules.audio import LengthBucketBatcher, downmix
from mmpt.datamodules.audio_text import AudioTextDataModule
from mmpt.datamodules.streams import StreamConfig
from mmpt.preprocess import AudioPreprocess, Preprocess
from mmpt.shards import ShardWriter

RATE = 16000


def write_shards(out: Path, clips: int) -> Path:
    """``clips`` flac clips of distinct lengths (0.1-0.3 s at 16 kHz) in shards of 4."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, samples_per_shard=4, modalities=["audio"]) as w:
        for i in range(clips):
            wave = rng.uniform(-0.5, 0.5, 1600 + 211 * i).astype(np.float32)
            buf = io.BytesIO()
            sf.write(buf, wave, RATE, format="FLAC")
            w.write({"__key__": f"c{i:02d}", "flac": buf.getvalue(), "json": {"label": i}})
    return out


@pytest.mark.parametrize(("clips", "batch_size", "bucket_batches"), [(6, 2, 2), (11, 2, 4)])
def test_train_epoch_decodes_only_what_it_yields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clips: int, batch_size: int,
    bucket_batches: int,
) -> None:  # fmt: skip
    """6 clips, buffers of 4: the old batcher decoded 8 (2 of the next pass) to fill its last
    buffer; 11 clips, buffers of 8: 16 decoded for 10 yielded. Now decoded == yielded, and the
    epoch yields each clip of its pass once."""
    decoded: list[int] = []
    read = audio.AudioReader.read

    def counting_read(self: audio.AudioReader, data: bytes, ext: str) -> torch.Tensor:
        decoded.append(1)
        return read(self, data, ext)

    monkeypatch.setattr(audio.AudioReader, "read", counting_read)
    dm = AudioTextDataModule(
        train=StreamConfig(urls=str(write_shards(tmp_path / "s", clips)), shuffle_buffer=4),
        batch_size=batch_size,
        num_workers=0,
        bucket_batches=bucket_batches,
        preprocess=Preprocess(image=None, audio=AudioPreprocess(sample_rate=RATE)),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        decoded.clear()
        dm.train_stream.set_epoch(epoch)
        batches = list(loader)
        keys = [k for b in batches for k in b.keys]
        assert len(batches) == len(loader) == clips // batch_size
        assert len(decoded) == len(keys) == clips // batch_size * batch_size
        assert len(set(keys)) == len(keys)  # one pass: no clip twice, none of the next pass
        assert all(len(b.keys) == batch_size for b in batches)


def test_batcher_cut_short_keeps_copies_apart() -> None:
    """Input ending with held copies (a topped-up pass cut at the quota): every batch still
    holds distinct samples, and every ``batch_size`` items still make one batch."""
    items = [(i % 5, 100 + 37 * (i % 5)) for i in range(12)]  # 5 samples, then copies
    got = list(LengthBucketBatcher(3, lambda x: x[1], 4, partial=False, key=lambda x: x[0])(items))
    assert len(got) == 12 // 3
    assert all(len({i for i, _ in b}) == 3 for b in got)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_downmix_equals_mean_bit_for_bit(channels: int, subtype: str) -> None:
    """On decode_audio's output, -0.0 and denormals included (the mean sums from +0)."""
    rng = np.random.default_rng(channels)
    interleaved = rng.uniform(-1, 1, (4410, channels)).astype(np.float32)  # sf.read's layout
    signed_zeros = np.array([[-0.0, 0.0, -0.0], [-0.0, -0.0, 0.0], [1e-45, -1e-45, 3e-39]])
    interleaved[:3] = signed_zeros[:, :channels]
    buf = io.BytesIO()
    sf.write(buf, interleaved, RATE, format="WAV", subtype=subtype)
    wave, _ = audio.decode_audio(buf.getvalue(), "wav")
    assert not bool((wave == 0).logical_and(wave.signbit()).any())  # no -0.0 comes out
    for w in (wave, torch.from_numpy(wave.numpy().T.copy()).T):  # (C, N) and interleaved
        assert torch.equal(bits(downmix(w)), bits(w.mean(dim=0)))


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("WAV", "PCM_U8"), ("WAV", "PCM_32")]
    + [("WAV", "FLOAT"), ("WAV", "DOUBLE")],
)
def test_decode_clamps_only_what_can_overshoot(fmt: str, subtype: str) -> None:
    """Integer PCM decodes into [-1, 1] (its clamp is skipped); float files are clamped."""
    full_scale = np.array([[-1.0, 1.0], [1.5, -1.5], [0.25, -0.999]], dtype=np.float64)
    buf = io.BytesIO()
    sf.write(buf, np.tile(full_scale, (100, 1)), RATE, format=fmt, subtype=subtype)
    wave, rate = audio.decode_audio(buf.getvalue(), fmt.lower())
    raw, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    assert rate == RATE and wave.shape == (2, 300)
    assert torch.equal(wave, torch.from_numpy(raw.T.copy()).clamp(-1.0, 1.0))
    assert float(wave.abs().max()) == 1.0
    if subtype in ("FLOAT", "DOUBLE"):
        assert float(np.abs(raw).max()) == 1.5  # the clamp did the work
