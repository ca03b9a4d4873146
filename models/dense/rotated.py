"""Oriented object detection head: anchor-free (FCOS-style) on a feature pyramid.

Every pyramid location predicts class scores, a centre offset, log width and height (in units
of its stride), the box angle as ``(cos 2a, sin 2a)`` (continuous over the half-turn symmetry of
long-edge boxes) and a centre-ness. Tian et al., "FCOS" (2019) with the rotated-box regression
of FCOS-R/Rotated FCOS (mmrotate); losses: sigmoid focal (classes), smooth L1 (centre, size),
L1 (angle vector), BCE (centre-ness).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.models.dense.rotated_ops import batched_rotated_nms, normalize_obb


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(32, channels), channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class RotatedFCOSHead(nn.Module):
    """Anchor-free oriented-box detector head shared over pyramid levels.

    Assignment: a location of level l is positive for a box when the box's long side lies in
    the level's size range ``(size_ranges[l-1], size_ranges[l]]`` and the location lies in the
    box within ``center_radius`` strides of its centre, or within 0.75 stride of the centre (so
    a box smaller than a stride still gets a location); a location claimed by several boxes
    takes the smallest.

    Args:
        num_classes: Object classes K (labels 0..K-1).
        in_channels: Channels of every pyramid level.
        strides: Level strides in pixels, finest first.
        size_ranges: Upper long-side limit of each level but the last (default ``8 * stride``).
        num_convs: Convolutions in each of the classification and regression towers.
        center_radius: Centre-sampling radius, in strides.
        score_thresh: Minimum score (class probability x centre-ness) of a detection.
        nms_thresh: Rotated-IoU threshold of the per-class NMS (DOTA practice: 0.1).
        pre_nms_top_k: Candidates kept per level before NMS.
        max_detections: Detections returned per image.
        focal_alpha, focal_gamma: Sigmoid focal loss parameters.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
        size_ranges: Sequence[float] | None = None,
        num_convs: int = 4,
        center_radius: float = 1.5,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.1,
        pre_nms_top_k: int = 1000,
        max_detections: int = 100,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"rotated num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.strides = tuple(int(s) for s in strides)
        upper = list(size_ranges) if size_ranges is not None else [8 * s for s in strides[:-1]]
        if len(upper) != len(self.strides) - 1:
            raise ValueError(f"size_ranges needs {len(self.strides) - 1} limits, got {upper}")
        self.ranges = list(zip([0.0, *upper], [*upper, math.inf], strict=True))
        self.center_radius, self.score_thresh, self.nms_thresh = (
            center_radius,
            score_thresh,
            nms_thresh,
        )
        self.pre_nms_top_k, self.max_detections = pre_nms_top_k, max_detections
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_tower, self.reg_tower = (
            _tower(in_channels, num_convs),
            _tower(in_channels, num_convs),
        )
        self.cls_out = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(in_channels, 6, 3, padding=1)  # dx, dy, log w, log h, cos, sin
        self.ctr_out = nn.Conv2d(in_channels, 1, 3, padding=1)
        for conv in (self.cls_out, self.reg_out, self.ctr_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01

    def forward(self, features: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Raw outputs per level: cls (B, K, h, w), reg (B, 6, h, w), centre-ness (B, 1, h, w)."""
        if len(features) != len(self.strides):
            raise ValueError(f"got {len(features)} pyramid levels for strides {self.strides}")
        out = []
        for x in features:
            reg = self.reg_tower(x)
            out.append((self.cls_out(self.cls_tower(x)), self.reg_out(reg), self.ctr_out(reg)))
        return out

    def _flat(self, outputs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Outputs of all levels as (B, P, .) plus location centres (P, 2), strides, ranges."""
        cls, reg, ctr, points, strides, lo, hi = [], [], [], [], [], [], []
        for (c, r, t), stride, (low, high) in zip(outputs, self.strides, self.ranges, strict=True):
            h, w = c.shape[-2:]
            ys, xs = torch.meshgrid(
                torch.arange(h, device=c.device), torch.arange(w, device=c.device), indexing="ij"
            )
            pts = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride
            cls.append(c.flatten(2).transpose(1, 2))
            reg.append(r.flatten(2).transpose(1, 2))
            ctr.append(t.flatten(2).transpose(1, 2)[..., 0])
            points.append(pts)
            n = pts.shape[0]
            strides.append(pts.new_full((n,), float(stride)))
            lo.append(pts.new_full((n,), low))
            hi.append(pts.new_full((n,), high))
        cat = torch.cat
        return (cat(cls, 1), cat(reg, 1), cat(ctr, 1), cat(points), cat(strides), cat(lo), cat(hi))

    def assign(
        self,
        points: torch.Tensor,
        strides: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        boxes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box index of each location (-1: negative) and its centre-ness target.

        Args:
            points: (P, 2) location centres; strides, lo, hi: (P,) each.
            boxes: (M, 5) ground-truth oriented boxes.

        Returns:
            (P,) long box index or -1; (P,) centre-ness target in (0, 1].
        """
        p = points.shape[0]
        if boxes.numel() == 0:
            return points.new_full((p,), -1, dtype=torch.long), points.new_zeros(p)
        rel = points[:, None] - boxes[None, :, :2]  # (P, M, 2)
        cos, sin = boxes[:, 4].cos(), boxes[:, 4].sin()
        u = rel[..., 0] * cos + rel[..., 1] * sin
        v = -rel[..., 0] * sin + rel[..., 1] * cos
        half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
        inside = (u.abs() <= half_w) & (v.abs() <= half_h)
        dist = rel.norm(dim=-1)
        near = dist < 0.75 * strides[:, None]
        central = dist <= self.center_radius * strides[:, None]
        side = boxes[:, 2:4].max(dim=1).values
        level_ok = (side[None] > lo[:, None]) & (side[None] <= hi[:, None])
        cand = level_ok & ((inside & central) | near)
        area = (boxes[:, 2] * boxes[:, 3])[None].expand(p, -1)
        area = torch.where(cand, area, torch.full_like(area, math.inf))
        best = area.argmin(dim=1)
        pos = cand.any(dim=1)
        idx = torch.where(pos, best, torch.full_like(best, -1))
        uu, vv = u.gather(1, best[:, None])[:, 0], v.gather(1, best[:, None])[:, 0]
        ctr = torch.exp(-((uu / half_w[best]) ** 2 + (vv / half_h[best]) ** 2))
        return idx, ctr

    def loss(
        self, outputs: list[tuple[torch.Tensor, ...]], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            outputs: :meth:`forward` of a batch of B images.
            targets: Per image ``boxes`` (M, 5) oriented boxes, ``labels`` (M,) in 0..K-1.

        Returns:
            ``loss_rcls`` (focal, per positive), ``loss_rbox`` (centre, size and angle),
            ``loss_rctr`` (centre-ness BCE).
        """
        from torchvision.ops import sigmoid_focal_loss

        cls, reg, ctr, points, strides, lo, hi = self._flat(outputs)
        cls_t, reg_t, ctr_t, pos_mask = [], [], [], []
        for t in targets:
            boxes = normalize_obb(t["boxes"].to(points).reshape(-1, 5))
            idx, centre = self.assign(points, strides, lo, hi, boxes)
            pos = idx >= 0
            onehot = torch.zeros(points.shape[0], self.num_classes, device=points.device)
            if bool(pos.any()):
                onehot[pos, t["labels"].to(points.device)[idx[pos]]] = 1.0
            if boxes.shape[0] == 0:  # no object: every location negative
                boxes = boxes.new_tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
            b = boxes[idx.clamp(min=0)]
            target = torch.stack(
                [
                    (b[:, 0] - points[:, 0]) / strides,
                    (b[:, 1] - points[:, 1]) / strides,
                    (b[:, 2] / strides).clamp(min=1e-3).log(),
                    (b[:, 3] / strides).clamp(min=1e-3).log(),
                    (2 * b[:, 4]).cos(),
                    (2 * b[:, 4]).sin(),
                ],
                dim=-1,
            )
            cls_t.append(onehot)
            reg_t.append(target)
            ctr_t.append(centre)
            pos_mask.append(pos)
        cls_t, reg_t = torch.stack(cls_t), torch.stack(reg_t)
        ctr_t, pos = torch.stack(ctr_t), torch.stack(pos_mask)
        num_pos = max(1.0, float(pos.sum()))
        loss_cls = sigmoid_focal_loss(
            cls, cls_t.to(cls.dtype), self.focal_alpha, self.focal_gamma, reduction="sum"
        )
        if not bool(pos.any()):
            zero = (reg.sum() + ctr.sum()) * 0.0
            return {"loss_rcls": loss_cls / num_pos, "loss_rbox": zero, "loss_rctr": zero}
        r, rt = reg[pos], reg_t[pos].to(reg.dtype)
        loss_box = F.smooth_l1_loss(r[:, :4], rt[:, :4], beta=1 / 9, reduction="sum")
        loss_box = loss_box + F.l1_loss(r[:, 4:], rt[:, 4:], reduction="sum")
        loss_ctr = F.binary_cross_entropy_with_logits(
            ctr[pos], ctr_t[pos].to(ctr.dtype), reduction="sum"
        )
        return {
            "loss_rcls": loss_cls / num_pos,
            "loss_rbox": loss_box / num_pos,
            "loss_rctr": loss_ctr / num_pos,
        }

    @torch.no_grad()
    def predict(self, outputs: list[tuple[torch.Tensor, ...]]) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` (N, 5) long-edge, ``scores`` (N,), ``labels`` (N,)."""
        results = []
        b = outputs[0][0].shape[0]
        for i in range(b):
            boxes, scores, labels = [], [], []
            for (c, r, t), stride in zip(outputs, self.strides, strict=True):
                h, w = c.shape[-2:]
                prob = (c[i].sigmoid() * t[i].sigmoid()).flatten(1).t()  # (h*w, K)
                flat = prob.flatten()
                keep = flat > self.score_thresh
                vals, idx = flat[keep], keep.nonzero()[:, 0]
                if vals.numel() > self.pre_nms_top_k:
                    vals, top = vals.topk(self.pre_nms_top_k)
                    idx = idx[top]
                loc, cls_id = idx // self.num_classes, idx % self.num_classes
                ys, xs = loc // w, loc % w
                rr = r[i].flatten(1).t()[loc]
                cx = (xs.float() + 0.5 + rr[:, 0]) * stride
                cy = (ys.float() + 0.5 + rr[:, 1]) * stride
                bw, bh = (
                    rr[:, 2].clamp(max=10).exp() * stride,
                    rr[:, 3].clamp(max=10).exp() * stride,
                )
                angle = 0.5 * torch.atan2(rr[:, 5], rr[:, 4])
                boxes.append(torch.stack([cx, cy, bw, bh, angle], -1))
                scores.append(vals)
                labels.append(cls_id)
            boxes_, scores_, labels_ = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_rotated_nms(boxes_, scores_, labels_, self.nms_thresh)
            keep = keep[: self.max_detections]
            results.append(
                {
                    "boxes": normalize_obb(boxes_[keep].float()),
                    "scores": scores_[keep].float(),
                    "labels": labels_[keep],
                }
            )
        return results


__all__ = ["RotatedFCOSHead"]
