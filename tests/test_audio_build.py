"""Building audio-text shards from JSONL/CSV tables and folders of audio + transcript pairs."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmpt.data_cli import main
from mmpt.shards import load_index
from mmpt.shards.audio_build import build_audio_text_shards


def _tone(path: Path, rate: int, channels: int = 1, seconds: float = 0.25) -> Path:
    """A 440 Hz tone (FLAC or WAV from the suffix)."""
    t = np.arange(round(rate * seconds)) / rate
    audio = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t))[:, None], channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


def _mp3(path: Path, rate: int = 22050) -> Path:
    """A 0.25 s mp3 made with PyAV; skips the test when PyAV has no mp3 encoder."""
    av = pytest.importorskip("av")
    try:
        av.codec.Codec("libmp3lame", "w")
    except Exception:
        pytest.skip("this PyAV build has no libmp3lame encoder")
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate // 4) / rate)).astype(np.float32)
    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        for i in range(0, len(x), 1152):
            frame = av.AudioFrame.from_ndarray(x[None, i : i + 1152], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _read(out: Path) -> list[dict]:
    """Samples of every shard in ``out``: ``{"key", "ext", "audio", **json}``."""
    samples: dict[str, dict] = {}
    for shard in load_index(out).shards:
        with tarfile.open(out / shard.name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                s = samples.setdefault(key, {"key": key})
                s.update(json.loads(data) if ext == "json" else {"ext": ext, "audio": data})
    return [samples[k] for k in sorted(samples)]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """A JSONL table: flac, wav, missing, corrupt, empty, no transcript, a bad line."""
    clips = tmp_path / "clips"
    _tone(clips / "a.flac", 44100, channels=2)
    _tone(clips / "b.wav", 8000)
    (clips / "bad.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(clips / "empty.wav", np.zeros((0,)), 16000)
    rows = [
        {"audio": "a.flac", "transcript": "hello there", "language": "en",
         "continuation": "general kenobi", "speaker": "s1", "duration": 99.0},
        {"audio": "b.wav", "transcript": "bonjour", "language": "fr", "caption": "a greeting"},
        {"audio": "gone.flac", "transcript": "nothing"},
        {"audio": "bad.wav", "transcript": "noise"},
        {"audio": "empty.wav", "transcript": "silence"},
        {"audio": "a.flac", "transcript": "  "},
    ]  # fmt: skip
    path = tmp_path / "meta" / "transcripts.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join([*lines[:2], "[1, 2]", *lines[2:]]) + "\n")
    return path


def test_build_from_jsonl_copies_bytes_and_counts_skips(table: Path, tmp_path: Path) -> None:
    clips, out = tmp_path / "clips", tmp_path / "out"
    report = build_audio_text_shards(table, out, audio_root=clips, progress=False)
    assert report.written == 2
    assert report.skipped == {
        "bad_row": 1, "missing_audio": 1, "corrupt_audio": 1, "empty_audio": 1,
        "empty_transcript": 1,
    }  # fmt: skip
    a, b = _read(out)
    assert (a["key"], b["key"]) == ("000000000", "000000001")
    assert (a["ext"], b["ext"]) == ("flac", "wav")
    assert a["audio"] == (clips / "a.flac").read_bytes()  # copied byte for byte
    assert b["audio"] == (clips / "b.wav").read_bytes()
    assert a["transcript"] == a["caption"] == "hello there" and a["language"] == "en"
    assert a["continuation"] == "general kenobi" and a["speaker"] == "s1"
    assert (a["sample_rate"], a["channels"], a["num_samples"]) == (44100, 2, 11025)
    assert a["duration"] == pytest.approx(0.25) and a["source"] == "a.flac"
    assert b["caption"] == "a greeting" and b["transcript"] == "bonjour"
    assert (b["sample_rate"], b["channels"], b["language"]) == (8000, 1, "fr")
    index = load_index(out)
    assert index.modalities == ["audio", "text"] and index.num_samples == 2
    meta = index.meta
    assert meta["kind"] == "audio-text" and meta["source"] == str(table.resolve())
    assert meta["skipped"] == report.skipped and meta["sample_rates"] == {"8000": 1, "44100": 1}
    assert meta["hours"] == pytest.approx(0.5 / 3600)
    assert meta["build"]["audio_column"] == "audio" and meta["build"]["resample"] is None
    assert {e["reason"] for e in report.skipped_examples} == set(report.skipped)
    (corrupt,) = [e for e in report.skipped_examples if e["reason"] == "corrupt_audio"]
    assert "LibsndfileError" in str(corrupt)  # a broken wav is never handed to PyAV


def test_mp3_is_copied_and_measured(tmp_path: Path) -> None:
    mp3 = _mp3(tmp_path / "c.mp3")
    (tmp_path / "t.csv").write_text("path,text,label\nc.mp3,a beep,3\n")
    report = build_audio_text_shards(tmp_path / "t.csv", tmp_path / "out", progress=False)
    assert report.written == 1, report.skipped_examples
    (s,) = _read(tmp_path / "out")
    assert s["ext"] == "mp3" and s["audio"] == mp3.read_bytes() and s["label"] == "3"
    assert s["sample_rate"] == 22050 and s["duration"] == pytest.approx(0.25, abs=0.06)


def test_resample_gives_16k_mono_flac_for_any_workers(table: Path, tmp_path: Path) -> None:
    kw = {"audio_root": tmp_path / "clips", "resample": 16000, "progress": False}
    one = build_audio_text_shards(table, tmp_path / "one", **kw)
    two = build_audio_text_shards(table, tmp_path / "two", workers=2, **kw)
    assert Path(one.shards[0]).read_bytes() == Path(two.shards[0]).read_bytes()
    assert one.skipped == two.skipped and one.written == 2
    for s, frames, rate in zip(_read(tmp_path / "one"), (11025, 2000), (44100, 8000), strict=True):
        info = sf.info(io.BytesIO(s["audio"]))
        assert s["ext"] == "flac" and (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert (info.samplerate, info.channels) == (16000, 1) == (s["sample_rate"], s["channels"])
        assert info.frames == s["num_samples"] == math.ceil(frames * 16000 / rate) == 4000
        assert s["source_sample_rate"] == rate
    assert load_index(tmp_path / "one").meta["sample_rates"] == {"16000": 2}


def test_folder_of_pairs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tone(src / "b" / "y.wav", 16000)
    (src / "b" / "y.txt").write_text("second one\n")
    _tone(src / "a" / "x.flac", 16000)
    (src / "a" / "x.txt").write_text("first one")
    _tone(src / "z.wav", 16000)  # no transcript
    report = build_audio_text_shards(src, tmp_path / "out", samples_per_shard=1, progress=False)
    assert report.written == 2 and report.skipped == {"missing_transcript": 1}
    assert len(report.shards) == 2
    samples = _read(tmp_path / "out")
    assert [s["transcript"] for s in samples] == ["first one", "second one"]
    assert [s["source"] for s in samples] == ["a/x.flac", "b/y.wav"]


def test_cli_build_and_errors(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clips, out = tmp_path / "clips", tmp_path / "out"
    base = ["build", "--kind", "audio-text", "--from", str(table), "--out", str(out)]
    assert main([*base, "--audio", str(clips), "--resample", "16000", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 2 samples in 1 shard(s) to {out}" in printed and "empty_audio=1" in printed

    assert main(["build", "--kind", "audio-text", "--out", str(out)]) == 2
    assert "--from" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--text-column", "words"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no column 'words'" in err and "--text-column" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main([*base, "--overwrite", "--audio", str(tmp_path / "nowhere")]) == 2
    assert "--audio" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--jpeg-quality", "90"]) == 2
    assert "--jpeg-quality does not apply to --kind audio-text" in capsys.readouterr().err
    assert main([*base[:2], "image-text", *base[3:], "--resample", "16000"]) == 2
    assert "--resample does not apply to --kind image-text" in capsys.readouterr().err
