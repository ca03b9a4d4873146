"""Synthetic audio-text shards: two tone events per clip, captioned by contour, timbre, register."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.shards.audio_build import encode_pcm16
from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders, split_writer
from mmpt.synth.vocab import write_synth_tokenizer

CONTOURS = ("rising", "falling", "flat", "warbling")
#: Timbre -> (harmonic number, amplitude) pairs.
TIMBRES: dict[str, tuple[tuple[int, float], ...]] = {
    "pure": ((1, 1.0),),
    "hollow": tuple((n, 1 / n) for n in (1, 3, 5, 7)),
    "bright": tuple((n, 1 / n) for n in range(1, 9)),
    "buzzy": tuple((n, 1.0) for n in range(1, 11)),
}
#: Register -> range of the base frequency in Hz (rising/falling glide one octave above it).
REGISTERS: dict[str, tuple[float, float]] = {"low": (150.0, 260.0), "high": (600.0, 1000.0)}
#: The continuation's words for each attribute: what a language model has to learn to map.
CONTOUR_WORDS = {"rising": "up", "falling": "down", "flat": "level", "warbling": "shaky"}
TIMBRE_WORDS = {"pure": "soft", "hollow": "round", "bright": "sharp", "buzzy": "rough"}
REGISTER_WORDS = {"low": "deep", "high": "thin"}
EVENTS = tuple((c, t) for c in CONTOURS for t in TIMBRES)
CLASSNAMES = [f"{c} {t}" for c, t in EVENTS]
TEMPLATES = ["a {} tone", "the sound of a {} tone", "a recording of a {} tone", "a short {} tone"]
NUM_COMBOS = len(REGISTERS) * len(EVENTS) ** 2
GENERATOR_NAME = "mmpt.synth.audio_text"
WAV_EVERY, WAV_RATE = 7, 22050  # every 7th training clip is a 22050 Hz WAV
DURATION = (0.6, 1.4)  # clip seconds
EVENT_SHARE, GAP_SHARE = 0.45, 0.05  # of the clip; the rest is split before and after
_AMPLITUDE = (0.3, 0.8)
_FADE_S = 0.01
_SNR_DB = 30.0
_VIBRATO_SEMITONES, _VIBRATO_HZ = 3.0, 6.0
_SPEED, _PITCH = (130, 190), (25, 75)  # espeak-ng -s (words per minute) and -p (0-99)
_SPLIT_STREAM = {"train": 31, "val": 32}  # apart from the other generators' streams
_NO_ESPEAK = (
    "espeak-ng not found on PATH: install espeak-ng (apt install espeak-ng) or use spoken: false"  # noqa: E501
)


def combo_attributes(combo: int) -> dict[str, Any]:
    """Attributes of one of the 512 register/event/event combinations.

    Args:
        combo: Combination id in ``[0, 512)``; register varies slowest.

    Returns:
        Dict with ``register``, ``events`` (two ``[contour, timbre]``) and ``label`` (the
        first event's index in :data:`EVENTS` / :data:`CLASSNAMES`).

    """
    if not 0 <= combo < NUM_COMBOS:
        raise ValueError(f"combo must be in [0, {NUM_COMBOS}), got {combo}")
    rest, second = divmod(combo, len(EVENTS))
    reg, first = divmod(rest, len(EVENTS))
    events = [list(EVENTS[first]), list(EVENTS[second])]
    return {"register": list(REGISTERS)[reg], "events": events, "label": first}


def texts_for(attrs: dict[str, Any]) -> tuple[str, str]:
    """Caption and continuation of a clip: the same events in two different vocabularies.

    Example:
        >>> texts_for({"register": "low", "events": [["rising", "pure"], ["falling", "bright"]]})
        ('a low rising pure tone then a falling bright tone', 'deep sound going up soft then down sharp')

    """  # noqa: E501
    (c1, t1), (c2, t2) = attrs["events"]
    reg = attrs["register"]
    caption = f"a {reg} {c1} {t1} tone then a {c2} {t2} tone"
    continuation = (
        f"{REGISTER_WORDS[reg]} sound going {CONTOUR_WORDS[c1]} {TIMBRE_WORDS[t1]} "
        f"then {CONTOUR_WORDS[c2]} {TIMBRE_WORDS[t2]}"
    )
    return caption, continuation


def pitch_track(contour: str, base: float, frames: int, rate: int) -> np.ndarray:
    """Instantaneous frequency (frames,) in Hz of one event of ``contour`` over ``base`` Hz.

    Rising glides from ``base`` to ``2 * base``, falling the other way; flat holds, and
    warbling wobbles +-3 semitones at 6 Hz around, ``base * sqrt(2)`` (the glides' middle).

    """
    u = np.arange(frames) / max(frames, 1)
    if contour == "rising":
        return base * np.exp2(u)
    if contour == "falling":
        return base * np.exp2(1.0 - u)
    middle = np.full(frames, base * np.sqrt(2.0))
    if contour == "flat":
        return middle
    if contour == "warbling":
        wobble = np.sin(2 * np.pi * _VIBRATO_HZ * np.arange(frames) / rate)
        return middle * np.exp2(_VIBRATO_SEMITONES / 12 * wobble)
    raise ValueError(f"unknown contour {contour!r}; known: {', '.join(CONTOURS)}")


def render_event(contour: str, timbre: str, base: float, frames: int, rate: int) -> np.ndarray:
    """One tone event (frames,) with peak at most 1 and 10 ms fades at both ends.

    Harmonics fade out as they approach the Nyquist frequency, so nothing aliases.

    """
    freq = pitch_track(contour, base, frames, rate)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    harmonics = dict(TIMBRES[timbre])
    top = 0.9 * rate / 2  # harmonics fade out over the last 10% below the Nyquist frequency
    two_cos, prev, sin_n = 2 * np.cos(phase), np.zeros(frames), np.sin(phase)
    wave = np.zeros(frames)
    for n in range(1, max(harmonics) + 1):  # sin(n x) by the Chebyshev recurrence: no sin calls
        if n in harmonics and n * freq.min() < top:
            weight = harmonics[n]
            if n * freq.max() > 8 / 9 * top:
                weight = weight * np.clip((top - n * freq) / (top / 9), 0.0, 1.0)
            wave += weight * sin_n
        prev, sin_n = sin_n, two_cos * sin_n - prev
    wave /= sum(harmonics.values())
    fade = np.clip(np.minimum(np.arange(frames), np.arange(frames)[::-1]) / (_FADE_S * rate), 0, 1)
    return wave * fade


def event_spans(duration: float) -> list[tuple[float, float]]:
    """Start and end seconds of the two events of a ``duration``-second clip."""
    length, gap = EVENT_SHARE * duration, GAP_SHARE * duration
    lead = (duration - 2 * length - gap) / 2
    return [(lead, lead + length), (lead + length + gap, lead + 2 * length + gap)]


def render_tones(
    attrs: dict[str, Any], duration: float, rate: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[float]]:
    """A clip (frames,) float32 of the two events of ``attrs`` in light white noise (30 dB SNR).

    Returns:
        The samples and the base frequency of each event.

    """
    frames = round(duration * rate)
    clip = np.zeros(frames)
    amplitude = rng.uniform(*_AMPLITUDE)
    bases = [float(rng.uniform(*REGISTERS[attrs["register"]])) for _ in attrs["events"]]
    for (contour, timbre), base, (start, end) in zip(
        attrs["events"], bases, event_spans(duration), strict=True
    ):
        a, b = round(start * rate), round(end * rate)
        clip[a:b] = amplitude * render_event(contour, timbre, base, b - a, rate)
    noise_std = np.sqrt(np.mean(clip**2)) * 10 ** (-_SNR_DB / 20)
    return (clip + noise_std * rng.standard_normal(frames)).astype(np.float32), bases


class _LazyResampler:
    """One cached :class:`~mmpt.datamodules.audio.Resampler` for every spoken clip."""

    def __init__(self) -> None:
        self._resampler: Any = None

    def __call__(self, wave: Any, orig: int, new: int) -> Any:
        if self._resampler is None:  # torch is imported only when speech is rendered
            from mmpt.datamodules.audio import Resampler

            self._resampler = Resampler()
        return self._resampler(wave, orig, new)


_RESAMPLER = _LazyResampler()


def speak(text: str, rate: int, rng: np.random.Generator, tmp: Path) -> np.ndarray:
    """espeak-ng saying ``text`` at a random speed and pitch, (frames,) float32 at ``rate``."""
    from mmpt.datamodules.audio import decode_audio

    speed, pitch = int(rng.integers(*_SPEED, endpoint=True)), int(rng.integers(*_PITCH))
    wav = tmp / "say.wav"
    cmd = ["espeak-ng", "-w", str(wav), "-s", str(speed), "-p", str(pitch), "--", text]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        raise RuntimeError(f"espeak-ng failed on {text!r}: {err.decode(errors='replace')}") from e
    wave, source_rate = decode_audio(wav.read_bytes(), "wav", fallback=False)
    audio = _RESAMPLER(wave.mean(dim=0), source_rate, rate).numpy()
    return audio * (rng.uniform(*_AMPLITUDE) / max(float(np.abs(audio).max()), 1e-6))


def _plan(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` combinations, each of the 512 equally often (give or take one), shuffled."""
    rounds = -(-count // NUM_COMBOS)
    return np.concatenate([rng.permutation(NUM_COMBOS) for _ in range(rounds)])[:count]


def _write_split(
    writer: ShardWriter, split: str, count: int, rate: int, spoken: bool, seed: int
) -> dict[str, Any]:
    """Write ``count`` clips (``flac`` or ``wav`` + ``json``); returns rate and hour totals."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    rates: Counter[int] = Counter()
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, combo in enumerate(_plan(count, rng)):
            attrs = combo_attributes(int(combo))
            caption, continuation = texts_for(attrs)
            wav = split == "train" and i % WAV_EVERY == WAV_EVERY - 1
            clip_rate = WAV_RATE if wav else rate
            extra: dict[str, Any] = {}
            if spoken:
                audio = speak(caption, clip_rate, rng, Path(tmp))
            else:
                duration = float(rng.uniform(*DURATION))
                audio, bases = render_tones(attrs, duration, clip_rate, rng)
                extra = {
                    "base_hz": [round(b, 2) for b in bases],
                    "spans": [[round(a, 4), round(b, 4)] for a, b in event_spans(duration)],
                }
            key = f"{i:09d}"
            info = {
                "key": key, "caption": caption, "captions": [caption], "transcript": caption,
                "continuation": continuation, **attrs, "language": "en" if spoken else "tones",
                "sample_rate": clip_rate, "channels": 1, "num_samples": len(audio),
                "duration": round(len(audio) / clip_rate, 6), **extra,
            }  # fmt: skip
            ext = "wav" if wav else "flac"
            writer.write(
                {"__key__": key, ext: encode_pcm16(audio, clip_rate, ext.upper()), "json": info}
            )
            rates[clip_rate] += 1
            seconds += len(audio) / clip_rate
    return {"sample_rates": {str(k): v for k, v in sorted(rates.items())}, "hours": seconds / 3600}


def synth_audio_text(
    out: str | Path,
    train_samples: int = 3000,
    val_samples: int = 300,
    sample_rate: int = 16000,
    seed: int = 0,
    spoken: bool = False,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a deterministic, learnable audio-text dataset as ``out/train`` and ``out/val``.

    Each 0.6-1.4 s clip holds two tone events one after the other (each 45% of the clip,
    5% gap between them), each a contour (rising/falling glide over an octave, flat,
    warbling +-3 semitones at 6 Hz) and a timbre (pure sine; hollow: odd harmonics 1-7 at
    1/n; bright: harmonics 1-8 at 1/n; buzzy: harmonics 1-10 equal), in a low (150-260 Hz
    base) or high (600-1000 Hz) register: 512 combinations, drawn equally often in each
    split. The caption names every attribute (``"a low rising pure tone then a falling
    bright tone"``, also stored as ``transcript``); ``continuation`` says the same in other
    words (``"deep sound going up soft then down sharp"``); ``label`` is the first event's
    class (16, names and prompt templates in ``index.json`` ``meta.zeroshot``). Clips are
    16-bit FLAC at ``sample_rate`` except every 7th training clip, a 22050 Hz WAV. With
    ``spoken`` each clip is instead espeak-ng speaking its caption (random speed and
    pitch; ``language`` ``"en"`` rather than ``"tones"``).

    Args:
        out: Output folder; ``train/``, ``val/`` and ``tokenizer/`` (a word-level tokenizer
            covering every caption, continuation and prompt, see :mod:`mmpt.synth.vocab`).
        train_samples: Number of training clips.
        val_samples: Number of validation clips (distinct combinations up to 512).
        sample_rate: Sample rate of the FLAC clips in Hz (at least 8000).
        seed: Same seed gives byte-identical shards.
        spoken: Speak the captions with espeak-ng instead of rendering tones.
        samples_per_shard: Samples per ``.tar`` shard.
        overwrite: Replace shards in ``out/train`` / ``out/val`` that this generator did not
            write (its own earlier output is always replaced).

    Returns:
        Dict with ``out``, ``train``, ``val`` and ``tokenizer`` folders, ``train_samples``,
        ``val_samples``, ``train_shards``, ``val_shards`` and ``num_classes``.

    Raises:
        ValueError: A parameter is out of range, or the output folders hold other shards.
        RuntimeError: ``spoken`` and no ``espeak-ng`` on PATH.

    """
    check_minimums(
        {
            "train_samples": (train_samples, 1),
            "val_samples": (val_samples, 1),
            "sample_rate": (sample_rate, 8000),
            "samples_per_shard": (samples_per_shard, 1),
        }
    )
    if spoken and shutil.which("espeak-ng") is None:
        raise RuntimeError(_NO_ESPEAK)
    out = Path(out)
    folders = split_folders(out, _SPLIT_STREAM, overwrite, GENERATOR_NAME)
    counts = {"train": train_samples, "val": val_samples}
    meta = {
        "kind": "audio-text",
        "zeroshot": {"classnames": list(CLASSNAMES), "templates": list(TEMPLATES)},
        "contours": list(CONTOURS),
        "timbres": {k: [list(h) for h in v] for k, v in TIMBRES.items()},
        "registers": {k: list(v) for k, v in REGISTERS.items()},
        "words": {"contour": CONTOUR_WORDS, "timbre": TIMBRE_WORDS, "register": REGISTER_WORDS},
        "generator": {
            "name": GENERATOR_NAME,
            "seed": seed,
            "sample_rate": sample_rate,
            "spoken": spoken,
            "samples_per_shard": samples_per_shard,
            **{f"{k}_samples": v for k, v in counts.items()},
        },  # fmt: skip
    }
    result: dict[str, Any] = {"out": str(out), "num_classes": len(CLASSNAMES)}
    for split, folder in folders.items():
        with split_writer(result, split, folder, counts[split], samples_per_shard,
                          ["audio", "text"], meta | {"split": split}) as writer:  # fmt: skip
            stats = _write_split(writer, split, counts[split], sample_rate, spoken, seed)
            writer.index.meta |= stats
    result["tokenizer"] = str(write_synth_tokenizer(out / "tokenizer"))
    return result
