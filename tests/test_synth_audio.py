"""Synthetic audio-text shards: determinism, counts, captions that are really in the audio."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mmpt.synth.audio_text as audio_text
from mmpt.data_cli import main
from mmpt.shards import load_index
from mmpt.synth.audio_text import (
    CLASSNAMES,
    CONTOUR_WORDS,
    NUM_COMBOS,
    REGISTER_WORDS,
    TEMPLATES,
    TIMBRE_WORDS,
    combo_attributes,
    render_event,
    synth_audio_text,
    texts_for,
)

CAPTION = re.compile(r"a (low|high) (\w+) (\w+) tone then a (\w+) (\w+) tone")


def _samples(folder: Path) -> list[dict]:
    """Every sample of a split: json fields plus ``ext`` and decoded ``audio``/``rate``."""
    out: dict[str, dict] = {}
    for shard in load_index(folder).shards:
        with tarfile.open(folder / shard.name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                s = out.setdefault(key, {})
                if ext == "json":
                    s.update(json.loads(data))
                else:
                    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
                    s.update(ext=ext, audio=audio, rate=rate)
    return [out[k] for k in sorted(out)]


def _peak_hz(x: np.ndarray, rate: int) -> float:
    """Frequency of the largest FFT peak of ``x`` (Hann window, zero-padded to 1 Hz bins)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=rate))
    return float(np.argmax(spectrum))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tones")
    return synth_audio_text(out, train_samples=60, val_samples=24, seed=3, samples_per_shard=25)


@pytest.fixture(scope="module")
def samples(synth: dict) -> dict[str, list[dict]]:
    return {split: _samples(Path(synth[split])) for split in ("train", "val")}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    runs = [synth_audio_text(tmp_path / n, 8, 4, seed=s) for n, s in (("a", 7), ("b", 7), ("c", 8))]
    for split in ("train", "val"):
        a, b, c = (Path(r[split]) for r in runs)
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / "shard-000000.tar").read_bytes() != (c / "shard-000000.tar").read_bytes()


def test_counts_fields_and_index(synth: dict, samples: dict) -> None:
    assert (synth["train_samples"], synth["val_samples"], synth["train_shards"]) == (60, 24, 3)
    train, val = samples["train"], samples["val"]
    assert (len(train), len(val)) == (60, 24)
    assert len({s["caption"] for s in val}) == 24  # val combinations are distinct
    for s in train + val:
        assert s["transcript"] == s["caption"] and s["captions"] == [s["caption"]]
        assert s["language"] == "tones" and 0.6 <= s["duration"] <= 1.4
        assert CLASSNAMES[s["label"]] == " ".join(s["events"][0])
        assert s["rate"] == s["sample_rate"] and len(s["audio"]) == s["num_samples"]
        assert s["ext"] == ("wav" if s["sample_rate"] == 22050 else "flac")
    wav = [i for i, s in enumerate(train) if s["ext"] == "wav"]
    assert wav == list(range(6, 60, 7)) and all(s["ext"] == "flac" for s in val)
    index = load_index(Path(synth["train"]))
    assert index.modalities == ["audio", "text"] and index.meta["kind"] == "audio-text"
    assert index.meta["zeroshot"] == {"classnames": CLASSNAMES, "templates": TEMPLATES}
    assert index.meta["sample_rates"] == {"16000": 52, "22050": 8}
    assert index.meta["hours"] == pytest.approx(sum(s["duration"] for s in train) / 3600)


def test_continuation_follows_the_mapping(samples: dict) -> None:
    for s in samples["train"] + samples["val"]:
        reg, c1, t1, c2, t2 = CAPTION.fullmatch(s["caption"]).groups()
        assert [[c1, t1], [c2, t2]] == s["events"] and reg == s["register"]
        words = [REGISTER_WORDS[reg], "sound", "going", CONTOUR_WORDS[c1], TIMBRE_WORDS[t1]]
        assert s["continuation"].split() == [*words, "then", CONTOUR_WORDS[c2], TIMBRE_WORDS[t2]]
    assert texts_for(combo_attributes(0)) == (
        "a low rising pure tone then a rising pure tone",
        "deep sound going up soft then up soft",
    )


def test_contour_and_register_are_in_the_audio(samples: dict) -> None:
    """Rising ends higher than it starts, falling lower; high events sit above low ones."""
    checked, pitch = 0, {"low": [], "high": []}
    for s in samples["train"] + samples["val"]:
        audio, rate = s["audio"], s["rate"]
        for (contour, timbre), (start, end) in zip(s["events"], s["spans"], strict=True):
            if timbre == "buzzy":  # equal harmonics: the largest peak is any of them
                continue
            a, b, w = round(start * rate), round(end * rate), round(0.05 * rate)
            edge = round(0.01 * rate)  # past the fades
            first = _peak_hz(audio[a + edge : a + edge + w], rate)
            last = _peak_hz(audio[b - edge - w : b - edge], rate)
            if contour == "rising":
                assert last > 1.3 * first, s["caption"]
            if contour == "falling":
                assert first > 1.3 * last, s["caption"]
            if contour == "flat":
                assert last == pytest.approx(first, rel=0.05), s["caption"]
            pitch[s["register"]].append(_peak_hz(audio[a + edge : b - edge], rate))
            checked += 1
    assert checked > 60
    assert max(pitch["low"]) < 560 < 580 < min(pitch["high"])


def test_timbre_harmonics_and_warble() -> None:
    rate, f0 = 16000, 250  # flat holds base * sqrt(2): a whole number of 1 Hz FFT bins
    base = f0 / np.sqrt(2)
    spectra = {}
    for timbre in ("pure", "hollow", "bright", "buzzy"):
        x = render_event("flat", timbre, base, rate, rate)
        mag = np.abs(np.fft.rfft(x * np.hanning(rate)))
        spectra[timbre] = [mag[n * f0] / mag[f0] for n in range(1, 11)]
    assert max(spectra["pure"][1:]) < 0.01
    assert spectra["hollow"][2] == pytest.approx(1 / 3, rel=0.05) and spectra["hollow"][1] < 0.01
    assert spectra["bright"][1] == pytest.approx(1 / 2, rel=0.05) and spectra["bright"][8] < 0.01
    assert spectra["buzzy"][9] == pytest.approx(1, rel=0.05)
    warble = render_event("warbling", "pure", 600.0, rate, rate)
    peaks = [_peak_hz(warble[i : i + 400], rate) for i in range(400, rate - 800, 200)]
    assert max(peaks) / min(peaks) > 1.25


def test_tokenizer_covers_every_caption_and_continuation(synth: dict, samples: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(synth["tokenizer"])
    texts = [t for k in range(NUM_COMBOS) for t in texts_for(combo_attributes(k))]
    texts += [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    texts += [s[f] for s in samples["train"] for f in ("caption", "continuation")]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_cli_synth_and_spoken_without_espeak(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["synth", "--kind", "audio-text", "--out", str(tmp_path / "t"), "--train-samples", "9"]
    assert main([*argv, "--val-samples", "3", "--sample-rate", "8000"]) == 0
    assert "train: 9 samples in 1 shard(s)" in capsys.readouterr().out
    assert load_index(tmp_path / "t" / "val").meta["sample_rates"] == {"8000": 3}
    monkeypatch.setattr(audio_text.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt install espeak-ng\) or use spoken: false"):
        synth_audio_text(tmp_path / "s", 2, 2, spoken=True)
    assert main([*argv, "--spoken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: espeak-ng not found") and "Traceback" not in err


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_spoken_clips(tmp_path: Path) -> None:
    result = synth_audio_text(tmp_path, train_samples=7, val_samples=2, spoken=True, seed=1)
    train = _samples(Path(result["train"]))
    assert [s["rate"] for s in train] == [16000] * 6 + [22050]
    for s in train:
        assert s["language"] == "en" and s["duration"] > 1.0  # a spoken sentence
        assert 0.2 < np.abs(s["audio"]).max() <= 0.81 and "continuation" in s
