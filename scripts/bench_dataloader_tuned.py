"""The tuned WebDataset baseline of ``bench_dataloader.py``: what a careful user writes by hand.

Per sample in the workers: ``Image.draft`` (libjpeg decodes at the largest 1/2^k scale that
still covers the target on both sides), torchvision's ``RandomResizedCrop.get_params`` for the
crop (scale 0.9-1.0, aspect 3/4-4/3, as open_clip), and one fused ``Image.resize(box=...)``
(bicubic) to a uint8 array. Per batch: one tokenizer call for all captions, then the uint8
images become one torch tensor. Normalisation to float happens in the main process, as in
mmpt. No mmpt code is used.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision.transforms import RandomResizedCrop

SCALE, RATIO = (0.9, 1.0), (3 / 4, 4 / 3)


def crop_resize(data: bytes, size: int) -> np.ndarray:
    """Draft-decode a JPEG, take a random resized crop in one resize; (size, size, 3) uint8."""
    img = Image.open(io.BytesIO(data))
    full_w, full_h = img.size
    img.draft("RGB", (size, size))  # no-op for non-JPEGs; keeps both sides >= size
    img = img.convert("RGB")
    top, left, h, w = RandomResizedCrop.get_params(img, list(SCALE), list(RATIO))
    box = (left, top, left + w, top + h)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))


def tuned_loader(urls: list[str], size: int, bs: int, workers: int, buf: int) -> Any:
    """WebLoader yielding (uint8 (B, 3, S, S), int64 (B, 77)) batches."""
    tokenizer = SimpleTokenizer()

    def to_pair(sample: dict[str, Any]) -> tuple[np.ndarray, str]:
        data = next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample)
        return crop_resize(data, size), sample["txt"].decode("utf-8")

    def collate(pairs: list[tuple[np.ndarray, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
        return images, tokenizer([p[1] for p in pairs])

    def has_caption_and_image(sample: dict[str, Any]) -> bool:
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=buf, initial=buf),
        wds.select(has_caption_and_image),
        wds.map(to_pair, handler=wds.warn_and_continue),
        wds.batched(bs, collation_fn=collate, partial=False),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised with the given mean and std (0-1 units)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s
