"""The transformers processor of an exported VLM: image processor, tokenizer, chat template.

The chat template is written from the mmpt data template the model trained with
(:mod:`mmpt.datamodules.templates`), so ``apply_chat_template`` renders exactly the text the
model saw in training.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import CLIPImageProcessor, LlavaProcessor

from mmpt.datamodules.templates import Template, get_template

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.export")

#: The data side's default template (``VLMDataModule.template``).
DEFAULT_TEMPLATE = "plain"


def _expr(text: str) -> str:
    """A Jinja expression for ``text``, each ``{eos}`` in it the tokenizer's EOS token."""
    return " ~ eos_token ~ ".join(json.dumps(p) for p in text.split("{eos}"))


def _around(fmt: str) -> tuple[str, str]:
    """The Jinja expressions before and after ``{}`` in a role format string."""
    before, _, after = fmt.partition("{}")
    return _expr(before), _expr(after)


def chat_template(template: Template, image_token: str = "<image>") -> str:
    """A Jinja chat template that renders messages as ``template`` does in training.

    Message content is a string (``<image>`` placeholders inline) or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items; a list renders as its
    image tokens, a newline when text follows, then the texts joined by spaces, which is where
    the data side puts the images of a conversation that names none. ``text`` messages (raw
    text, pretraining captions) end with the EOS token; ``add_generation_prompt`` opens an
    assistant turn.

    Args:
        template: The data template.
        image_token: The image placeholder.

    Returns:
        The Jinja source.
    """
    sys_pre, sys_post = _around(template.system)
    user_pre, user_post = _around(template.user)
    return (
        "{%- macro body(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
        "{%- set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
        "{%- set texts = m['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | list -%}"
        f"{{{{ {json.dumps(image_token)} * n }}}}"
        '{{ "\\n" if n and texts else "" }}{{ texts | join(" ") }}'
        "{%- endif -%}{%- endmacro -%}"
        f"{{{{ {_expr(template.bos)} }}}}"
        "{%- for m in messages -%}"
        f"{{%- if m['role'] == 'system' -%}}{{{{ {sys_pre} ~ body(m) ~ {sys_post} }}}}"
        f"{{%- elif m['role'] == 'user' -%}}{{{{ {user_pre} ~ body(m) ~ {user_post} }}}}"
        "{%- elif m['role'] == 'assistant' -%}"
        f"{{{{ {_expr(template.assistant_prefix)} ~ body(m) ~ "
        f"{_expr(template.assistant_suffix)} ~ {_expr(template.turn_sep)} }}}}"
        "{%- elif m['role'] == 'text' -%}{{ body(m) ~ eos_token }}"
        "{%- else -%}{{ raise_exception('unknown role: ' ~ m['role']) }}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {_expr(template.assistant_prefix)} }}}}"
        "{%- endif -%}"
    )


def resolve_chat_template(model: VLMModule, template: str | None) -> str:
    """The chat template to export: the trained one, else the tokenizer's, else ``plain``.

    Raises:
        ValueError: ``template`` is not a known data template.
    """
    tok = model.llm.tokenizer
    image_token = model.llm.image_token
    if template is not None:
        source = chat_template(get_template(template, "--template"), image_token)
        if tok.chat_template and tok.chat_template != source:
            log.warning(
                "the tokenizer's own chat template is replaced by the %r template the model "
                "trained with",
                template,
            )
        return source
    if tok.chat_template:
        return tok.chat_template
    log.warning(
        "no --template given and the tokenizer has no chat template: exporting the %r "
        "template (the data default); pass the data.template the model trained with",
        DEFAULT_TEMPLATE,
    )
    return chat_template(get_template(DEFAULT_TEMPLATE), image_token)


def tokenizer_as_trained(tokenizer: Any) -> Any:
    """The tokenizer, or a copy that adds no special tokens itself: as mmpt encoded in training.

    mmpt tokenises without special tokens (the template writes the BOS it wants), but a
    Llama-style tokenizer adds BOS on every plain call, which ``processor(text=...)`` makes;
    its copy gets ``add_bos_token``/``add_eos_token`` off (the change is logged).

    Raises:
        ValueError: The tokenizer adds special tokens and cannot be told not to.
    """

    def adds(tok: Any) -> bool:
        return tok("a b")["input_ids"] != tok("a b", add_special_tokens=False)["input_ids"]

    if not adds(tokenizer):
        return tokenizer
    plain = copy.deepcopy(tokenizer)
    if hasattr(plain, "update_post_processor"):
        plain.add_bos_token, plain.add_eos_token = False, False
    if adds(plain):
        raise ValueError(
            f"{type(tokenizer).__name__} adds special tokens to every text and cannot be "
            "told not to; the model trained without them, so its processor would not match"
        )
    log.warning(
        "the exported tokenizer adds no BOS/EOS by itself (the model trained without them; "
        "the chat template writes what a sample starts with)"
    )
    return plain


def save_llava_processor(
    model: VLMModule, out: Path, template: str | None, select_strategy: str
) -> LlavaProcessor:
    """Write a ``LlavaProcessor`` matching the model's training preprocessing to ``out``.

    The image processor keeps the centred square of the short side at the tower's size
    (bicubic), as ``FixedResolution`` does, then rescales by 1/255 and normalises with the
    tower's mean/std. Square images give the training pixels exactly; for others transformers
    resizes the short side before cropping where mmpt crops first, so pixels differ slightly
    (mean |difference| 0.0009 in normalised units on a smooth 61x40 image; squashing: 0.019).

    Args:
        model: The exported VLMModule (HF vision tower, fixed resolution).
        out: The export folder.
        template: The data template the model trained with (see
            :func:`resolve_chat_template`).
        select_strategy: The model's ``vision_feature_select_strategy``: ``default`` for a
            CLIP tower (one class token, dropped), ``full`` for SigLIP (no class token).

    Returns:
        The saved processor.
    """
    pre = model.vision.image_preprocess
    images = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": pre.size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": pre.size, "width": pre.size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer_as_trained(model.llm.tokenizer),
        patch_size=int(model.vision.patch_size),
        vision_feature_select_strategy=select_strategy,
        chat_template=resolve_chat_template(model, template),
        image_token=model.llm.image_token,
        num_additional_image_tokens=int(select_strategy == "default"),
    )
    processor.save_pretrained(str(out))
    return processor
