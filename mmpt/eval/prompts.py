"""Prompt templates of the VLM benchmarks: one per set, stored in the set's ``index.json`` meta.

An eval set's meta holds ``prompt``, the user turn after the image: a caption prompt, or a
template with ``{question}`` (VQA) or ``{hint}``, ``{question}`` and ``{options}`` (multiple
choice). The defaults are LLaVA-1.5's evaluation prompts; the synthetic sets use plain ones
whose words the synthetic tokenizer knows, the same the synthetic SFT data trains on.
"""

from __future__ import annotations

from collections.abc import Mapping

COCO_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
"""LLaVA-1.5's (and lmms-eval's) COCO/NoCaps caption prompt."""
VQA_SHORT_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's VQAv2/GQA/TextVQA prompt."""
CHOICE_LETTER_TEMPLATE = (
    "{hint}{question}\n{options}\nAnswer with the option's letter from the given choices directly."
)
"""LLaVA-1.5's MMBench/SEED/ScienceQA prompt."""
SYNTH_CAPTION_PROMPT = "Describe the image ."
"""The synthetic sets' caption prompt (the quickstart's ``caption_prompt``)."""
PLAIN_VQA_TEMPLATE = "{question}"
PLAIN_CHOICE_TEMPLATE = "{hint}{question}\n{options}"

DEFAULT_PROMPTS: dict[str, str] = {
    "caption": COCO_CAPTION_PROMPT,
    "vqa": VQA_SHORT_TEMPLATE,
    "choice": CHOICE_LETTER_TEMPLATE,
}
"""The prompt of each task when a set's meta names none."""


def format_options(options: Mapping[str, str]) -> str:
    """Options as lines ``"A. text"``, in the mapping's order.

    Args:
        options: ``{letter: text}``.

    Returns:
        The lines joined by newlines.
    """
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def vqa_prompt(question: str, template: str = VQA_SHORT_TEMPLATE) -> str:
    """The user turn of a VQA question.

    Args:
        question: The question.
        template: A template with ``{question}``.

    Returns:
        The filled template.
    """
    return template.format(question=question.strip())


def choice_prompt(
    question: str,
    options: Mapping[str, str],
    hint: str | None = None,
    template: str = CHOICE_LETTER_TEMPLATE,
) -> str:
    """The user turn of a multiple-choice question.

    Args:
        question: The question.
        options: ``{letter: text}``.
        hint: Context shown before the question (MMBench's ``hint``), or None.
        template: A template with ``{hint}``, ``{question}`` and ``{options}``.

    Returns:
        The filled template (a hint is followed by a newline).
    """
    lead = f"{hint.strip()}\n" if hint and hint.strip() else ""
    return template.format(hint=lead, question=question.strip(), options=format_options(options))
