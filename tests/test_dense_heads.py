"""Dense heads: rotated IoU vs shapely, rotated NMS, pyramid shapes, heads built from smp and
torchvision pieces, the oriented head's assignment and loss."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mmpt.models.dense.instance import MaskRCNNHead
from mmpt.models.dense.pyramid import SimpleFeaturePyramid, pyramid_features, tower_pyramid
from mmpt.models.dense.rotated import RotatedFCOSHead
from mmpt.models.dense.rotated_ops import (
    batched_rotated_nms,
    normalize_obb,
    obb_to_corners,
    polygon_to_obb,
    rotated_iou,
    rotated_nms,
)
from mmpt.models.dense.semseg import UPerNetHead
from mmpt.models.encoders import TimmVisionTower

TOWER = dict(
    model_name="vit_tiny_patch16_224",
    image_size=32,
    embed_dim=0,
    feature_layer=-1,
    model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (several fight over a shared CPU, ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.tensor([0.0, 0.0, 1.0, 1.0, -math.pi])
    span = torch.tensor([20.0, 20.0, 12.0, 12.0, 2 * math.pi])
    return torch.rand(n, 5, generator=g, dtype=torch.float64) * span + low


def test_rotated_iou_equals_shapely_polygons() -> None:
    from shapely.geometry import Polygon

    a, b = _random_boxes(40, 0), _random_boxes(30, 1)
    ours = rotated_iou(a, b).numpy()
    pa = [Polygon(c) for c in obb_to_corners(a).tolist()]
    pb = [Polygon(c) for c in obb_to_corners(b).tolist()]
    ref = np.array([[p.intersection(q).area / p.union(q).area for q in pb] for p in pa])
    assert (ref > 0.05).sum() > 50  # many overlapping pairs, not only disjoint ones
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_rotated_iou_hand_cases() -> None:
    square = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    turned = torch.tensor([[0.0, 0.0, 2.0, 2.0, math.pi / 4]])  # octagon overlap
    shifted = torch.tensor([[1.0, 0.0, 2.0, 2.0, 0.0]])  # half overlap: 2 / 6
    inter = 8 * (math.sqrt(2) - 1)  # regular octagon of the square and its 45-degree turn
    assert rotated_iou(square, turned).item() == pytest.approx(inter / (8 - inter), abs=1e-5)
    assert rotated_iou(square, shifted).item() == pytest.approx(1 / 3, abs=1e-6)
    assert rotated_iou(square, square).item() == pytest.approx(1.0, abs=1e-6)
    # a half turn is the same box
    assert rotated_iou(turned, turned + torch.tensor([0, 0, 0, 0, math.pi])).item() == (
        pytest.approx(1.0, abs=1e-5)
    )


def test_normalize_and_polygon_to_obb() -> None:
    box = normalize_obb(torch.tensor([1.0, 2.0, 2.0, 6.0, 0.3]))
    assert box[2] >= box[3] and -math.pi / 2 <= box[4] < math.pi / 2
    assert rotated_iou(box[None], torch.tensor([[1.0, 2.0, 2.0, 6.0, 0.3]])).item() > 0.9999
    cx, cy, w, h, a = polygon_to_obb([[0, 0], [4, 0], [4, 2], [0, 2]])
    assert (cx, cy, w, h) == pytest.approx((2, 1, 4, 2)) and a == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no area"):
        polygon_to_obb([[0, 0], [1, 1], [2, 2]])


def test_rotated_nms_keeps_best_of_overlapping_and_classes_apart() -> None:
    boxes = torch.tensor([[10.0, 10, 8, 4, 0.1], [10.5, 10, 8, 4, 0.12], [30, 30, 8, 4, 0.0]])
    scores = torch.tensor([0.5, 0.9, 0.3])
    assert rotated_nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert batched_rotated_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 0, 2]


def test_simple_feature_pyramid_strides() -> None:
    for patch, dim in ((8, 32), (16, 64)):
        pyramid = SimpleFeaturePyramid(dim, patch, out_channels=16)
        grid = (64 // patch, 64 // patch)
        maps = pyramid(torch.randn(2, grid[0] * grid[1], dim), grid)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="power of two"):
        SimpleFeaturePyramid(32, 12, strides=(4, 8))


def test_pyramid_on_an_mmpt_tower() -> None:
    tower = TimmVisionTower(**TOWER)
    pyramid = tower_pyramid(tower, 16, (4, 8, 16, 32))
    maps = pyramid_features(tower, pyramid, torch.randn(2, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="no patch tokens"):
        tower_pyramid(torch.nn.Linear(2, 2), 16, (4,))


def _feats(b: int = 2, c: int = 16, size: int = 64) -> list[torch.Tensor]:
    return [torch.randn(b, c, size // s, size // s) for s in (4, 8, 16, 32)]


def test_upernet_head_is_smp_decoder() -> None:
    from segmentation_models_pytorch.base import SegmentationHead
    from segmentation_models_pytorch.decoders.upernet.decoder import PSPModule, UPerNetDecoder

    head = UPerNetHead(5, in_channels=16, channels=16)
    assert isinstance(head.decoder, UPerNetDecoder) and isinstance(head.decoder.psp, PSPModule)
    assert isinstance(head.classifier, SegmentationHead)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())  # groupnorm
    logits = head(_feats(1), (64, 64))  # one sample trains (GroupNorm, not BatchNorm)
    assert logits.shape == (1, 5, 64, 64)
    masks = torch.full((1, 64, 64), 255)
    masks[0, :8] = 2
    loss = head.loss(logits, masks)
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(
            logits[0, :, :8].reshape(5, -1).t(), masks[0, :8].flatten()
        ).item(),
        rel=1e-5,
    )


def test_mask_rcnn_head_is_torchvision() -> None:
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    head = MaskRCNNHead(
        2,
        in_channels=16,
        anchor_sizes=(8, 16, 32, 64),
        representation_size=32,
        mask_channels=8,
        rpn_pre_nms_top_n=(50, 50),
        rpn_post_nms_top_n=(20, 20),
    )
    assert isinstance(head.rpn, RegionProposalNetwork) and isinstance(head.roi_heads, RoIHeads)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 4:20, 6:30] = 1
    targets = [
        {"boxes": torch.tensor([[6.0, 4, 30, 20]]), "labels": torch.tensor([1]), "masks": masks},
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
        },
    ]
    losses = head.train()(_feats(), (64, 64), targets)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    sum(losses.values()).backward()
    dets = head.eval()(_feats(), (64, 64))
    assert dets[0]["masks"].shape[1:] == (64, 64)
    assert bool((dets[0]["labels"] >= 0).all() & (dets[0]["labels"] < 2).all())


def test_rotated_head_assigns_small_and_large_boxes_and_learns() -> None:
    torch.manual_seed(0)
    head = RotatedFCOSHead(2, in_channels=16, num_convs=1, score_thresh=0.2)
    feats = [torch.nn.Parameter(f) for f in _feats(1)]
    boxes = torch.tensor([[20.0, 20, 6, 3, 0.4], [40, 44, 40, 20, -0.7]])
    target = [{"boxes": boxes, "labels": torch.tensor([0, 1])}]
    cls, reg, ctr, points, strides, lo, hi = head._flat(head(feats))
    idx, centre = head.assign(points, strides, lo, hi, boxes)
    assert (idx == 0).any() and (idx == 1).any()  # a 6 px box still gets a location
    assert set(strides[idx == 0].tolist()) == {4.0} and set(strides[idx == 1].tolist()) == {8.0}
    assert bool((centre[idx >= 0] > 0).all() & (centre[idx >= 0] <= 1).all())
    opt = torch.optim.Adam([*head.parameters(), *feats], lr=1e-2)
    first = None
    for _ in range(60):
        loss = sum(head.loss(head(feats), target).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    det = head.predict(head(feats))[0]
    best = rotated_iou(det["boxes"], boxes).max(dim=0).values
    assert bool((best > 0.5).all()), best
