"""Reply likelihood under a VLM: prompt rows rendered as in training, right-padded, one forward.

``mmpt eval choice --by likelihood`` scores each option as the assistant's reply;
``mmpt data score --kind vlm`` builds its rows with the same two helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from mmpt.batch import VLMBatch
    from mmpt.datamodules.resolution import ImageCrops
    from mmpt.datamodules.templates import Template
    from mmpt.generate import Generator
    from mmpt.preprocess import VLMPreprocess


def render_row(
    pre: VLMPreprocess,
    template: Template,
    system: str | None,
    prompt: str,
    crops: Sequence[ImageCrops],
    reply: str | None = None,
) -> dict[str, torch.Tensor]:
    """One row: the user ``prompt`` with an ``<image>`` per crop, then the assistant's turn.

    With ``reply`` the turn is rendered as a training sample's (the reply's tokens and its
    end-of-turn are the targets); without, the row ends with the assistant prefix, where a
    generation starts (the ids :meth:`Generator.encode` gives).

    Returns:
        ``input_ids`` (L,) and ``labels`` (L,) long (-100 off the reply).

    Raises:
        ValueError: The prompt's ``<image>`` placeholders are not one per crop.
    """
    from mmpt.datamodules.templates import Segment, encode
    from mmpt.generate import prompt_content

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt_content(prompt, len(crops), 0)})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    segments = template.render(messages, pre.eos)
    if reply is None:
        segments.append(Segment(template.assistant_prefix, False))
    counts = [pre.image_tokens(c) for c in crops]
    return encode([s for s in segments if s.text], pre.tokenizer, pre.image_token_id, counts)


def padded_batch(
    rows: Sequence[dict[str, Any]], crops: Sequence[ImageCrops], pad_id: int, left: bool = False
) -> VLMBatch:
    """Padded rows, each its own attention segment (its padding is one more), on the CPU.

    Args:
        rows: :func:`render_row` outputs (R of them).
        crops: The images of every row, in row order (pixels stay uint8: normalise them on
            the device, as the training datamodule does).
        pad_id: Padding token id.
        left: Pad on the left, so every row ends at the last position (positions restart at
            0 where the row starts); default right padding.

    Returns:
        A :class:`VLMBatch` of (R, L) rows, L the longest row.
    """
    from mmpt.batch import VLMBatch
    from mmpt.datamodules.vlm_batching import group_crops

    n, length = len(rows), max(int(r["input_ids"].shape[0]) for r in rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    positions = torch.arange(length).repeat(n, 1)
    cuts = [0]
    for i, r in enumerate(rows):
        size = int(r["input_ids"].shape[0])
        at = slice(length - size, length) if left else slice(0, size)
        ids[i, at], labels[i, at] = r["input_ids"], r["labels"]
        if left:
            positions[i, at] = torch.arange(size)
            cuts += ([i * length + length - size] if size < length else []) + [(i + 1) * length]
        else:
            cuts += [i * length + size] + ([(i + 1) * length] if size < length else [])
    pixels, layouts = group_crops(list(crops))
    return VLMBatch(
        input_ids=ids,
        labels=labels,
        position_ids=positions,
        cu_seqlens=torch.tensor(cuts, dtype=torch.int32),
        max_seqlen=length,
        pixels=pixels,
        images=layouts,
        num_samples=n,
    )


@torch.no_grad()
def option_logprobs(
    gen: Generator, prompt: str, image: Image.Image, answers: Sequence[str]
) -> list[float]:
    """Log-likelihood of each answer as the assistant's reply to ``prompt`` about ``image``.

    Each answer is rendered as a training sample is (the template's assistant turn and its
    end-of-turn token), one row per answer, and its target tokens' log-probabilities summed.

    Returns:
        One float per answer (sum over its answer tokens of log p).
    """
    from mmpt.datamodules.transforms import normalize_images

    pre, model = gen.pre, gen.model
    crop = pre.policy(image.convert("RGB"))
    rows = [render_row(pre, gen.template, gen.system, prompt, [crop], a) for a in answers]
    batch = padded_batch(rows, [crop] * len(rows), pre.pad_id)
    dev, dtype = gen.device, next(model.vision.parameters()).dtype
    batch.input_ids, batch.labels = batch.input_ids.to(dev), batch.labels.to(dev)
    batch.position_ids, batch.cu_seqlens = batch.position_ids.to(dev), batch.cu_seqlens.to(dev)
    batch.pixels = [
        normalize_images(p, pre.image.mean, pre.image.std).to(dev, dtype) for p in batch.pixels
    ]
    logits = model(batch).logits.float()[:, :-1]
    target = batch.labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (logp * (target != -100)).sum(-1).tolist()
