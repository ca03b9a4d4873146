"""``mmpt eval segment`` and ``mmpt eval detect``: dense-task metrics of a checkpoint on shards.

``segment`` reports mIoU, per-class IoU and pixel accuracy; ``detect`` reports COCO mask AP
(instance head) and DOTA-style rotated mAP@0.5 (oriented-box head). Both write
``<out>/<task>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

#: The dense tasks and the metrics each reports.
DENSE_TASKS = {
    "segment": ("miou", "acc", "iou"),
    "detect": ("mask_ap", "mask_ap50", "mask_ap75", "rotated_map", "rotated_ap"),
}


def add_dense_parsers(sub: Any, common: Any) -> None:
    """Add ``segment`` and ``detect`` to ``mmpt eval``'s subparsers.

    Args:
        sub: The subparsers action.
        common: Adds the arguments every eval task takes (config, ckpt, data, out ...).
    """
    helps = {
        "segment": "semantic segmentation: mIoU and per-class IoU of a dense (MTP) model",
        "detect": "instance segmentation mask AP and rotated-box mAP@0.5 of a dense (MTP) model",
    }
    for task, help_ in helps.items():
        s = sub.add_parser(task, help=help_, description=help_)
        common(s, batch_size=8)


def _class_names(meta: dict | None, key: str, count: int) -> list[str]:
    names = list((meta or {}).get(key) or [])
    return names if len(names) == count else [str(i) for i in range(count)]


def run_dense(args: argparse.Namespace, model: Any, dm: Any, device: torch.device) -> dict:
    """Evaluate ``model`` (checkpoint loaded) on ``--data`` and write the JSON report.

    Raises:
        ValueError: The model has no head for the task, or no sample could be read.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mmpt.datamodules.loader import make_loader
    from mmpt.eval.report import print_metrics, write_json
    from mmpt.run_config import eval_stream_config

    need = {"segment": ("semseg",), "detect": ("instance", "rotated")}[args.task]
    if not hasattr(model, "predict_dense") or not any(t in model.tasks for t in need):
        raise ValueError(
            f"--ckpt {args.ckpt}: `mmpt eval {args.task}` needs a dense model "
            f"(mmpt.models.mtp.MultiTaskModule) with a {' or '.join(need)} head"
        )
    dm.val_batch_size = args.batch_size
    cfg, field, data = eval_stream_config(dm, args.data)
    meta = cfg.sources(field)[0].meta or {}
    stream = dm.stream(cfg, train=False, field=field)
    stream.where = f"{field} ({data})"
    loader = make_loader(stream, args.num_workers)
    model.to(device).eval()
    evaluator, images = model.evaluator(), 0
    with torch.no_grad():
        for batch in loader:
            batch = dm.normalize(move_data_to_device(batch, device))
            evaluator.update(batch, model.predict_dense(batch.images))
            images += len(batch)
    if not images:
        raise ValueError(f"{stream.where}: no evaluation sample could be read")
    all_metrics = evaluator.compute()
    metrics = {k: all_metrics[k] for k in DENSE_TASKS[args.task] if k in all_metrics}
    if not metrics:
        raise ValueError(f"{stream.where}: no sample holds the annotations `{args.task}` needs")
    if "iou" in metrics:
        names = _class_names(meta, "semantic_classes", len(metrics["iou"]))
        metrics["iou"] = dict(zip(names, metrics["iou"], strict=True))
    if "rotated_ap" in metrics:
        names = _class_names(meta, "object_classes", len(metrics["rotated_ap"]))
        metrics["rotated_ap"] = dict(zip(names, metrics["rotated_ap"], strict=True))
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "eval"
    path = write_json(
        out / f"{args.task}.json",
        metrics,
        checkpoint=str(args.ckpt),
        data=str(data),
        num_images=images,
    )
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    print_metrics(flat, f"mmpt eval {args.task}")
    print(f"json: {path}")
    return metrics


__all__ = ["DENSE_TASKS", "add_dense_parsers", "run_dense"]
