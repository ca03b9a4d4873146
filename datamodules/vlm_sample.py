"""VLM samples: pairs, interleaved documents, conversations, speech and text -> token ids.

One sample function reads every shape, so sources of different shapes mix in one stream:

- **conversation**: ``json`` with ``messages`` (``role``/``content``) or LLaVA's
  ``conversations`` (``from``/``value``), images named by ``json.images`` (member names) or
  the sample's single image; a conversation without ``<image>`` gets it in its first user
  turn;
- **interleaved** (OBELICS/MMC4-like): ``json`` with parallel lists ``texts`` and ``images``
  (member names such as ``"0.jpg"``); at most ``max_images`` images are kept, later ones are
  dropped with their placeholders while their text stays;
- **pair**: an image and a caption (``txt`` / ``json:caption``);
- **speech** (BLSP): an audio clip (``flac``/``wav``/``mp3`` ...) with ``json`` ``transcript``
  and ``continuation``: the user turn is the clip (``<audio>``, or its transcript for a
  text-only LLM stage) and the target is the continuation (the transcript when there is none);
- **text**: a ``txt`` (or ``json:text``) without image.

Images are not decoded in the sample function: the token count of each comes from its size
(read from the header) through the resolution policy, so the packer can budget rows before
any pixel is decoded. The batcher packs samples into rows (first-fit-decreasing) and the
collate function decodes the images of the rows it emits. Audio is decoded in the sample
function (a clip's token count follows its length after resampling), so the packing buffer
holds float32 waveforms: ``buffer_size`` x clip length bounds the worker memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch

from mmpt.datamodules.audio import AUDIO_EXTENSIONS, AudioReader
from mmpt.datamodules.decode import MissingField, read_field
from mmpt.datamodules.packing import OVERLONG_POLICIES
from mmpt.datamodules.resolution import header_size
from mmpt.datamodules.stages import DataError
from mmpt.datamodules.templates import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Template,
    encode,
)
from mmpt.preprocess import VLMPreprocess

log = logging.getLogger("mmpt.data")

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SPEECH_INPUTS = ("audio", "transcript")


def check_speech_input(value: str) -> None:
    """Raise a clear error unless ``value`` is a known ``data.speech_input``."""
    if value not in SPEECH_INPUTS:
        raise ValueError(f"data.speech_input must be one of {SPEECH_INPUTS}, got {value!r}")


class Overlong(ValueError):
    """A sample longer than ``max_seq_len`` under ``overlong: drop`` (counted as a skip)."""


class VLMSample:
    """Raw shard sample -> ``input_ids``, ``labels``, undecoded images. Picklable.

    Args:
        preprocess: The model's ``VLMPreprocess``.
        template: Prompt template.
        max_seq_len: Longest sample kept.
        overlong: ``truncate`` (cut at ``max_seq_len``, never inside an image; images after
            the cut are dropped) or ``drop`` (skip and count the sample).
        max_images: Most images a sample keeps.
        caption_prompt: User prompt of a pair, after its image (empty: the image alone, as in
            VILA's stage-1 "plain" format).
        image_key: Image extensions of a pair, ``;``-separated.
        text_key: Caption field of a pair / text of a text sample.
        audio_key: Audio extensions that make a sample a speech sample, ``;``-separated.
        speech_input: What stands for a clip in the user turn: ``audio`` (the clip's tokens)
            or ``transcript`` (its text: teaches a text-only LLM the task first, or gives
            the text upper bound of a speech model).
        speech_prompt: Instruction before the clip (BLSP: "Continue the following text ...").
        speech_target_key: Target of a speech sample; alternatives ``;``-separated.
        transcript_key: Transcript field of a speech sample (``speech_input: transcript``).
    """

    def __init__(
        self,
        preprocess: VLMPreprocess,
        template: Template,
        max_seq_len: int,
        overlong: str = "truncate",
        max_images: int = 6,
        caption_prompt: str = "",
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt;json:caption;json:text",
        audio_key: str = AUDIO_EXTENSIONS,
        speech_input: str = "audio",
        speech_prompt: str = "",
        speech_target_key: str = "json:continuation;json:transcript;txt",
        transcript_key: str = "json:transcript;txt",
    ) -> None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        check_speech_input(speech_input)
        self.pre, self.template, self.max_seq_len = preprocess, template, max_seq_len
        self.overlong, self.max_images, self.caption_prompt = overlong, max_images, caption_prompt
        self.image_key, self.text_key = image_key, text_key
        self.audio_key, self.speech_input, self.speech_prompt = (
            audio_key,
            speech_input,
            speech_prompt,
        )
        self.speech_target_key, self.transcript_key = speech_target_key, transcript_key
        self.audio_reader = None
        if preprocess.audio is not None:  # never cropped (the text follows all of it): skipped
            whole = dataclasses.replace(preprocess.audio, max_seconds=1e9)
            self.audio_reader = AudioReader(whole, train=False, audio_key=audio_key)

    def messages(
        self, sample: dict[str, Any]
    ) -> tuple[list[dict[str, str]], list[bytes], list[torch.Tensor]]:
        """The sample as messages with placeholders, its image bytes and its audio clips.

        Images are encoded bytes; clips are decoded mono float32 at the model's rate.

        Raises:
            MissingField: A named image member or the text is missing.
            DataError: Speech samples for a model without a speech encoder under
                ``speech_input: audio``.
        """
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            meta = {}
        turns = meta.get("messages") or meta.get("conversations")
        if turns:
            return (*self._conversation(sample, meta, turns), [])
        if "texts" in meta and "images" in meta:
            return (*self._interleaved(sample, meta), [])
        audio_ext = next((k for k in self.audio_key.split(";") if k in sample), None)
        if audio_ext is not None:
            return self._speech(sample, audio_ext)
        text = str(read_field(sample, self.text_key)).strip()
        if not text:
            raise MissingField(f"empty text in {self.text_key!r}")
        image_ext = next((k for k in self.image_key.split(";") if k in sample), None)
        if image_ext is None:
            return [{"role": "text", "content": text}], [], []
        prompt = IMAGE_PLACEHOLDER + (f"\n{self.caption_prompt}" if self.caption_prompt else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return messages, [sample[image_ext]], []

    def _speech(
        self, sample: dict[str, Any], ext: str
    ) -> tuple[list[dict[str, str]], list[bytes], list[torch.Tensor]]:
        target = str(read_field(sample, self.speech_target_key)).strip()
        if not target:
            raise MissingField(f"empty target in {self.speech_target_key!r}")
        clips = []
        if self.speech_input == "transcript":
            spoken = str(read_field(sample, self.transcript_key)).strip()
            if not spoken:
                raise MissingField(f"empty transcript in {self.transcript_key!r}")
        elif self.audio_reader is None:
            raise DataError(
                "speech samples but the model has no speech encoder (model.audio): add one, or "
                "set data.speech_input: transcript to train the LLM on the transcripts"
            )
        else:
            clip = self.audio_reader.read(sample[ext], ext)
            limit = self.pre.audio.max_samples  # type: ignore[union-attr]
            if clip.shape[0] > limit:
                raise Overlong(
                    f"clip of {clip.shape[0]} samples is longer than the speech encoder's "
                    f"max_seconds ({limit} samples); speech samples are never cropped"
                )
            spoken, clips = AUDIO_PLACEHOLDER, [clip]
        prompt = f"{self.speech_prompt}\n{spoken}" if self.speech_prompt else spoken
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
        return messages, [], clips

    def _member(self, sample: dict[str, Any], name: str) -> bytes:
        if name not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise MissingField(f"image member {name!r} is missing (sample has {members})")
        return sample[name]

    def _conversation(
        self, sample: dict[str, Any], meta: dict[str, Any], turns: list[dict[str, Any]]
    ) -> tuple[list[dict[str, str]], list[bytes]]:
        messages = []
        for turn in turns:
            if "from" in turn:
                turn = {
                    "role": _LLAVA_ROLES.get(turn["from"], turn["from"]),
                    "content": turn.get("value"),
                }
            messages.append({"role": turn.get("role"), "content": turn.get("content")})
        names = meta.get("images")
        if names is None:
            ext = next((k for k in self.image_key.split(";") if k in sample), None)
            names = [ext] if ext else []
        images = [self._member(sample, n) for n in names[: self.max_images]]
        placeholders = sum(str(m["content"]).count(IMAGE_PLACEHOLDER) for m in messages)
        if images and placeholders == 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise MissingField("conversation has images but no user turn to put them in")
            first_user["content"] = IMAGE_PLACEHOLDER * len(images) + "\n" + first_user["content"]
        elif placeholders > len(images):
            messages = _drop_placeholders(messages, keep=len(images))
        return messages, images

    def _interleaved(
        self, sample: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[list[dict[str, str]], list[bytes]]:
        texts, names = meta["texts"], meta["images"]
        if len(texts) != len(names):
            raise ValueError(f"interleaved json: {len(texts)} texts for {len(names)} images")
        parts, images = [], []
        for text, name in zip(texts, names, strict=True):
            if name is not None:
                if len(images) < self.max_images:
                    images.append(self._member(sample, name))
                    parts.append(IMAGE_PLACEHOLDER)
            elif text:
                parts.append(str(text).strip())
        if not parts:
            raise MissingField("interleaved document has no text and no image")
        return [{"role": "text", "content": " ".join(parts)}], images

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tokenise one sample; raises (a counted skip) when it is bad or dropped as overlong.

        Returns:
            ``input_ids`` (L,), ``labels`` (L,), ``images`` (list of encoded image bytes),
            ``image_tokens`` (tokens reserved per image), ``audio`` (list of (N_i,) float32
            clips), ``key``, ``truncated`` (0/1).
        """
        messages, images, clips = self.messages(sample)
        if images and self.pre.image is None:
            raise DataError("the samples have images but the model has no vision tower")
        sizes = [header_size(b) for b in images]
        counts = [self._tokens(w, h) for w, h in sizes]
        audio_counts = [self.pre.tokens_for_samples(c.shape[0]) for c in clips]
        segments = self.template.render(messages, self.pre.eos)
        enc = encode(
            segments,
            self.pre.tokenizer,
            self.pre.image_token_id,
            counts,
            self.pre.audio_token_id,
            audio_counts,
        )
        for token_id, need, what in (
            (self.pre.image_token_id, counts, "image"),
            (self.pre.audio_token_id, audio_counts, "audio"),
        ):
            marks = int((enc["input_ids"] == token_id).sum()) if token_id is not None else 0
            if marks != sum(need):
                raise ValueError(
                    f"the text holds the {what} token itself ({marks} {what} tokens for "
                    f"{len(need)} inputs needing {sum(need)}): it must only come from placeholders"
                )
        n, truncated = int(enc["input_ids"].shape[0]), 0
        if n > self.max_seq_len:
            if self.overlong == "drop" or clips:
                raise Overlong(
                    f"{n} tokens > max_seq_len={self.max_seq_len} (overlong: drop, or a speech "
                    "sample: its clip and target are never cut apart)"
                )
            cut, kept = self._cut(enc["input_ids"], counts)
            if cut == 0:
                raise Overlong(f"its first image alone ({counts[0]} tokens) exceeds max_seq_len")
            enc = {k: v[:cut] for k, v in enc.items()}
            images, counts, truncated = images[:kept], counts[:kept], 1
            if not bool((enc["labels"][1:] != -100).any()):  # label 0 is masked when packed
                raise Overlong(f"no target token left after cutting to max_seq_len={cut}")
        if not bool((enc["labels"] != -100).any()):
            log.debug("sample %s has no target token", sample.get("__key__"))
        return {
            **enc,
            "images": images,
            "image_tokens": counts,
            "audio": clips,
            "key": sample["__key__"],
            "truncated": truncated,
        }

    def _tokens(self, width: int, height: int) -> int:
        if self.pre.tokens_for_grid is None:
            return 1
        return self.pre.policy.num_tokens(width, height, self.pre.tokens_for_grid)

    def _cut(self, ids: torch.Tensor, counts: list[int]) -> tuple[int, int]:
        """Where to cut to ``max_seq_len`` without splitting an image, and images kept."""
        cut = self.max_seq_len
        pos = (ids == self.pre.image_token_id).nonzero().squeeze(1).tolist()
        start = 0
        for i, c in enumerate(counts):
            first, last = pos[start], pos[start + c - 1]
            if last >= cut:
                return (min(cut, first), i)
            start += c
        return cut, len(counts)


def _drop_placeholders(messages: list[dict[str, str]], keep: int) -> list[dict[str, str]]:
    """Remove the ``<image>`` placeholders after the first ``keep``."""
    out, seen = [], 0
    for m in messages:
        pieces = str(m["content"]).split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            text += (IMAGE_PLACEHOLDER if seen < keep else "") + piece
            seen += 1
        out.append({**m, "content": text})
    return out
