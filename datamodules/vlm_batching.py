"""Packed VLM batches: samples -> rows (online FFD packing or padding) -> :class:`VLMBatch`.

Images travel undecoded through packing (their token counts come from the header); the collate
function decodes the images of the rows it emits and groups crops by size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from mmpt.batch import ImageLayout, VLMBatch
from mmpt.datamodules.audio import pad_audio
from mmpt.datamodules.decode import decode_image
from mmpt.datamodules.packing import collate_packed, pack_row, pack_stream
from mmpt.datamodules.resolution import ImageCrops, header_size
from mmpt.datamodules.stages import batched
from mmpt.preprocess import VLMPreprocess

log = logging.getLogger("mmpt.data")


class PackedBatcher:
    """Samples -> lists of rows: online FFD packing into ``max_seq_len`` rows, or padding.

    Args:
        max_seq_len: Row length when packing.
        pad_id: Padding id.
        rows: Rows per batch (packing) or samples per batch (no packing).
        packing: Pack several samples per row; False pads each sample to the batch's longest.
        buffer_size: Samples the packer looks at together.
        min_fill: Fill a row needs to leave the buffer before the stream ends.
        partial: Keep a last short batch.
    """

    def __init__(
        self,
        max_seq_len: int,
        pad_id: int,
        rows: int,
        packing: bool = True,
        buffer_size: int = 256,
        min_fill: float = 0.95,
        partial: bool = True,
    ) -> None:
        self.max_seq_len, self.pad_id, self.rows, self.packing = max_seq_len, pad_id, rows, packing
        self.buffer_size, self.min_fill, self.partial = buffer_size, min_fill, partial

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Yield lists of ``pack_row`` rows."""
        if self.packing:
            rows = pack_stream(
                samples,
                self.max_seq_len,
                self.pad_id,
                self.buffer_size,
                "drop",
                min_fill=self.min_fill,
            )
            yield from batched(rows, self.rows, self.partial)
            return
        for group in batched(samples, self.rows, self.partial):
            longest = max(int(s["input_ids"].shape[0]) for s in group)
            yield [pack_row([s], longest, self.pad_id) for s in group]


class VLMCollate:
    """Rows -> :class:`VLMBatch`: decode the rows' images, group crops by size, pad clips.

    Picklable.

    An image that fails to decode becomes a black image of its header size (its tokens are
    already in the row) and is counted in ``skipped``.
    """

    def __init__(self, preprocess: VLMPreprocess, template: str) -> None:
        self.pre, self.template = preprocess, template

    def __call__(self, rows: list[dict[str, Any]]) -> VLMBatch:
        """Collate packed rows (see ``collate_packed``) and their images."""
        packed = collate_packed(rows)
        all_crops, failed = [], 0
        for images, counts in zip(packed["images"], packed["image_tokens"], strict=True):
            for data, count in zip(images, counts, strict=True):
                try:
                    img = decode_image(data)
                except Exception as e:  # noqa: BLE001 - keep the row; count the bad image
                    log.warning("image failed to decode (%s); using a black image", e)
                    img, failed = Image.new("RGB", header_size(data)), failed + 1
                crops = self.pre.policy(img)
                if self.pre.image_tokens(crops) != count:
                    raise RuntimeError(
                        f"resolution policy {type(self.pre.policy).__name__} gave "
                        f"{self.pre.image_tokens(crops)} tokens for an image it budgeted "
                        f"{count} for: its num_tokens() disagrees with its crops"
                    )
                all_crops.append(crops)
        pixels, layouts = group_crops(all_crops)
        clips = [c for per_sample in packed.get("audio", []) for c in per_sample]
        audio, audio_lengths = pad_audio(clips) if clips else (None, None)
        return VLMBatch(
            audio=audio,
            audio_lengths=audio_lengths,
            input_ids=packed["input_ids"],
            labels=packed["labels"],
            position_ids=packed["position_ids"],
            cu_seqlens=packed["cu_seqlens"],
            max_seqlen=packed["max_seqlen"],
            pixels=pixels,
            images=layouts,
            keys=packed["key"],
            template=self.template,
            num_samples=packed["num_samples"],
            num_real_tokens=packed["num_real_tokens"],
            num_truncated=sum(packed["truncated"]),
            skipped=failed + packed["num_dropped"],
        )


def group_crops(images: list[ImageCrops]) -> tuple[list[torch.Tensor], list[ImageLayout]]:
    """Stack the crops of several images by size and record where each image's crops went.

    Args:
        images: Each image's ``ImageCrops`` (a resolution policy's output), in token order.

    Returns:
        ``pixels``: one (n_g, 3, H_g, W_g) tensor per distinct crop size, and one
        :class:`ImageLayout` per image (``VLMBatch.pixels`` / ``VLMBatch.images``).
    """
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    layouts = []
    for crops in images:
        refs = []
        for crop in crops.pixels:
            group = groups.setdefault(tuple(crop.shape[1:]), [])
            refs.append((list(groups).index(tuple(crop.shape[1:])), len(group)))
            group.append(crop)
        grids = list(crops.grids)
        layouts.append(
            ImageLayout(refs, grids, crops.row_end_tokens, crops.tiles, crops.global_view)
        )
    return [torch.stack(g) for g in groups.values()], layouts
