"""Prompt templates and tokenisation for VLM samples: text segments -> ids + masked labels.

A sample is a list of messages ``{"role": ..., "content": ...}``. Roles:

- ``system`` / ``user``: context, never a training target;
- ``assistant``: the target (labels on its content and its end-of-turn marker);
- ``text``: raw text (an interleaved document, a caption in pretraining, text-only data),
  a target with no chat markers in every template.

``<image>`` and ``<audio>`` placeholders may appear in any content; each expands to its
image's or clip's token count and is never a target. A template turns messages into
:class:`Segment` s; :func:`encode` tokenises them piece by piece, so label masks follow
segment boundaries exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmpt.datamodules.packing import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
ROLES = ("system", "user", "assistant", "text")


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered sample: its text and whether its tokens are targets."""

    text: str
    target: bool


@dataclass(frozen=True)
class Template:
    """A conversation format given by the strings around each role's content.

    Attributes:
        name: Registry name, quoted in errors.
        bos: Text put before the whole sample (e.g. Llama 3's ``<|begin_of_text|>``).
        system: Format of a system turn, ``{}`` = content.
        user: Format of a user turn.
        assistant_prefix: Text opening an assistant turn (not a target).
        assistant_suffix: Text closing it (a target: the model must learn to stop); ``{eos}``
            is the tokenizer's end-of-sequence token.
        turn_sep: Text after an assistant turn (not a target).
    """

    name: str
    bos: str = ""
    system: str = "{}\n"
    user: str = "{}\n"
    assistant_prefix: str = ""
    assistant_suffix: str = "{eos}"
    turn_sep: str = ""

    def render(self, messages: Sequence[dict[str, str]], eos: str) -> list[Segment]:
        """Messages -> segments (empty strings dropped).

        Raises:
            ValueError: An unknown role, or a message without string content.
        """
        out = [Segment(self.bos, False)]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(
                    f"message {i} must have role in {ROLES} and string content, got {msg!r}"
                )
            if role == "text":
                out.append(Segment(content + eos, True))
            elif role == "assistant":
                out += [
                    Segment(self.assistant_prefix, False),
                    Segment(content + self.assistant_suffix.format(eos=eos), True),
                    Segment(self.turn_sep, False),
                ]
            else:
                out.append(Segment(getattr(self, role).format(content), False))
        return [s for s in out if s.text]


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # LLaVA/VILA stage-1 "plain": the prompt (the image) then the caption, no markers.
        Template("plain"),
        # Qwen / ChatML.
        Template(
            "chatml",
            system="<|im_start|>system\n{}<|im_end|>\n",
            user="<|im_start|>user\n{}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            assistant_suffix="<|im_end|>",
            turn_sep="\n",
        ),
        Template(
            "llama3",
            bos="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_suffix="<|eot_id|>",
        ),
        # LLaVA v1 / Vicuna.
        Template("vicuna", system="{} ", user="USER: {} ", assistant_prefix="ASSISTANT: "),
    )
}


def get_template(name: str, field: str = "data.template") -> Template:
    """The template registered as ``name``.

    Raises:
        ValueError: Unknown name (lists the known ones and the flag to set).
    """
    if name not in TEMPLATES:
        raise ValueError(f"{field}: unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def encode(
    segments: Sequence[Segment],
    tokenizer: Any,
    image_token_id: int | None,
    image_tokens: Sequence[int],
    audio_token_id: int | None = None,
    audio_tokens: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """Tokenise rendered segments, expanding placeholders into runs of media token ids.

    The i-th ``<image>`` becomes ``image_tokens[i]`` copies of ``image_token_id`` and the i-th
    ``<audio>`` ``audio_tokens[i]`` copies of ``audio_token_id``. Text between placeholders is
    tokenised without special tokens (the template spells them).

    Args:
        segments: Output of ``Template.render``.
        tokenizer: HF tokenizer.
        image_token_id: Id that marks image positions; None for a model without images
            (``<image>`` is then plain text).
        image_tokens: Token count of each image, in order of appearance.
        audio_token_id: Id that marks audio positions; None for a model without audio
            (``<audio>`` is then plain text).
        audio_tokens: Token count of each audio clip, in order of appearance.

    Returns:
        ``input_ids`` (L,) and ``labels`` (L,) long; labels are the ids on target text and
        -100 elsewhere (prompts, markers, media tokens).

    Raises:
        ValueError: A placeholder count differs from its list of token counts.
    """
    # a placeholder of a modality the model lacks (token id None) is plain text
    media = {
        placeholder: (token_id, list(counts))
        for placeholder, token_id, counts in (
            (IMAGE_PLACEHOLDER, image_token_id, image_tokens),
            (AUDIO_PLACEHOLDER, audio_token_id, audio_tokens),
        )
        if token_id is not None or counts
    }
    split = re.compile("(" + "|".join(map(re.escape, media)) + ")") if media else None
    for placeholder, (_, counts) in media.items():
        found = sum(seg.text.count(placeholder) for seg in segments)
        if found != len(counts):
            kind = "images" if placeholder == IMAGE_PLACEHOLDER else "audio clips"
            raise ValueError(
                f"sample has {found} {placeholder} placeholders for {len(counts)} {kind}"
            )
    ids: list[int] = []
    labels: list[int] = []
    used = dict.fromkeys(media, 0)
    for seg in segments:
        for piece in split.split(seg.text) if split else [seg.text]:
            if piece in media:
                token_id, counts = media[piece]
                n = counts[used[piece]]
                used[piece] += 1
                ids += [int(token_id)] * n  # type: ignore[arg-type]
                labels += [IGNORE_INDEX] * n
            elif piece:
                toks = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                labels += toks if seg.target else [IGNORE_INDEX] * len(toks)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def check_targets(labels: torch.Tensor, template: str) -> None:
    """Fail loudly on a batch with no target token (it would train on a loss of 0.0).

    Args:
        labels: (B, T) labels, -100 = ignored.
        template: The data template's name, quoted in the error.

    Raises:
        ValueError: Every label is -100.
    """
    if not bool((labels != IGNORE_INDEX).any()):
        raise ValueError(
            f"every label in this batch is masked (-100), so the loss would be 0.0: with "
            f"data.template={template!r} only assistant/text turns are targets. Check that "
            "the samples have assistant turns (or captions), that the template matches the "
            "tokenizer's chat format, and that max_seq_len does not cut the targets off"
        )


def stop_token_ids(tokenizer: Any, template: str | None) -> list[int]:
    """Ids that end a reply: EOS, and the template's end-of-turn token when it is one token.

    Chat templates close an assistant turn with their own marker (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``), which is what the model learned to emit. Used by generation
    and by the LLaVA export's ``generation_config``, so both stop on the same tokens.

    Raises:
        ValueError: An unknown template name.
    """
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if template is not None:
        suffix = get_template(template, "--template").assistant_suffix
        end = suffix.format(eos=tokenizer.eos_token or "")
        ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(int(ids[0]))
    return stops
