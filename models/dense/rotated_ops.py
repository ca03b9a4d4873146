"""Oriented boxes ``(cx, cy, w, h, angle)``: corners, rotated IoU by polygon clipping, rotated NMS.

Angles are in radians, counter-clockwise in image coordinates (x right, y down, so a positive
angle turns the box's width axis from +x towards +y). The canonical form is long-edge:
``w >= h`` and ``angle`` in [-pi/2, pi/2) (a box is the same under a half turn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_EPS = 1e-9


def normalize_obb(boxes: torch.Tensor) -> torch.Tensor:
    """Long-edge form of oriented boxes: ``w >= h``, angle in [-pi/2, pi/2).

    Args:
        boxes: (..., 5) ``(cx, cy, w, h, angle)``.

    Returns:
        (..., 5) the same boxes in canonical form.
    """
    cx, cy, w, h, a = boxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    a = torch.where(swap, a + math.pi / 2, a)
    a = torch.remainder(a + math.pi / 2, math.pi) - math.pi / 2
    return torch.stack([cx, cy, w, h, a], dim=-1)


def obb_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Corners of oriented boxes, in order around the box.

    Args:
        boxes: (..., 5) ``(cx, cy, w, h, angle)``.

    Returns:
        (..., 4, 2) corner ``(x, y)``.
    """
    cx, cy, w, h, a = boxes.unbind(-1)
    cos, sin = a.cos(), a.sin()
    lx = torch.stack([-w, w, w, -w], dim=-1) / 2
    ly = torch.stack([-h, -h, h, h], dim=-1) / 2
    x = cx[..., None] + lx * cos[..., None] - ly * sin[..., None]
    y = cy[..., None] + lx * sin[..., None] + ly * cos[..., None]
    return torch.stack([x, y], dim=-1)


def polygon_to_obb(points: Sequence[Sequence[float]]) -> tuple[float, float, float, float, float]:
    """The minimum-area oriented box around a polygon (a DOTA quadrilateral, an instance outline).

    Args:
        points: (N, 2) polygon vertices ``(x, y)``, N >= 3.

    Returns:
        ``(cx, cy, w, h, angle)`` in long-edge form (shapely's minimum rotated rectangle).

    Raises:
        ValueError: Fewer than three points or a degenerate (zero-area) polygon.
    """
    from shapely.geometry import MultiPoint

    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    rect = MultiPoint([tuple(map(float, p)) for p in points]).minimum_rotated_rectangle
    if rect.geom_type != "Polygon" or rect.area <= 0:
        raise ValueError(f"degenerate polygon {list(points)}: it has no area")
    (x0, y0), (x1, y1), (x2, y2) = list(rect.exterior.coords)[:3]
    w, h = math.hypot(x1 - x0, y1 - y0), math.hypot(x2 - x1, y2 - y1)
    angle = math.atan2(y1 - y0, x1 - x0)
    c = rect.centroid
    box = normalize_obb(torch.tensor([c.x, c.y, w, h, angle], dtype=torch.float64))
    return tuple(float(v) for v in box)  # type: ignore[return-value]


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Whether points (..., P, 2) lie in the rectangles (..., 4, 2) (border included)."""
    origin = corners[..., :1, :]
    ab, ad = corners[..., 1:2, :] - origin, corners[..., 3:4, :] - origin
    ap = points - origin
    pab, pad = (ap * ab).sum(-1), (ap * ad).sum(-1)
    tol = 1e-6 * (ab * ab).sum(-1).clamp(min=1)
    return (
        (pab >= -tol)
        & (pab <= (ab * ab).sum(-1) + tol)
        & (pad >= -tol)
        & (pad <= (ad * ad).sum(-1) + tol)
    )


def _edge_crossings(ca: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crossing points of every edge of ``ca`` with every edge of ``cb`` (..., 16, 2) + valid."""
    p, r = ca[..., :, None, :], (ca.roll(-1, dims=-2) - ca)[..., :, None, :]
    q, s = cb[..., None, :, :], (cb.roll(-1, dims=-2) - cb)[..., None, :, :]
    denom = _cross(r, s)
    safe = torch.where(denom.abs() > _EPS, denom, torch.ones_like(denom))
    t, u = _cross(q - p, s) / safe, _cross(q - p, r) / safe
    valid = (denom.abs() > _EPS) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    pts = p + t[..., None] * r
    return pts.flatten(-3, -2), valid.flatten(-2)


def intersection_area(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Area of the intersection of convex quadrilaterals given by their corners.

    The intersection polygon's vertices are the corners of each inside the other and the edge
    crossings; sorted by angle around their mean, the shoelace formula gives the area.

    Args:
        ca, cb: (..., 4, 2) corners in order around each quadrilateral (broadcastable).

    Returns:
        (...) intersection areas.
    """
    ca, cb = torch.broadcast_tensors(ca, cb)
    cross_pts, cross_ok = _edge_crossings(ca, cb)
    pts = torch.cat([ca, cb, cross_pts], dim=-2)  # (..., 24, 2)
    valid = torch.cat([_inside(ca, cb), _inside(cb, ca), cross_ok], dim=-1)
    count = valid.sum(-1)
    w = valid.to(pts.dtype)[..., None]
    center = (pts * w).sum(-2) / count.clamp(min=1)[..., None].to(pts.dtype)
    rel = pts - center[..., None, :]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones last
    order = angle.argsort(dim=-1)
    rel = rel.gather(-2, order[..., None].expand_as(rel))
    ok = valid.gather(-1, order)
    rel = torch.where(ok[..., None], rel, rel[..., :1, :])  # invalid -> first vertex: no area
    area = 0.5 * _cross(rel, rel.roll(-1, dims=-2)).sum(-1).abs()
    return torch.where(count >= 3, area, torch.zeros_like(area))


def rotated_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Pairwise IoU of oriented boxes (exact, by polygon intersection).

    Args:
        boxes1: (N, 5) ``(cx, cy, w, h, angle)``.
        boxes2: (M, 5).
        chunk: Pairs computed at a time (bounds memory).

    Returns:
        (N, M) IoU in [0, 1].
    """
    n, m = boxes1.shape[0], boxes2.shape[0]
    out = boxes1.new_zeros((n, m))
    if n == 0 or m == 0:
        return out
    c1, c2 = obb_to_corners(boxes1.double()), obb_to_corners(boxes2.double())
    area1 = (boxes1[:, 2] * boxes1[:, 3]).double()
    area2 = (boxes2[:, 2] * boxes2[:, 3]).double()
    rows = max(1, chunk // m)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        inter = intersection_area(c1[sl, None], c2[None])
        union = area1[sl, None] + area2[None] - inter
        out[sl] = (inter / union.clamp(min=_EPS)).clamp(0, 1).to(out.dtype)
    return out


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of oriented boxes.

    Args:
        boxes: (N, 5) ``(cx, cy, w, h, angle)``.
        scores: (N,) scores.
        iou_threshold: A box is dropped when its rotated IoU with a kept, higher-scoring box
            exceeds this.

    Returns:
        (K,) long indices of the kept boxes, by decreasing score.
    """
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    iou = rotated_iou(boxes[order], boxes[order]).cpu()
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_rotated_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Rotated NMS within each class (boxes of different classes never suppress each other).

    Args:
        boxes: (N, 5) oriented boxes.
        scores: (N,) scores.
        labels: (N,) class ids.
        iou_threshold: See :func:`rotated_nms`.

    Returns:
        (K,) long indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    extent = (boxes[:, :2].abs().max() + boxes[:, 2:4].max()).item() * 2 + 1
    shifted = boxes.clone()
    shifted[:, :2] += labels.to(boxes.dtype)[:, None] * extent
    return rotated_nms(shifted, scores, iou_threshold)


__all__ = [
    "batched_rotated_nms",
    "intersection_area",
    "normalize_obb",
    "obb_to_corners",
    "polygon_to_obb",
    "rotated_iou",
    "rotated_nms",
]
