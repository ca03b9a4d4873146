"""Option likelihood for multiple choice: each answer's log-probability as the assistant's reply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

    from mmpt.generate import Generator


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
    from mmpt.batch import VLMBatch
    from mmpt.datamodules.templates import encode
    from mmpt.datamodules.transforms import normalize_images
    from mmpt.datamodules.vlm_batching import group_crops
    from mmpt.generate import prompt_content

    pre, model = gen.pre, gen.model
    crop = pre.policy(image.convert("RGB"))
    content = prompt_content(prompt, 1, 0)
    rows = []
    for answer in answers:
        messages = [{"role": "system", "content": gen.system}] if gen.system else []
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        segments = gen.template.render(messages, pre.eos)
        rows.append(encode(segments, pre.tokenizer, pre.image_token_id, [pre.image_tokens(crop)]))
    n, length = len(rows), max(int(r["input_ids"].shape[0]) for r in rows)
    ids = torch.full((n, length), pre.pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    cuts = [0]
    for i, r in enumerate(rows):
        size = int(r["input_ids"].shape[0])
        ids[i, :size], labels[i, :size] = r["input_ids"], r["labels"]
        cuts += [i * length + size] + ([(i + 1) * length] if size < length else [])
    pixels, layouts = group_crops([crop] * n)
    dev, dtype = gen.device, next(model.vision.parameters()).dtype
    batch = VLMBatch(
        input_ids=ids.to(dev),
        labels=labels.to(dev),
        position_ids=torch.arange(length, device=dev).expand(n, length),
        cu_seqlens=torch.tensor(cuts, dtype=torch.int32, device=dev),
        max_seqlen=length,
        pixels=[normalize_images(p, pre.image.mean, pre.image.std).to(dev, dtype) for p in pixels],
        images=layouts,
        num_samples=n,
    )
    logits = model(batch).logits.float()[:, :-1]
    target = labels[:, 1:].to(dev)
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (logp * (target != -100)).sum(-1).tolist()
