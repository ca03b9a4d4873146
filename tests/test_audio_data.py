"""Audio decoding (flac/wav/mp3, int and float, planar and packed), resampling, crops, padding,
per-clip normalisation vs the formula, length buckets, and AudioTextDataModule on tiny shards
with corrupt, empty and too-short files."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from mmpt.batch import AudioTextBatch
from mmpt.datamodules.audio import (
    AudioReader,
    EmptyAudio,
    LengthBucketBatcher,
    Resampler,
    decode_audio,
    normalize_audio,
    pad_audio,
)
from mmpt.datamodules.audio_text import AudioTextDataModule
from mmpt.datamodules.decode import MissingField
from mmpt.datamodules.stages import batched
from mmpt.datamodules.streams import StreamConfig
from mmpt.preprocess import AudioPreprocess, Preprocess
from mmpt.shards import ShardWriter

RATE = 16000


class CharTokenizer:
    """Characters -> ids (code point mod 97), padded/cut to 16."""

    context_length, vocab_size = 16, 97

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % self.vocab_size for c in t[: self.context_length]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def sine(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """(N, C) float32 sine at half scale (channel c scaled by 1 / (c + 1))."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def encode(array: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, array, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def mp3_bytes(array: np.ndarray, rate: int) -> bytes:
    av = pytest.importorskip("av")
    try:
        av.codec.Codec("libmp3lame", "w")
    except Exception:  # noqa: BLE001
        pytest.skip("no mp3 encoder in this PyAV build")
    layout = "stereo" if array.shape[1] == 2 else "mono"
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array.T), "fltp", layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave.double()).abs()
    return float(spectrum.argmax()) * rate / wave.shape[-1]


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext"),
    [("FLAC", "PCM_16", "flac"), ("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav")],
)
def test_decode_soundfile_formats(fmt: str, subtype: str, ext: str) -> None:
    array = sine(0.25, 44100, channels=2)
    wave, rate = decode_audio(encode(array, 44100, fmt, subtype), ext)
    assert rate == 44100 and wave.dtype == torch.float32 and wave.shape == (2, array.shape[0])
    torch.testing.assert_close(wave, torch.from_numpy(array.T), atol=1e-4, rtol=0)
    assert abs(peak_hz(wave[0], rate) - 440) < 5


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_32", "FLOAT", "PCM_U8"])
def test_pyav_packed_formats_match_soundfile(subtype: str) -> None:
    """PyAV decodes wav as packed s16/s32/flt/u8: ext m4a routes these bytes to PyAV."""
    data = encode(sine(0.2, 8000, channels=2), 8000, "WAV", subtype)
    by_av, rate = decode_audio(data, "m4a")
    by_sf, _ = decode_audio(data, "wav")
    assert rate == 8000 and by_av.shape == by_sf.shape == (2, 1600)
    torch.testing.assert_close(by_av, by_sf, atol=1e-6, rtol=0)


def test_mp3_planar_stereo() -> None:
    array = sine(0.5, 44100, channels=2)
    wave, rate = decode_audio(mp3_bytes(array, 44100), "mp3")
    assert rate == 44100 and wave.shape[0] == 2 and wave.dtype == torch.float32
    assert abs(wave.shape[1] - array.shape[0]) < 3000  # encoder delay and padding
    assert abs(peak_hz(wave[0], rate) - 440) < 5
    ratio = wave[1].abs().max() / wave[0].abs().max()  # channels kept apart
    assert 0.4 < float(ratio) < 0.6
    pre = AudioPreprocess(sample_rate=RATE)
    mono = AudioReader(pre, train=False).read(mp3_bytes(array, 44100), "mp3")
    assert abs(peak_hz(mono, RATE) - 440) < 5


def test_bad_and_empty_files_raise() -> None:
    with pytest.raises(ValueError, match="empty audio"):
        decode_audio(encode(np.zeros((0, 1), np.float32), RATE, "WAV"), "wav")
    with pytest.raises(Exception):  # noqa: B017 - any decoder error is a counted skip
        decode_audio(b"not audio at all" * 10, "flac")


def test_no_fallback_raises_soundfile_error() -> None:
    """``fallback=False``: a broken wav/flac is soundfile's error, never PyAV's guess."""
    with pytest.raises(sf.LibsndfileError):
        decode_audio(b"RIFF not really a wave file", "wav", fallback=False)
    with pytest.raises(EmptyAudio, match="empty audio"):  # still a ValueError
        decode_audio(encode(np.zeros((0, 1), np.float32), RATE, "WAV"), "wav", fallback=False)


@pytest.mark.parametrize("orig", [8000, 44100])
def test_resample_length_and_frequency(orig: int) -> None:
    array = sine(0.5, orig, channels=2)
    reader = AudioReader(AudioPreprocess(sample_rate=RATE), train=False)
    mono = reader.read(encode(array, orig, "FLAC"), "flac")
    assert mono.shape == (RATE // 2,) and mono.dtype == torch.float32
    assert abs(peak_hz(mono, RATE) - 440) < 3
    # downmix = mean over channels: 0.5 * (1 + 1/2) = 0.75 of the left channel's amplitude
    assert float(mono.abs().max()) == pytest.approx(0.5 * 0.75, abs=0.02)


def test_resampler_window_equals_full_and_pickles() -> None:
    wave = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, 44100).astype(np.float32))
    res = Resampler()
    full = res(wave, 44100, 16000)
    assert full.shape == (16000,) and res(wave, RATE, RATE) is wave
    for start, length in [(0, 3000), (123, 4000), (9000, 7000)]:
        win = res.window(wave, 44100, 16000, start, length)
        torch.testing.assert_close(win, full[start : start + length], atol=1e-5, rtol=0)
    clone = pickle.loads(pickle.dumps(res))
    assert clone._cache == {} and torch.equal(clone(wave, 44100, 16000), full)


def test_reader_crops_and_min_length() -> None:
    pre = AudioPreprocess(sample_rate=RATE, max_seconds=0.1, min_seconds=0.05)
    noise = np.random.default_rng(1).uniform(-0.9, 0.9, (RATE, 1)).astype(np.float32)
    sample = {"__key__": "k", "flac": encode(noise, RATE, "FLAC")}
    full = torch.from_numpy(sf.read(io.BytesIO(sample["flac"]), dtype="float32")[0])
    assert torch.equal(AudioReader(pre, train=False)(sample), full[:1600])
    random.seed(0)
    reader = AudioReader(pre, train=True)
    crops = [reader(sample) for _ in range(4)]
    starts = set()
    for crop in crops:
        assert crop.shape == (1600,)
        start = int(torch.nonzero(full == crop[0])[0])
        assert torch.equal(crop, full[start : start + 1600])
        starts.add(start)
    assert len(starts) > 1
    short = {"__key__": "s", "wav": encode(noise[:400], RATE, "WAV")}  # 400 < 800 samples
    with pytest.raises(ValueError, match="too short: 400 samples.*min 800"):
        reader(short)
    with pytest.raises(MissingField):
        reader({"__key__": "none", "txt": b"x"})
    audio, lengths = pad_audio([crops[0], crops[1][:700], full[:10]])
    assert audio.shape == (3, 1600) and lengths.tolist() == [1600, 700, 10]
    assert (audio[1, 700:] == 0).all() and torch.equal(audio[2, :10], full[:10])
    empty, no_lengths = pad_audio([])
    assert empty.shape == (0, 0) and no_lengths.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_normalize_audio_matches_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([50, 7, 1, 0, 64])
    audio = torch.randn(5, 64, generator=gen) * 3 + 2
    audio[torch.arange(64)[None] >= lengths[:, None]] = 0
    out = normalize_audio(audio.to(dtype), lengths)
    assert out.dtype == dtype and out.shape == audio.shape
    for b, n in enumerate(lengths.tolist()):
        x = audio[b, :n].to(dtype).double()
        ref = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7) if n else x
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[b, :n].double(), ref, atol=tol * 4, rtol=tol)
        assert (out[b, n:] == 0).all()


def padding_fraction(batches: list[list[tuple[int, int]]]) -> float:
    padded = sum(max(n for _, n in b) * len(b) for b in batches)
    return 1 - sum(n for b in batches for _, n in b) / padded


def item_length(item: tuple[int, int]) -> int:
    return item[1]


@pytest.mark.parametrize("partial", [True, False])
def test_length_buckets_cut_padding(partial: bool) -> None:
    rng = random.Random(0)
    items = [(i, rng.randrange(400, 160000)) for i in range(1003)]
    batcher = pickle.loads(pickle.dumps(LengthBucketBatcher(8, item_length, 16, partial)))
    got = list(batcher(iter(items)))
    plain = list(batched(iter(items), 8, partial))
    assert len(got) == len(plain) == (126 if partial else 125)
    assert [len(b) for b in got].count(8) == 125
    ids = [i for b in got for i, _ in b]
    assert len(ids) == len(set(ids)) == (1003 if partial else 1000)
    assert all(all(x[1] <= y[1] for x, y in zip(b, b[1:], strict=False)) for b in got)
    assert padding_fraction(got) < 0.5 * padding_fraction(plain)
    assert got == list(batcher(iter(items)))  # reproducible


def item_id(item: tuple[int, int]) -> int:
    return item[0]


def test_length_buckets_never_batch_a_repeat() -> None:
    """A stream shorter than the buffer that comes round again (training top-up passes)."""
    rng = random.Random(1)
    lengths = [rng.randrange(100, 1000) for _ in range(7)]
    stream = ((i % 7, lengths[i % 7]) for i in range(70))
    got = list(LengthBucketBatcher(3, item_length, 16, partial=False, key=item_id)(stream))
    assert all(len(b) == 3 and len({i for i, _ in b}) == 3 for b in got)
    assert len(got) == 70 // 3  # every 3 items still make one batch


def clip_samples() -> list[dict[str, Any]]:
    """Good clips (16 kHz mono, 8 kHz wav, 44.1 kHz stereo, a two-caption clip, a transcript
    without caption) and bad ones (corrupt flac, empty wav, 10 ms clip)."""

    def js(i: int, **extra: Any) -> dict[str, Any]:
        return {"caption": f"sound {i}", "language": "en", "label": i, **extra}

    return [
        {"__key__": "a0", "flac": encode(sine(0.3, RATE), RATE, "FLAC"), "json": js(0)},
        {"__key__": "a1", "wav": encode(sine(0.25, 8000), 8000, "WAV"), "json": js(1)},
        {"__key__": "a2", "flac": b"fLaC garbage" * 20, "json": js(2)},
        {"__key__": "a3", "flac": encode(sine(0.3, 44100, channels=2), 44100, "FLAC")}
        | {"json": js(3, caption=["a dog barks", "barking"])},
        {"__key__": "a4", "wav": encode(np.zeros((0, 1), np.float32), RATE, "WAV"), "json": js(4)},
        {"__key__": "a5", "flac": encode(sine(0.01, RATE), RATE, "FLAC"), "json": js(5)},
        {"__key__": "a6", "flac": encode(sine(0.5, RATE), RATE, "FLAC")}
        | {"json": {"transcript": "hello there", "label": 6}},
        {"__key__": "a7", "flac": encode(sine(0.2, RATE, 880.0), RATE, "FLAC"), "json": js(7)},
    ]


def write_clips(out: Path, per_shard: int = 4) -> Path:
    with ShardWriter(out, samples_per_shard=per_shard, modalities=["audio", "text"]) as w:
        for s in clip_samples():
            w.write(s)
    return out


def config(urls: Path) -> StreamConfig:
    return StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)


PRE = AudioPreprocess(sample_rate=RATE, max_seconds=0.4, min_seconds=0.025)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_val_end_to_end(tmp_path: Path, num_workers: int) -> None:
    shards = write_clips(tmp_path / "s")
    tok = CharTokenizer()
    dm = AudioTextDataModule(
        val=config(shards),
        batch_size=8,
        num_workers=num_workers,
        preprocess=Preprocess(image=None, tokenizer=tok, audio=PRE),
    )
    dm.setup("validate")
    got = list(dm.val_dataloader())
    assert all(isinstance(b, AudioTextBatch) for b in got)
    assert sum(b.skipped for b in got) == 3  # corrupt, empty, too short
    rows = {k: (b, i) for b in got for i, k in enumerate(b.keys)}
    assert sorted(rows) == ["a0", "a1", "a3", "a6", "a7"]
    want_len = {"a0": 4800, "a1": 4000, "a3": 4800, "a6": 6400, "a7": 3200}  # a6: cropped
    want_caps = {"a0": ["sound 0"], "a1": ["sound 1"], "a3": ["a dog barks", "barking"]}
    want_caps |= {"a6": ["hello there"], "a7": ["sound 7"]}
    for key, (b, i) in rows.items():
        assert int(b.audio_lengths[i]) == want_len[key] and int(b.labels[i]) == int(key[1])
        assert (b.audio[i, want_len[key] :] == 0).all()
        owned = b.text_tokens[b.text_to_audio == i]
        assert torch.equal(owned, tok(want_caps[key]))
        freq = 880 if key == "a7" else 440  # 8 kHz and 44.1 kHz files resampled to 16 kHz
        assert abs(peak_hz(b.audio[i, : want_len[key]], RATE) - freq) < 6
    if num_workers == 0:
        (b,) = got
        assert b.audio.shape == (5, 6400) and b.text_tokens.shape == (6, 16)
        assert b.text_to_audio.tolist() == [0, 1, 2, 2, 3, 4]
        out = dm.on_after_batch_transfer(b, 0)
        for i, n in enumerate(out.audio_lengths.tolist()):
            assert abs(float(out.audio[i, :n].mean())) < 1e-4
            assert float(out.audio[i, :n].std(unbiased=False)) == pytest.approx(1, abs=1e-3)
            assert (out.audio[i, n:] == 0).all()


def test_datamodule_train_buckets_and_no_tokenizer(tmp_path: Path) -> None:
    shards = write_clips(tmp_path / "s")
    dm = AudioTextDataModule(
        train=config(shards),
        batch_size=2,
        num_workers=0,
        bucket_batches=2,
        preprocess=Preprocess(image=None, tokenizer=None, audio=PRE),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    got = list(loader)
    assert len(got) == len(loader) == 4  # 8 samples // 2; skipped ones topped up
    assert sum(b.skipped for b in got) >= 3
    for b in got:
        assert b.audio.shape[0] == 2 and b.audio.shape[1] <= PRE.max_samples
        assert b.audio.shape[1] == int(b.audio_lengths.max())
        assert b.text_tokens.shape == (0, 0) and b.text_to_audio.shape == (0,)
        assert len(set(b.keys)) == 2


def test_datamodule_train_captions_and_errors(tmp_path: Path) -> None:
    shards = write_clips(tmp_path / "s")
    pre = Preprocess(image=None, tokenizer=CharTokenizer(), audio=PRE)
    dm = AudioTextDataModule(train=config(shards), batch_size=5, num_workers=0, preprocess=pre)
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert len(b) == 5 and b.text_to_audio.tolist() == [0, 1, 2, 3, 4]  # one caption each
    # 5 good clips < one bucket buffer (80): the stream comes round, yet no clip repeats
    assert sorted(b.keys) == ["a0", "a1", "a3", "a6", "a7"]
    assert b.text_tokens.shape == (5, 16) and b.skipped >= 3
    no_audio = AudioTextDataModule(val=config(shards), num_workers=0, preprocess=Preprocess())
    with pytest.raises(ValueError, match="no audio preprocessing"):
        no_audio.setup("validate")
