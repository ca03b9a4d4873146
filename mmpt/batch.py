"""Typed batches: the only objects that cross from datamodules to models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageTextBatch:
    """A collated batch of images with one or more captions each.

    Captions are flattened: ``text_tokens`` holds every caption of every image in the batch,
    and ``text_to_image`` says which image (row of ``images``) each caption belongs to. In
    training each image has exactly one caption, so ``text_to_image == arange(B)``.

    Attributes:
        images: (B, C, H, W) uint8 pixels as produced by the workers; the datamodule turns them
            into normalised float32 on the device (``on_after_batch_transfer``).
        text_tokens: Long tensor (M, L) of token ids, M >= B.
        text_to_image: Long tensor (M,), index into ``images`` for each caption.
        keys: The ``__key__`` of each image sample, length B.
        labels: Optional long tensor (B,) of class ids (for zero-shot classification), -1 when
            a sample has no label.
        skipped: Samples the producing worker dropped as corrupt or incomplete since its
            previous batch (summed and logged as ``data/skipped``).
    """

    images: torch.Tensor
    text_tokens: torch.Tensor
    text_to_image: torch.Tensor
    keys: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_texts(self) -> int:
        """Number of captions M in the batch."""
        return self.text_tokens.shape[0]
