"""Instance segmentation head: torchvision's Mask R-CNN RPN and RoI heads on a feature pyramid."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class MaskRCNNHead(nn.Module):
    """Mask R-CNN (He et al., 2017) heads from torchvision on pyramid maps.

    torchvision's ``RegionProposalNetwork`` (``AnchorGenerator``, ``RPNHead``) proposes boxes,
    ``RoIHeads`` with ``MultiScaleRoIAlign``, ``TwoMLPHead``, ``FastRCNNPredictor``,
    ``MaskRCNNHeads`` and ``MaskRCNNPredictor`` classify, refine and segment them; only the
    backbone (the pyramid) differs from ``torchvision.models.detection.MaskRCNN``. One anchor
    size per level.

    Args:
        num_classes: Object classes K, without background (targets' labels 0..K-1).
        in_channels: Channels of every pyramid level.
        anchor_sizes: Anchor side per level in pixels, finest first (torchvision: 32..512).
        aspect_ratios: Anchor aspect ratios at every level.
        rpn_pre_nms_top_n: Proposals per level before NMS (training, testing).
        rpn_post_nms_top_n: Proposals kept after NMS (training, testing).
        rpn_batch_size_per_image: Anchors sampled per image for the RPN loss.
        box_batch_size_per_image: Proposals sampled per image for the box and mask losses.
        box_score_thresh: Minimum score of a returned detection.
        box_detections_per_img: Detections returned per image.
        representation_size: Width of the box head's two MLP layers.
        mask_channels: Width of the four mask-head convolutions.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
        rpn_post_nms_top_n: tuple[int, int] = (2000, 1000),
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_detections_per_img: int = 100,
        representation_size: int = 1024,
        mask_channels: int = 256,
    ) -> None:
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        if num_classes < 1:
            raise ValueError(f"instance num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.names = [str(i) for i in range(len(anchor_sizes))]
        anchors = AnchorGenerator(
            tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes)
        )
        train_pre, test_pre = rpn_pre_nms_top_n
        train_post, test_post = rpn_post_nms_top_n
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(in_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": train_pre, "testing": test_pre},
            post_nms_top_n={"training": train_post, "testing": test_post},
            nms_thresh=0.7,
        )
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(self.names, output_size=7, sampling_ratio=2),
            TwoMLPHead(in_channels * 7 * 7, representation_size),
            FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=box_score_thresh,
            nms_thresh=0.5,
            detections_per_img=box_detections_per_img,
            mask_roi_pool=MultiScaleRoIAlign(self.names, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(in_channels, (mask_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
        )

    def forward(
        self,
        features: list[torch.Tensor],
        size: tuple[int, int],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses (training) or detections (eval).

        Args:
            features: Pyramid maps (B, C, H / s, W / s), finest first, one per anchor size.
            size: (H, W) of the input images.
            targets: Training only: per image ``boxes`` (M, 4) xyxy, ``labels`` (M,) in 0..K-1,
                ``masks`` (M, H, W) uint8.

        Returns:
            Training: torchvision's loss dict (``loss_objectness``, ``loss_rpn_box_reg``,
            ``loss_classifier``, ``loss_box_reg``, ``loss_mask``). Eval: per image ``boxes``
            (N, 4), ``labels`` (N,) in 0..K-1, ``scores`` (N,), ``masks`` (N, H, W) float
            mask probabilities pasted into the image.
        """
        from torchvision.models.detection.image_list import ImageList
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        if len(features) != len(self.names):
            raise ValueError(f"got {len(features)} pyramid levels for {len(self.names)} anchors")
        b = features[0].shape[0]
        feats = OrderedDict(zip(self.names, features, strict=True))
        images = ImageList(features[0].new_empty((b, 0, *size)), [tuple(size)] * b)
        if self.training:
            if targets is None:
                raise ValueError("MaskRCNNHead needs targets in training mode")
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]  # 0 is background
        proposals, rpn_losses = self.rpn(images, feats, targets)
        detections, roi_losses = self.roi_heads(feats, proposals, images.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        for det in detections:
            det["labels"] = det["labels"] - 1
            det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], tuple(size))[:, 0]
        return detections


__all__ = ["MaskRCNNHead"]
