"""Deterministic, learnable synthetic datasets written as mmpt shards."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any


class _Lazy:
    """A generator function imported on first use; its signature is the real one.

    ``inspect.signature`` reads :attr:`__signature__`, so ``mmpt data synth`` can reject
    flags a kind does not take without importing every generator up front.

    Args:
        module: Module holding the generator.
        name: The generator's name in ``module``.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def resolve(self) -> Callable[..., dict]:
        """Import and return the generator."""
        return getattr(importlib.import_module(self.module), self.name)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.resolve())

    def __call__(self, out: str | Path, **kw: Any) -> dict:
        return self.resolve()(out, **kw)


#: ``mmpt data synth --kind`` -> generator(out, **options). Later modalities add a line here.
SYNTH_KINDS: dict[str, Callable[..., dict]] = {
    # train/val pairs plus held-out caption/VQA/choice sets and QA conversations
    "image-text": _Lazy("mmpt.synth.image_eval", "synth_image_text_eval"),
    # the same set in another visual domain (continual pretraining: domain B)
    "image-text-shifted": _Lazy("mmpt.synth.image_text", "synth_image_text_shifted"),
    "interleaved": _Lazy("mmpt.synth.interleaved", "synth_interleaved"),
    "text": _Lazy("mmpt.synth.interleaved", "synth_text"),
    "video-text": _Lazy("mmpt.synth.video_text", "synth_video_text"),
    # UniVL captioning: clip features (+ mp4 clips) with captions, ASR-style train segments
    "video-caption": _Lazy("mmpt.synth.video_caption", "synth_video_caption"),
    "multispectral": _Lazy("mmpt.synth.multispectral", "synth_multispectral"),
    "audio-text": _Lazy("mmpt.synth.audio_text", "synth_audio_text"),
    "tone-speech": _Lazy("mmpt.synth.tone_speech", "synth_tone_speech"),  # CTC recognition
    "grounding": _Lazy("mmpt.synth.grounding", "synth_grounding"),
    # tiles with semantic masks, instances and oriented boxes; one training source per task
    "rs-dense": _Lazy("mmpt.synth.rs_dense", "synth_rs_dense"),
}


def make_synthetic(kind: str, out: str | Path, **kw: Any) -> dict:
    """Generate the synthetic dataset ``kind`` into ``out``.

    Raises:
        ValueError: Unknown kind (lists the known ones).
    """
    if kind not in SYNTH_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(SYNTH_KINDS)}")
    return SYNTH_KINDS[kind](out, **kw)
