"""Word-level tokenizer covering every word the synthetic generators and VLM prompts emit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

#: Special tokens of the synthetic tokenizer, ids 0-6 in this order. Each is one token, matched
#: even when glued to text.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")
#: Texts of the VLM prompts and chat templates (roles, separators, turn numbers).
PROMPT_TEXTS = (
    "Describe the image .",
    "user",
    "assistant",
    "system",
    "USER",
    "ASSISTANT",
    ":",
    *"0123456789",
)
_ROLES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def synth_texts() -> Iterator[str]:
    """Every distinct text the synthetic generators can emit, then :data:`PROMPT_TEXTS`.

    Yields:
        Captions of all 192 combinations in both phrasings, the zero-shot prompts (every
        template filled with every class name), the interleaved intro and filler sentences,
        the video narrations of all 180 (colour, shape, action) combinations in both
        phrasings, the video noun and verb names, and the audio captions and continuations
        of all 512 tone combinations with their zero-shot prompts, and the questions,
        answers and options of the synthetic eval sets and QA data.

    """
    # imported here: the generators import this module to write their tokenizer
    from mmpt.synth import audio_text
    from mmpt.synth.image_eval import qa_texts
    from mmpt.synth.image_text import (
        CLASSNAMES,
        NUM_COMBOS,
        TEMPLATES,
        captions_for,
        combo_attributes,
    )
    from mmpt.synth.interleaved import FILLER_SENTENCES, INTRO_SENTENCES
    from mmpt.synth.video_text import COMBOS, NOUNS, VERBS, narrations_for

    for combo in range(NUM_COMBOS):
        yield from captions_for(combo_attributes(combo))
    for template in TEMPLATES:
        yield from (template.format(name) for name in CLASSNAMES)
    yield from INTRO_SENTENCES
    yield from FILLER_SENTENCES
    for color, shape, action in COMBOS:
        yield from narrations_for(color, shape, action)
    yield from NOUNS
    yield from VERBS
    for combo in range(audio_text.NUM_COMBOS):
        yield from audio_text.texts_for(audio_text.combo_attributes(combo))
    for template in audio_text.TEMPLATES:
        yield from (template.format(name) for name in audio_text.CLASSNAMES)
    yield from qa_texts()
    yield from PROMPT_TEXTS


def synth_vocabulary() -> list[str]:
    r"""Sorted words of :func:`synth_texts`, split exactly as the tokenizer's pre-tokenizer does.

    Returns:
        Distinct ``Whitespace`` pre-tokenizer pieces (``\w+|[^\w\s]+``), sorted by code point;
        no special tokens.

    """
    from tokenizers.pre_tokenizers import Whitespace

    split = Whitespace()
    return sorted({piece for text in synth_texts() for piece, _ in split.pre_tokenize_str(text)})


def write_word_tokenizer(
    path: str | Path, words: Sequence[str], special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Path:
    """Save a WordLevel tokenizer (``Whitespace`` pre-tokenizer) loadable by ``AutoTokenizer``.

    Ids follow ``special_tokens`` (those not already in ``words``), then ``words``, in order;
    repeats keep their first id. Each special token is one id and is matched even glued to
    text (``"<|im_start|>user"`` -> two ids). ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``
    become the pad, unk, bos and eos tokens when listed; the other specials become extra
    special tokens. No token is added around encoded text. Same arguments, same bytes.

    Args:
        path: Folder to write (``save_pretrained``); created if missing.
        words: Vocabulary words, each a single pre-tokenizer piece (others never match).
        special_tokens: Tokens never split; must include ``<unk>``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``<unk>`` is not among ``special_tokens``.

    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if "<unk>" not in special_tokens:
        raise ValueError(f"special_tokens must include '<unk>', got {list(special_tokens)}")
    order = dict.fromkeys([*(t for t in special_tokens if t not in words), *words])
    raw = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(order)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    roles = {role: tok for role, tok in _ROLES.items() if tok in special_tokens}
    extra = [t for t in special_tokens if t not in _ROLES.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, extra_special_tokens=extra, **roles)
    path = Path(path)
    tok.save_pretrained(str(path))
    return path


def write_synth_tokenizer(path: str | Path) -> Path:
    """Write the tokenizer over :func:`synth_vocabulary` and :data:`SPECIAL_TOKENS` to ``path``.

    Returns:
        ``path`` as a ``Path``; ``AutoTokenizer.from_pretrained(path)`` loads it.

    """
    return write_word_tokenizer(path, synth_vocabulary())
