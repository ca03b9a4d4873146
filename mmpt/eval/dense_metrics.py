"""Dense-prediction metrics: mIoU, COCO mask AP (pycocotools) and DOTA-style rotated mAP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class SegmentationMeter:
    """Confusion matrix over batches of (B, H, W) label maps -> mIoU and per-class IoU.

    Args:
        num_classes: Classes K (labels 0..K-1).
        ignore_index: Target value not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add (B, H, W) predicted and true class maps (long)."""
        keep = target != self.ignore_index
        k = self.num_classes
        idx = target[keep].long().cpu() * k + pred[keep].long().cpu()
        self.confusion += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Any]:
        """mIoU, per-class IoU and pixel accuracy of the pixels seen so far.

        Returns:
            ``miou`` (mean over classes present in targets or predictions), ``iou`` per class
            (NaN when absent from both), pixel accuracy ``acc``.
        """
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        present = ~iou.isnan()
        miou = float(iou[present].mean()) if bool(present.any()) else 0.0
        acc = float(tp.sum() / cm.sum().clamp(min=1))
        return {"miou": miou, "iou": [float(v) for v in iou], "acc": acc}


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """Average precision of a precision/recall curve, as the VOC devkit computes it.

    Args:
        recall: (N,) cumulative recall, increasing.
        precision: (N,) precision at each point.
        use_07_metric: VOC2007 11-point interpolation (the DOTA devkit's default); False:
            area under the monotone precision envelope (VOC2010+).
    """
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t].max() if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def rotated_map(
    detections: Sequence[dict[str, torch.Tensor]],
    ground_truths: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> dict[str, Any]:
    """DOTA task-1 mAP of oriented boxes (the devkit's ``voc_eval`` rules).

    Per class, detections of all images by decreasing score: one whose best-overlapping ground
    truth (rotated IoU) exceeds ``iou_threshold`` is a true positive unless that box was taken
    already (then a false positive); a match with a ``difficult`` box counts as neither, and
    difficult boxes are not in the recall.

    Args:
        detections: Per image ``boxes`` (N, 5), ``scores`` (N,), ``labels`` (N,).
        ground_truths: Per image ``boxes`` (M, 5), ``labels`` (M,), optional ``difficult`` (M,).
        num_classes: Classes K (labels 0..K-1).
        iou_threshold: Match threshold (DOTA: 0.5).
        use_07_metric: See :func:`voc_ap`.

    Returns:
        ``map`` (mean over classes with ground truth) and ``ap`` per class (NaN without).
    """
    from mmpt.models.dense.rotated_ops import rotated_iou

    aps: list[float] = []
    for k in range(num_classes):
        records, npos = [], 0
        for img, (det, gt) in enumerate(zip(detections, ground_truths, strict=True)):
            gsel = gt["labels"] == k
            gboxes = gt["boxes"].reshape(-1, 5)[gsel].float()
            diff = gt.get("difficult", torch.zeros_like(gt["labels"], dtype=torch.bool))[gsel]
            npos += int((~diff.bool()).sum())
            dsel = det["labels"] == k
            dboxes, dscores = det["boxes"].reshape(-1, 5)[dsel].float(), det["scores"][dsel]
            iou = rotated_iou(dboxes, gboxes)
            for j in range(dboxes.shape[0]):
                records.append((float(dscores[j]), img, iou[j], diff.bool()))
        if npos == 0:
            aps.append(math.nan)
            continue
        records.sort(key=lambda r: -r[0])
        taken: dict[int, set[int]] = {}
        tp, fp = np.zeros(len(records)), np.zeros(len(records))
        for d, (_, img, iou, diff) in enumerate(records):
            if iou.numel() == 0 or float(iou.max()) <= iou_threshold:
                fp[d] = 1
                continue
            g = int(iou.argmax())
            if bool(diff[g]):
                continue
            if g in taken.setdefault(img, set()):
                fp[d] = 1
            else:
                taken[img].add(g)
                tp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(voc_ap(recall, precision, use_07_metric) if len(records) else 0.0)
    valid = [a for a in aps if not math.isnan(a)]
    return {"map": float(np.mean(valid)) if valid else 0.0, "ap": aps}


def mask_ap(
    detections: Sequence[dict[str, torch.Tensor]],
    ground_truths: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
) -> dict[str, float]:
    """COCO mask AP of instance predictions, computed by pycocotools' ``COCOeval`` (segm).

    Args:
        detections: Per image ``masks`` (N, H, W) (probabilities or 0/1; > 0.5 is the mask),
            ``scores`` (N,), ``labels`` (N,) in 0..K-1.
        ground_truths: Per image ``masks`` (M, H, W) 0/1 and ``labels`` (M,).
        num_classes: Classes K.

    Returns:
        ``mask_ap`` (AP@[.5:.95]), ``mask_ap50``, ``mask_ap75`` in [0, 1]; 0 without
        detections.
    """
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m: torch.Tensor) -> dict:
        out = mask_utils.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
        out["counts"] = out["counts"].decode("ascii")
        return out

    images, anns, results = [], [], []
    for img, (det, gt) in enumerate(zip(detections, ground_truths, strict=True)):
        h, w = gt["masks"].shape[-2:]
        images.append({"id": img, "height": int(h), "width": int(w)})
        for m, label in zip(gt["masks"], gt["labels"], strict=True):
            seg = rle(m > 0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": int(label),
                    "segmentation": seg,
                    "area": float(mask_utils.area(seg)),
                    "bbox": list(map(float, mask_utils.toBbox(seg))),
                    "iscrowd": 0,
                }
            )
        for m, score, label in zip(det["masks"], det["scores"], det["labels"], strict=True):
            results.append(
                {
                    "image_id": img,
                    "category_id": int(label),
                    "segmentation": rle(m > 0.5),
                    "score": float(score),
                }
            )
    zero = {"mask_ap": 0.0, "mask_ap50": 0.0, "mask_ap75": 0.0}
    if not results or not anns:
        return zero
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k} for k in range(num_classes)],
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats[:3]]  # -1 means no ground truth
    return dict(zip(zero, stats, strict=True))


class DenseEvaluator:
    """Accumulate a dense model's predictions on batches; report every metric it can.

    Args:
        num_semantic: Semantic classes (0: no segmentation metric).
        num_instance: Instance classes (0: no mask AP).
        num_rotated: Oriented-box classes (0: no rotated mAP).
    """

    def __init__(self, num_semantic: int = 0, num_instance: int = 0, num_rotated: int = 0) -> None:
        self.seg = SegmentationMeter(num_semantic) if num_semantic else None
        self.num_instance, self.num_rotated = num_instance, num_rotated
        self.inst_pred: list[dict[str, torch.Tensor]] = []
        self.inst_true: list[dict[str, torch.Tensor]] = []
        self.rot_pred: list[dict[str, torch.Tensor]] = []
        self.rot_true: list[dict[str, torch.Tensor]] = []

    def update(self, batch: Any, predictions: dict[str, Any]) -> None:
        """Add one batch (:class:`~mmpt.batch.DenseBatch`) and the model's predictions on it.

        Args:
            batch: The batch (ground truth).
            predictions: ``semseg`` (B, H, W) class maps, ``instance`` and ``rotated`` per-image
                detection dicts, each for every sample of the batch (absent: not predicted).
        """
        if self.seg is not None and "semseg" in predictions and bool(batch.has_mask.any()):
            keep = batch.has_mask
            self.seg.update(predictions["semseg"][keep], batch.masks[keep])
        if self.num_instance and "instance" in predictions:
            for det, gt in zip(predictions["instance"], batch.instances, strict=True):
                if gt is None:
                    continue
                self.inst_pred.append({k: v.detach().cpu() for k, v in det.items()})
                if "masks" in self.inst_pred[-1]:
                    self.inst_pred[-1]["masks"] = self.inst_pred[-1]["masks"] > 0.5
                self.inst_true.append({k: gt[k].cpu() for k in ("masks", "labels")})
        if self.num_rotated and "rotated" in predictions:
            for det, gt in zip(predictions["rotated"], batch.obbs, strict=True):
                if gt is not None:
                    self.rot_pred.append({k: v.detach().cpu() for k, v in det.items()})
                    self.rot_true.append({k: v.cpu() for k, v in gt.items()})

    def compute(self) -> dict[str, Any]:
        """Every metric of the tasks seen.

        Returns:
            ``miou``, ``iou`` (per class), ``acc``; ``mask_ap``, ``mask_ap50``, ``mask_ap75``;
            ``rotated_map``, ``rotated_ap`` (per class); each only for tasks seen.
        """
        out: dict[str, Any] = {}
        if self.seg is not None and int(self.seg.confusion.sum()):
            out |= self.seg.compute()
        if self.inst_true:
            out |= mask_ap(self.inst_pred, self.inst_true, self.num_instance)
        if self.rot_true:
            rot = rotated_map(self.rot_pred, self.rot_true, self.num_rotated)
            out |= {"rotated_map": rot["map"], "rotated_ap": rot["ap"]}
        return out


__all__ = ["DenseEvaluator", "SegmentationMeter", "mask_ap", "rotated_map", "voc_ap"]
