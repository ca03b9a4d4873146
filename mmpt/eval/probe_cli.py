"""``mmpt eval probe``: kNN and linear probes on frozen image-tower features.

The tower and its preprocessing (band list, scale, per-band mean/std, input size) come from
the checkpoint itself, so the probe always sees tiles prepared exactly as in pretraining:
chips of another size (32/64 px) are resized to the pretraining size, bands are picked by
name, and a tile without a required band stops with a clear error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpt.eval.probe import knn_classify, linear_probe, probe_metrics
from mmpt.eval.report import plot_confusion_matrix, print_metrics, write_json

METHODS = ("knn", "linear")
SWEEP_FLAGS = ("timm", "weights", "dataset", "resize", "normalize")


def add_sweep_arguments(s: argparse.ArgumentParser) -> None:
    """Flags of the sweep mode (:mod:`mmpt.eval.probe_sweep_cli`)."""
    g = s.add_argument_group("sweep (any of these runs the resizing/normalisation protocol)")
    g.add_argument("--timm", default=None, help="timm model name to probe instead of --ckpt")
    g.add_argument(
        "--weights",
        default=None,
        help="--timm weights: a local file, or torchgeo:<Enum>.<MEMBER> (bands, size and "
        "normalisation from the enum; state dict from --weights-file or the torch hub cache)",
    )
    g.add_argument("--weights-file", default=None, help="local .pth of a torchgeo weight")
    g.add_argument("--dataset", default=None, help="torchgeo:<Name> (read with download=False)")
    g.add_argument("--root", default=None, help="local root of the --dataset")
    g.add_argument("--resize", default=None, help="comma list of pretrain, none, <pixels>")
    g.add_argument(
        "--normalize", default=None, help="comma list of checkpoint, dataset, minmax, none"
    )


def add_parser(sub: Any) -> None:
    """Register ``probe`` on the ``mmpt eval`` subparsers."""
    help_ = "kNN (k=5, cosine) / linear probe on frozen features: top-1, per-class recall"
    s = sub.add_parser("probe", help=help_, description=__doc__)
    s.add_argument("--ckpt", default=None, help="mmpt checkpoint (.ckpt) with an image tower")
    s.add_argument("--train", default=None, help="labelled shards the probe is fit on")
    s.add_argument("--test", default=None, help="labelled shards the probe is scored on")
    add_sweep_arguments(s)
    s.add_argument("--method", default="knn", choices=[*METHODS, "both"])
    s.add_argument("--k", type=int, default=5, help="neighbours for kNN (default 5)")
    s.add_argument(
        "--pool",
        default="avg",
        choices=["avg", "model"],
        help="features: mean of the final patch tokens (avg) or the model's own pooling",
    )
    s.add_argument("--label-key", default="json:label", help="class id field of the samples")
    s.add_argument("--classnames", default=None, help="text file, one class name a line")
    s.add_argument(
        "--baseline",
        action="store_true",
        help="also probe the same tower at random initialisation (what pretraining added)",
    )
    s.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="report folder (default: <ckpt folder>/eval)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--num-workers", type=int, default=2)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


@torch.no_grad()
def extract_features(
    tower: nn.Module, urls: str, field: str, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]:
    """Features (N, D) and labels (N,) of every labelled sample of ``urls``.

    Returns:
        features, labels, the shards' index meta, and the number of samples skipped as
        corrupt or unlabelled.

    Raises:
        ValueError: No labelled sample.
    """
    from mmpt.datamodules.images import ImageDataModule
    from mmpt.datamodules.loader import make_loader
    from mmpt.datamodules.streams import StreamConfig
    from mmpt.preprocess import Preprocess

    dm = ImageDataModule(
        batch_size=args.batch_size,
        val_batch_size=args.batch_size,
        num_workers=args.num_workers,
        label_key=args.label_key,
        preprocess=Preprocess(image=tower.image_preprocess, tokenizer=None),
    )
    stream = dm.stream(
        StreamConfig(urls=urls, shuffle_buffer=0, shuffle_shards=False), False, field
    )
    pool = None if args.pool == "model" else args.pool
    feats, labels, skipped = [], [], 0
    for batch in make_loader(stream, args.num_workers):
        skipped += batch.skipped
        keep = batch.labels >= 0
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        batch.images = batch.images.to(device)
        images = dm.normalize(batch).images[keep.to(device)]
        feats.append(tower.pooled_features(images, pool).float().cpu())
        labels.append(batch.labels[keep])
    if not feats:
        raise ValueError(f"{field} {urls}: no sample with a label ({args.label_key})")
    return torch.cat(feats), torch.cat(labels), stream.sources[0].meta, skipped


def _classnames(args: argparse.Namespace, meta: dict[str, Any], num_classes: int) -> list[str]:
    if args.classnames:
        names = [ln.strip() for ln in Path(args.classnames).read_text().splitlines() if ln.strip()]
    else:
        names = list(meta.get("classnames") or [])
    if not names:
        return [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"{len(names)} class names for labels up to {num_classes - 1}")
    return names


def run_probe(args: argparse.Namespace, device: torch.device) -> int:
    """Probe the checkpoint's tower (and, with ``--baseline``, the same tower untrained)."""
    from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint

    if any(getattr(args, f) for f in SWEEP_FLAGS):
        from mmpt.eval.probe_sweep_cli import run_probe_sweep

        return run_probe_sweep(args, device)
    if not (args.ckpt and args.train and args.test):
        raise ValueError("eval probe needs --ckpt, --train and --test (or the sweep flags)")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    methods = METHODS if args.method == "both" else (args.method,)
    variants = {"pretrained": tower_from_checkpoint(args.ckpt)}
    if not hasattr(variants["pretrained"], "pooled_features"):
        raise ValueError(
            f"{type(variants['pretrained']).__name__} has no pooled_features: eval probe "
            "supports TimmVisionTower image towers (MAE, timm-based contrastive and VLM towers)"
        )
    if args.baseline:
        torch.manual_seed(args.seed)
        variants["random_init"] = tower_from_checkpoint(args.ckpt, False)
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "eval"
    metrics: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    context: dict[str, Any] = {}
    for variant, tower in variants.items():
        tower.to(device)
        train_x, train_y, _, train_skip = extract_features(
            tower, args.train, "--train", args, device
        )
        test_x, test_y, meta, test_skip = extract_features(tower, args.test, "--test", args, device)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        names = _classnames(args, meta, num_classes)
        context.update(
            num_train=len(train_y), num_test=len(test_y), skipped_train=train_skip,
            skipped_test=test_skip, classnames=names[:num_classes],
        )  # fmt: skip
        for method in methods:
            if method == "knn":
                pred = knn_classify(train_x, train_y, test_x, k=args.k, num_classes=num_classes)
            else:
                pred = linear_probe(
                    train_x, train_y, test_x, num_classes, epochs=args.epochs, seed=args.seed
                )
            result = probe_metrics(pred, test_y, num_classes)
            tag = method if variant == "pretrained" else f"{method}_{variant}"
            plot = plot_confusion_matrix(
                result.pop("confusion_matrix"), names[:num_classes], out / f"probe_{tag}_cm.png"
            )
            paths[f"{tag} confusion matrix"] = plot
            metrics[f"{tag}/top1"] = result["top1"]
            metrics[f"{tag}/mean_per_class_recall"] = result["mean_per_class_recall"]
            metrics[f"{tag}/per_class_recall"] = dict(
                zip(names[:num_classes], result["per_class_recall"], strict=True)
            )
        tower.cpu()
    pre = variants["pretrained"].image_preprocess
    paths["json"] = write_json(
        out / "probe.json",
        metrics,
        checkpoint=str(args.ckpt),
        train=args.train,
        test=args.test,
        k=args.k,
        pool=args.pool,
        preprocess={"size": pre.size, "bands": pre.bands, "scale": pre.scale},
        **context,
    )
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    print_metrics(flat, title=f"mmpt eval probe: {args.test}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
