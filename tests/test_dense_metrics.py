"""Dense metrics on hand-worked cases: mIoU, VOC AP, DOTA-style rotated mAP, COCO mask AP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpt.eval.dense_metrics import SegmentationMeter, mask_ap, rotated_map, voc_ap


def test_miou_hand_case() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 1, 1]]])
    meter = SegmentationMeter(4)
    meter.update(pred, target)
    out = meter.compute()
    # class 0: tp 1, fp 1 (pixel of 2), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 1/2
    assert out["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(out["iou"][3])  # absent from both: not in the mean
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["acc"] == pytest.approx(4 / 6)


def test_voc_ap_hand_case() -> None:
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 11-point: recall >= 0..0.5 -> 1.0 (6 points), 0.6..1.0 -> 2/3 (5 points)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_rotated_map_hand_case() -> None:
    gt = [
        {
            "boxes": torch.tensor([[10.0, 10, 8, 4, 0.0], [30, 30, 8, 4, 0.5]]),
            "labels": torch.tensor([0, 0]),
            "difficult": torch.tensor([False, False]),
        },
        {
            "boxes": torch.tensor([[20.0, 20, 12, 4, 0.0], [5, 5, 4, 2, 0]]),
            "labels": torch.tensor([1, 0]),
            "difficult": torch.tensor([False, True]),
        },
    ]
    det = [
        {
            "boxes": torch.tensor(
                [[10.0, 10, 8, 4, 0.0], [10.2, 10, 8, 4, 0.0], [50, 50, 4, 4, 0]]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([0, 0, 0]),
        },
        {
            "boxes": torch.tensor([[20.0, 20, 12, 4, 0.3], [5, 5, 4, 2, 0]]),
            "scores": torch.tensor([0.6, 0.95]),
            "labels": torch.tensor([1, 0]),
        },
    ]
    out = rotated_map(det, gt, num_classes=2, use_07_metric=False)
    # class 0 (difficult match ignored): TP 0.9, FP 0.8 (duplicate), FP 0.7; recall 1/2 at
    # precision 1 -> AP 0.5. Class 1: the turned box overlaps 0.64 > 0.5 -> AP 1.
    assert out["ap"] == pytest.approx([0.5, 1.0])
    assert out["map"] == pytest.approx(0.75)
    strict = rotated_map(det, gt, num_classes=2, iou_threshold=0.7, use_07_metric=False)
    assert strict["ap"][1] == 0.0


def test_mask_ap_hand_case() -> None:
    m = torch.zeros(2, 20, 20, dtype=torch.uint8)
    m[0, 2:10, 2:10] = 1
    m[1, 12:18, 12:18] = 1
    gt = [{"masks": m, "labels": torch.tensor([0, 1])}]
    perfect = [
        {"masks": m.float(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    ]
    assert mask_ap(perfect, gt, 2)["mask_ap"] == pytest.approx(1.0)
    swapped = [
        {"masks": m.float(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 0])}
    ]
    assert mask_ap(swapped, gt, 2)["mask_ap"] == 0.0
    half = m.clone().float()
    half[0, 2:10, 6:10] = 0  # IoU 0.5 with its mask: counts at 0.5 only
    out = mask_ap(
        [{"masks": half, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}], gt, 2
    )
    assert out["mask_ap50"] == pytest.approx(1.0) and out["mask_ap75"] == pytest.approx(0.5)
    assert (
        mask_ap(
            [
                {
                    "masks": torch.zeros(0, 20, 20),
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.long),
                }
            ],
            gt,
            2,
        )["mask_ap"]
        == 0.0
    )
