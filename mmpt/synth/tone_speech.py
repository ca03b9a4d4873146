"""Synthetic "tone speech": a tiny language whose letters are sounds, for CTC recognition.

Each letter is a phone-like sound of 60-100 ms (vowels: steady harmonic tones, each with its
own pitch and timbre; consonants: noise bands, a low hum, a click, a glide), words are
letters run together and separated by 50 ms pauses, and a clip's transcript spells its words
(``"kam situ"``). Two related languages share the phone inventory: ``b`` has its own lexicon
and speaks 15% higher, so its labelled data helps a model of ``a`` (multilingual adaptation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmpt.ctc_vocab import DELIMITER, PAD, UNK, CTCVocab
from mmpt.shards.audio_build import encode_pcm16
from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders, split_writer

GENERATOR_NAME = "mmpt.synth.tone_speech"
#: Vowel -> (base Hz, harmonic amplitudes 1..n).
VOWELS: dict[str, tuple[float, tuple[float, ...]]] = {
    "a": (220.0, (1.0, 0.6, 0.4)),
    "e": (330.0, (1.0, 0.2, 0.5)),
    "i": (500.0, (1.0,)),
    "o": (160.0, (1.0, 0.8, 0.1, 0.3)),
    "u": (260.0, (1.0, 0.0, 0.7)),
}
#: Consonant -> kind of sound.
CONSONANTS = {"k": "click", "m": "hum", "s": "hiss", "t": "glide", "n": "buzz"}
PHONES = tuple(sorted(VOWELS) + sorted(CONSONANTS))
LANGUAGES = {"a": 1.0, "b": 1.15}  # pitch factor of each language
_SPLIT_STREAM = {"train": 41, "val": 42}
_LEXICON_SIZE = 24
_WORDS = (1, 3)  # words per clip
_PHONE_S, _PAUSE_S = (0.06, 0.10), 0.05
_EDGE_S = 0.08  # silence before and after the words


def lexicon(language: str, seed: int = 0) -> list[str]:
    """The language's words: 24 distinct consonant-vowel spellings of 2-4 letters."""
    if language not in LANGUAGES:
        raise ValueError(
            f"language must be one of {sorted(LANGUAGES)} (--language), got {language!r}"
        )
    rng = np.random.default_rng([seed, 7, ord(language)])
    words: list[str] = []
    cons, vows = sorted(CONSONANTS), sorted(VOWELS)
    while len(words) < _LEXICON_SIZE:
        n = int(rng.integers(2, 5))
        word = "".join((cons if (i % 2 == 0) else vows)[int(rng.integers(5))] for i in range(n))
        if word not in words:
            words.append(word)
    return words


def render_phone(
    phone: str, frames: int, rate: int, pitch: float, rng: np.random.Generator
) -> np.ndarray:
    """One phone (frames,) with 5 ms fades, peak about 1."""
    t = np.arange(frames) / rate
    if phone in VOWELS:
        base, amps = VOWELS[phone]
        f0 = base * pitch * rng.uniform(0.96, 1.04)
        wave = sum(a * np.sin(2 * np.pi * (k + 1) * f0 * t) for k, a in enumerate(amps))
        wave = wave / sum(amps)
    else:
        kind = CONSONANTS[phone]
        noise = rng.standard_normal(frames)
        if kind == "hiss":  # high noise: first difference of white noise
            wave = 0.5 * np.diff(noise, prepend=0.0)
        elif kind == "hum":
            wave = np.sin(2 * np.pi * 110 * pitch * t) * 0.8
        elif kind == "click":  # a decaying burst
            wave = noise * np.exp(-t / 0.012)
        elif kind == "buzz":  # square-ish 140 Hz
            wave = 0.5 * np.sign(np.sin(2 * np.pi * 140 * pitch * t))
        else:  # glide: a fast falling sweep 1500 -> 400 Hz
            freq = (1500 - 1100 * t / max(t[-1], 1e-6)) * pitch
            wave = 0.7 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
    fade = np.clip(np.minimum(np.arange(frames), np.arange(frames)[::-1]) / (0.005 * rate), 0, 1)
    return wave * fade


def render_words(words: list[str], rate: int, pitch: float, rng: np.random.Generator) -> np.ndarray:
    """A clip (frames,) float32 speaking ``words``, in light noise (30 dB SNR)."""
    pieces = [np.zeros(round(_EDGE_S * rate))]
    for w, word in enumerate(words):
        if w:
            pieces.append(np.zeros(round(_PAUSE_S * rate * rng.uniform(0.8, 1.5))))
        for phone in word:
            frames = round(rng.uniform(*_PHONE_S) * rate)
            pieces.append(render_phone(phone, frames, rate, pitch, rng))
    pieces.append(np.zeros(round(_EDGE_S * rate)))
    clip = np.concatenate(pieces) * rng.uniform(0.3, 0.8)
    noise = np.sqrt(np.mean(clip**2)) * 10 ** (-30 / 20) * rng.standard_normal(clip.shape[0])
    return (clip + noise).astype(np.float32)


def _write_split(
    writer: ShardWriter, split: str, count: int, rate: int, language: str, seed: int, labelled: bool
) -> float:
    """Write ``count`` clips (``flac`` + ``json``, with ``transcript`` if ``labelled``); hours."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], ord(language)])
    words, seconds = lexicon(language, seed), 0.0
    for i in range(count):
        chosen = [
            words[int(j)]
            for j in rng.integers(len(words), size=int(rng.integers(*_WORDS, endpoint=True)))
        ]
        audio = render_words(chosen, rate, LANGUAGES[language], rng)
        key = f"{language}{i:08d}"
        info = {
            "key": key, "language": f"tone-{language}",
            "sample_rate": rate, "num_samples": len(audio), "duration": len(audio) / rate,
        }  # fmt: skip
        if labelled:
            info["transcript"] = " ".join(chosen)
        writer.write({"__key__": key, "flac": encode_pcm16(audio, rate, "FLAC"), "json": info})
        seconds += len(audio) / rate
    return seconds / 3600


def synth_tone_speech(
    out: str | Path,
    train_samples: int = 2000,
    val_samples: int = 100,
    sample_rate: int = 16000,
    seed: int = 0,
    language: str = "a",
    unlabelled: bool = False,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a deterministic tone-speech set as ``out/train`` and ``out/val``.

    Clips (about 0.3-1.5 s) speak 1-3 words of the language's 24-word lexicon; ``json``
    holds ``transcript`` (the words, spaces between them), ``language`` and the length.

    Args:
        out: Output folder.
        train_samples: Number of training clips.
        val_samples: Number of validation clips.
        sample_rate: Rate of the FLAC clips in Hz (at least 8000).
        seed: Same seed gives byte-identical shards (and the same lexicons).
        language: ``a`` (the target) or ``b`` (a related language: same phones, other words,
            15% higher pitch).
        unlabelled: Leave the transcripts out of the training split (unlabelled audio,
            the same clips as a labelled set of the same seed; validation keeps them).
        samples_per_shard: Samples per ``.tar`` shard.
        overwrite: Replace shards in the split folders that this generator did not write.

    Returns:
        Dict with ``out``, ``train``, ``val``, their sample and shard counts, ``phones`` and
        ``tokenizer`` (a folder holding the character ``vocab.json``, :func:`tone_vocab`).

    Raises:
        ValueError: A parameter out of range, an unknown language, or foreign shards.
    """
    check_minimums({
        "train_samples": (train_samples, 1), "val_samples": (val_samples, 1),
        "sample_rate": (sample_rate, 8000), "samples_per_shard": (samples_per_shard, 1),
    })  # fmt: skip
    lexicon(language, seed)  # checks the language
    out = Path(out)
    folders = split_folders(out, _SPLIT_STREAM, overwrite, GENERATOR_NAME)
    counts = {"train": train_samples, "val": val_samples}
    meta = {
        "kind": "tone-speech",
        "text_key": "json:transcript",
        "phones": list(PHONES),
        "lexicon": lexicon(language, seed),
        "generator": {
            "name": GENERATOR_NAME, "seed": seed, "sample_rate": sample_rate,
            "language": language, "unlabelled": unlabelled, "samples_per_shard": samples_per_shard,
            **{f"{k}_samples": v for k, v in counts.items()},
        },
    }  # fmt: skip
    result: dict[str, Any] = {"out": str(out), "phones": list(PHONES)}
    for split, folder in folders.items():
        with split_writer(result, split, folder, counts[split], samples_per_shard,
                          ["audio", "text"], meta | {"split": split}) as writer:  # fmt: skip
            keep = not unlabelled or split == "val"
            hours = _write_split(writer, split, counts[split], sample_rate, language, seed, keep)
            writer.index.meta |= {"hours": hours}
    result["tokenizer"] = str(out / "tokenizer")
    tone_vocab().save(out / "tokenizer" / "vocab.json")
    return result


def tone_vocab() -> CTCVocab:
    """The character CTC vocabulary of tone speech (``mmpt data vocab`` builds the same)."""
    return CTCVocab([PAD, UNK, DELIMITER, *sorted(PHONES)])
