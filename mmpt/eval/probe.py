"""Frozen-feature probes: cosine kNN (optionally DINO-weighted) and a logistic-regression probe.

Pure functions on precomputed features; the CLI wires them to encoders later. The kNN default
(k=5, cosine) follows the remote-sensing evaluation of Corley et al. 2024 (docs/recipes.md,
"MAE, MAWS and remote sensing"); the ``temperature`` weighting ``exp(s / T)`` follows DINO's
weighted kNN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.eval.metrics import _normalise, _spans, confusion_matrix


def _check_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor) -> None:
    """Raise ``ValueError`` unless train (N, D), labels (N,) and test (M, D) fit together."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"expected train_feats (N, D) and test_feats (M, D), got "
            f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    n = train_feats.shape[0]
    if n == 0:
        raise ValueError("need at least one training example")
    if train_labels.shape != (n,) or train_labels.is_floating_point():
        raise ValueError(
            f"train_labels must be an integer tensor of shape ({n},), "
            f"got {train_labels.dtype} {tuple(train_labels.shape)}"
        )
    if int(train_labels.min()) < 0:
        raise ValueError("train_labels must be non-negative")


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int = 5,
    num_classes: int | None = None,
    temperature: float | None = None,
    chunk_size: int = 4096,
    exclude_self: bool = False,
) -> Tensor:
    """Cosine-similarity k-nearest-neighbour classification on frozen features.

    Both feature sets are L2-normalised; each test row takes its ``min(k, N)`` most similar
    training rows. Each neighbour casts a vote of weight 1 (plain majority vote) or, when
    ``temperature`` is given, ``exp((s - s_max) / T)`` where ``s_max`` is the row's best
    similarity: DINO's ``exp(s / T)`` rescaled per row, which leaves the winner unchanged and
    avoids overflow for small ``T``.

    Tie rule (deterministic): the class with the largest vote total wins; among classes with
    equal totals, the one whose neighbours have the largest summed cosine similarity wins; if
    that is also equal, the smaller class id wins. Which of several training rows with exactly
    equal similarity enters the top k at the k-th place is left to :func:`torch.topk`.

    Test rows are processed ``chunk_size`` at a time, so memory is O(chunk_size * N).

    With ``exclude_self`` the test rows are the training rows (leave-one-out): test row ``i``
    never takes training row ``i`` as a neighbour (its similarity is set to -inf before the
    top k), so at most ``N - 1`` neighbours are used. Other rows equal to row ``i`` still count.

    Args:
        train_feats: Float tensor (N, D).
        train_labels: Long tensor (N,) of class ids in [0, C).
        test_feats: Float tensor (M, D).
        k: Number of neighbours, >= 1.
        num_classes: C; defaults to ``train_labels.max() + 1``.
        temperature: Optional T > 0 for similarity-weighted votes.
        chunk_size: Test rows per similarity block, >= 1.
        exclude_self: Leave-one-out: ``test_feats`` holds the same N rows as ``train_feats``
            (same shape required, N >= 2) and each row's own row is masked out.

    Returns:
        Long tensor (M,) of predicted class ids, on the CPU.

    Raises:
        ValueError: On malformed shapes, labels, ``k``, ``temperature`` or ``chunk_size``
            (or, with ``exclude_self``, test and train shapes that differ or N < 2).

    """
    _check_features(train_feats, train_labels, test_feats)
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be positive, got k={k}, chunk_size={chunk_size}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    c = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if int(train_labels.max()) >= c:
        raise ValueError(f"train_labels must lie in [0, {c})")
    if exclude_self and (test_feats.shape != train_feats.shape or train_feats.shape[0] < 2):
        raise ValueError(
            "exclude_self needs test_feats to be the same N >= 2 rows as train_feats, got "
            f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    train = _normalise(train_feats)
    device = train.device
    test = _normalise(test_feats).to(device, train.dtype)
    labels = train_labels.to(device, torch.long)
    k = min(k, train.shape[0] - int(exclude_self))
    class_ids = torch.arange(c, device=device)
    preds = []
    for r0, r1 in _spans(test.shape[0], chunk_size):
        block = test[r0:r1] @ train.T  # (R, N)
        if exclude_self:
            rows = torch.arange(r1 - r0, device=device)
            block[rows, rows + r0] = -math.inf
        sims, idx = block.topk(k, dim=1)  # (R, k) each
        sims = sims.double()
        neigh = labels[idx]  # (R, k)
        if temperature is None:
            weights = torch.ones_like(sims)
        else:
            weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = sims.new_zeros(r1 - r0, c).scatter_add_(1, neigh, weights)  # (R, C)
        sim_sum = sims.new_zeros(r1 - r0, c).scatter_add_(1, neigh, sims)  # (R, C)
        best = votes == votes.max(1, keepdim=True).values
        sim_sum = sim_sum.masked_fill(~best, -math.inf)
        best &= sim_sum == sim_sum.max(1, keepdim=True).values
        preds.append(torch.where(best, class_ids, c).min(1).values)
    if not preds:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(preds).cpu()


def knn_top1_loo(feats: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out cosine kNN top-1 accuracy of a labelled feature set.

    Only rows with a label >= 0 take part; each is classified by its ``k`` nearest other
    labelled rows (:func:`knn_classify` with ``exclude_self``, majority vote).

    Args:
        feats: Float tensor (N, D).
        labels: Integer tensor (N,), -1 (any negative) where unknown.
        k: Number of neighbours, >= 1.

    Returns:
        Fraction of labelled rows whose prediction is their label; NaN with fewer than two
        labelled rows or a single class.
    """
    keep = labels >= 0
    feats, labels = feats[keep], labels[keep].long()
    if labels.numel() < 2 or labels.unique().numel() < 2:
        return math.nan
    pred = knn_classify(feats, labels, feats, k=k, exclude_self=True)
    return float((pred == labels.cpu()).double().mean())


def standardise(
    train_feats: Tensor, test_feats: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Z-score both feature sets with the mean and std of the training features only.

    Args:
        train_feats: Float tensor (N, D).
        test_feats: Float tensor (M, D).
        eps: Lower bound on the per-dimension std (constant dimensions map to 0).

    Returns:
        ``(train_z, test_z)``: float tensors (N, D) and (M, D), at least float32.

    """
    dtype = torch.promote_types(train_feats.dtype, torch.float32)
    train = train_feats.to(dtype)
    mean = train.mean(0)  # (D,)
    std = train.std(0, unbiased=False).clamp_min(eps)  # (D,)
    test = test_feats.to(train.device, dtype)
    return (train - mean) / std, (test - mean) / std


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Logistic-regression probe on standardised frozen features.

    Features are z-scored with training statistics only (:func:`standardise`), then a linear
    layer (D -> C, zero-initialised) is trained with AdamW and cross-entropy. Mini-batches are
    reshuffled every epoch by a generator seeded with ``seed`` (no global RNG), so a fixed seed
    on a fixed device gives identical predictions.

    Args:
        train_feats: Float tensor (N, D).
        train_labels: Long tensor (N,) of class ids in [0, num_classes).
        test_feats: Float tensor (M, D).
        num_classes: C.
        epochs: Passes over the training set.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        batch_size: Mini-batch size; ``None`` (or >= N) trains full-batch.
        seed: Seed for the batch-order generator.
        device: Device to train on.

    Returns:
        Long tensor (M,) of predicted class ids, on the CPU.

    Raises:
        ValueError: On malformed shapes or labels outside [0, num_classes).

    """
    _check_features(train_feats, train_labels, test_feats)
    if int(train_labels.max()) >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    train_z, test_z = standardise(train_feats.to(device), test_feats.to(device))
    labels = train_labels.to(device, torch.long)
    n, d = train_z.shape
    bs = n if batch_size is None else min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(num_classes, d, dtype=train_z.dtype, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=train_z.dtype, device=device, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for b0, b1 in _spans(n, bs):
                rows = order[b0:b1]
                loss = F.cross_entropy(F.linear(train_z[rows], weight, bias), labels[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        return F.linear(test_z, weight, bias).argmax(1).cpu()


def probe_metrics(pred: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1, per-class recall and confusion matrix for predicted class ids.

    Mean per-class recall averages over the classes present in ``labels`` (as in
    :func:`mmpt.eval.metrics.classification_metrics`); absent classes get NaN recall.

    Args:
        pred: Long tensor (M,) of predicted class ids.
        labels: Long tensor (M,) of true class ids.
        num_classes: C.

    Returns:
        ``top1`` (float), ``mean_per_class_recall`` (float), ``per_class_recall`` (list of C
        floats) and ``confusion_matrix`` (long tensor (C, C), rows true, columns predicted).

    Raises:
        ValueError: On empty inputs, shape mismatches or ids outside [0, C).

    """
    cm = confusion_matrix(pred, labels, num_classes)
    total = int(cm.sum())
    if total == 0:
        raise ValueError("need at least one prediction")
    counts = cm.sum(1).double()  # (C,)
    recall = cm.diagonal().double() / counts  # NaN where a class is absent
    present = counts > 0
    return {
        "top1": float(cm.diagonal().sum()) / total,
        "mean_per_class_recall": float(recall[present].mean()),
        "per_class_recall": recall.tolist(),
        "confusion_matrix": cm,
    }
