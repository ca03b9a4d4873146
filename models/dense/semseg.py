"""Semantic segmentation head: segmentation_models_pytorch's UPerNet decoder on a pyramid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Mask value of pixels without a label (no loss, not counted by mIoU).
IGNORE_INDEX = 255


def _batchnorm_to_groupnorm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``GroupNorm`` of up to 32 groups.

    Each group holds at least two channels, so a single sample's 1x1 pooled map still has
    several values per group.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            groups = max(1, min(32, c // 2))
            while c % groups:
                groups -= 1
            setattr(module, name, nn.GroupNorm(groups, c))
        else:
            _batchnorm_to_groupnorm(child)


class UPerNetHead(nn.Module):
    """UPerNet (Xiao et al., 2018) over pyramid maps: PPM on the coarsest, FPN fusion, classifier.

    The decoder is smp's ``UPerNetDecoder`` (PSP pooling 1, 2, 3, 6), fed the
    pyramid as its strides 4..32 features; smp's ``SegmentationHead`` classifies its stride-4
    output, upsampled bilinearly to the input size.

    Args:
        num_classes: Semantic classes K (mask values 0..K-1; :data:`IGNORE_INDEX` ignored).
        in_channels: Channels of every pyramid level.
        channels: Decoder width (UPerNet: 256; MTP, Wang et al. 2024, likewise).
        num_levels: Pyramid levels, finest (stride 4) first.
        ignore_index: Mask value without loss.
        norm: Normalisation of the decoder convolutions: ``groupnorm`` (default; smp's
            BatchNorm layers swapped for GroupNorm, up to 32 groups of >= 2 channels; right for
            any number of samples per step), ``batchnorm`` (UPerNet's; SyncBN in MTP; fails in
            training on a step with a single segmentation sample: the 1x1 pooled map then has
            one value per channel) or ``identity``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        channels: int = 256,
        num_levels: int = 4,
        ignore_index: int = IGNORE_INDEX,
        norm: str = "groupnorm",
    ) -> None:
        super().__init__()
        from segmentation_models_pytorch.base import SegmentationHead
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        if num_classes < 1:
            raise ValueError(f"semseg num_classes must be >= 1, got {num_classes}")
        if norm not in ("groupnorm", "batchnorm", "identity"):
            raise ValueError(f"semseg norm must be groupnorm, batchnorm or identity, got {norm!r}")
        self.num_classes, self.in_channels, self.ignore_index = (
            num_classes,
            in_channels,
            ignore_index,
        )
        # smp skips the first two (stride 1 and 2) features of its encoder list
        self.decoder = UPerNetDecoder(
            [in_channels] * (num_levels + 2),
            encoder_depth=num_levels + 1,
            decoder_channels=channels,
            use_norm="identity" if norm == "identity" else "batchnorm",
        )
        if norm == "groupnorm":
            _batchnorm_to_groupnorm(self.decoder)
        self.classifier = SegmentationHead(channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Class logits.

        Args:
            features: Pyramid maps (B, C, H / s, W / s), finest first.
            size: (H, W) of the input images.

        Returns:
            (B, K, H, W) logits.
        """
        x = self.classifier(self.decoder([features[0], features[0], *features]))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pixel cross-entropy of (B, K, H, W) logits against (B, H, W) long masks."""
        if bool((masks != self.ignore_index).any()):
            return F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        return logits.sum() * 0.0  # every pixel ignored: no loss, but the graph stays whole


__all__ = ["IGNORE_INDEX", "UPerNetHead"]
