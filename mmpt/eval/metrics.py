"""Zero-shot retrieval and classification metrics with CLIP_benchmark semantics (pure torch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalise(x: Tensor) -> Tensor:
    """L2-normalise rows in at least float32 precision.

    Args:
        x: Float tensor (R, D).

    Returns:
        Float tensor (R, D) with unit-norm rows; half and bfloat16 inputs are upcast.

    """
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def _spans(total: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` index pairs covering ``range(total)`` in steps of ``size``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _median(x: Tensor) -> float:
    """Median of a 1-D tensor, averaging the two middle values for even lengths."""
    s = x.double().sort().values
    n = s.numel()
    return float((s[(n - 1) // 2] + s[n // 2]) / 2)


def _check_retrieval_inputs(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int
) -> None:
    """Raise ``ValueError`` for malformed retrieval inputs or images without captions."""
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected image_emb (N, D) and text_emb (M, D), got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"need at least one image and one caption, got N={n}, M={m}")
    if text_to_image.shape != (m,) or text_to_image.is_floating_point():
        raise ValueError(
            f"text_to_image must be an integer tensor of shape ({m},), "
            f"got {text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n:
        raise ValueError(f"text_to_image values must lie in [0, {n})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    uncaptioned = int((torch.bincount(text_to_image.cpu(), minlength=n) == 0).sum())
    if uncaptioned:
        raise ValueError(
            f"{uncaptioned} of {n} images have no caption; an evaluation set must give every "
            "image at least one caption"
        )


@torch.no_grad()
def retrieval_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """1-based retrieval ranks in both directions under cosine similarity.

    Tie rule (deterministic, never in the query's favour): a candidate outranks the correct
    one if it scores strictly higher, or scores exactly the same and has a lower index. So a
    caption whose image ties with image 0 is ranked below image 0, and perfect ties cannot
    inflate recall.

    * Text->image: the rank of caption ``m`` is 1 + the number of images that outrank its own
      image ``text_to_image[m]``.
    * Image->text: the rank of image ``n`` is the best (smallest) rank any of its own captions
      gets in the ranking of all M captions for that image. This is the rank of its
      highest-scoring caption (lowest caption index among ties).

    Scores are computed in tiles of ``chunk_size x chunk_size`` (two passes: own scores, then
    counts), so memory stays bounded for e.g. 50k images x 250k captions. Within a call every
    score is compared only with scores from the same tile computation and a correct
    candidate is never compared against itself, so ranks are exact for the scores computed;
    a different ``chunk_size`` can change a score only by float rounding of the matmul.

    Args:
        image_emb: Float tensor (N, D); L2-normalised inside.
        text_emb: Float tensor (M, D) on the same device; L2-normalised inside.
        text_to_image: Long tensor (M,), the image index of each caption.
        chunk_size: Rows and columns per similarity tile.

    Returns:
        ``(t2i_ranks, i2t_ranks)``: long tensors (M,) and (N,) on the CPU, values >= 1.

    Raises:
        ValueError: On shape mismatches, out-of-range indices, or images with no caption.

    """
    _check_retrieval_inputs(image_emb, text_emb, text_to_image, chunk_size)
    img, txt = _normalise(image_emb), _normalise(text_emb)
    dtype, device = torch.promote_types(img.dtype, txt.dtype), img.device
    img, txt = img.to(dtype), txt.to(device, dtype)
    n, m = img.shape[0], txt.shape[0]
    target = text_to_image.to(device=device, dtype=torch.long)

    # Pass 1: the score of every caption with its own image, from the tile that holds it.
    own = torch.empty(m, dtype=img.dtype, device=device)
    for r0, r1 in _spans(m, chunk_size):
        tgt = target[r0:r1]
        for block in torch.unique(tgt // chunk_size).tolist():
            c0, c1 = block * chunk_size, min((block + 1) * chunk_size, n)
            sim = txt[r0:r1] @ img[c0:c1].T
            rows = (tgt // chunk_size == block).nonzero().squeeze(1)
            own[r0 + rows] = sim[rows, tgt[rows] - c0]

    # Best caption per image: highest own score, lowest caption index among ties.
    best = torch.full((n,), -math.inf, dtype=img.dtype, device=device)
    best.scatter_reduce_(0, target, own, reduce="amax")
    caption_idx = torch.arange(m, device=device)
    candidates = torch.where(own == best[target], caption_idx, m)
    best_idx = torch.full((n,), m, dtype=torch.long, device=device)
    best_idx.scatter_reduce_(0, target, candidates, reduce="amin")

    # Pass 2: count the candidates that outrank the correct one, tile by tile.
    t2i_count = torch.zeros(m, dtype=torch.long, device=device)
    i2t_count = torch.zeros(n, dtype=torch.long, device=device)
    for r0, r1 in _spans(m, chunk_size):
        tgt, own_r, rows = target[r0:r1, None], own[r0:r1, None], caption_idx[r0:r1, None]
        for c0, c1 in _spans(n, chunk_size):
            sim = txt[r0:r1] @ img[c0:c1].T
            cols = torch.arange(c0, c1, device=device)[None, :]
            own_pair = tgt == cols
            above = (sim > own_r) | ((sim == own_r) & (cols < tgt))
            t2i_count[r0:r1] += (above & ~own_pair).sum(1)
            best_c, best_idx_c = best[None, c0:c1], best_idx[None, c0:c1]
            above = (sim > best_c) | ((sim == best_c) & (rows < best_idx_c))
            i2t_count[c0:c1] += (above & ~own_pair).sum(0)
    return (t2i_count + 1).cpu(), (i2t_count + 1).cpu()


def recall_at_k(ranks: Tensor, k: int) -> float:
    """Fraction of queries whose correct item is within the top ``k``.

    Args:
        ranks: Long tensor (Q,) of 1-based ranks.
        k: Cut-off, >= 1.

    Returns:
        Recall@k in [0, 1].

    """
    return float((ranks <= k).double().mean())


def metrics_from_ranks(
    t2i_ranks: Tensor, i2t_ranks: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k and mean/median rank from precomputed ranks (see :func:`retrieval_metrics`).

    Args:
        t2i_ranks: Long tensor (M,) of 1-based text->image ranks.
        i2t_ranks: Long tensor (N,) of 1-based image->text ranks.
        ks: Recall cut-offs.

    Returns:
        The same keys as :func:`retrieval_metrics`.

    """
    out: dict[str, float] = {}
    for name, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            out[f"{name}/R@{k}"] = recall_at_k(ranks, k)
    for name, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        out[f"{name}/mean_rank"] = float(ranks.double().mean())
        out[f"{name}/median_rank"] = _median(ranks)
    return out


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Image-text retrieval recall@k and mean/median rank (CLIP_benchmark semantics).

    Text->image recall is averaged over captions; image->text recall is averaged over images,
    with a hit when ANY of the image's captions is in the top k. Median rank averages the two
    middle ranks for an even count. Tie rule: see :func:`retrieval_ranks`.

    Args:
        image_emb: Float tensor (N, D).
        text_emb: Float tensor (M, D).
        text_to_image: Long tensor (M,), the image index of each caption.
        ks: Recall cut-offs.
        chunk_size: Tile size passed to :func:`retrieval_ranks`.

    Returns:
        Keys ``t2i/R@{k}``, ``i2t/R@{k}`` for each k, and ``t2i/mean_rank``,
        ``t2i/median_rank``, ``i2t/mean_rank``, ``i2t/median_rank``.

    """
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size)
    return metrics_from_ranks(*ranks, ks=ks)


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[list[str]], Tensor], classnames: list[str], templates: list[str]
) -> Tensor:
    """Zero-shot classifier weights from prompt templates.

    For each class every template is filled with the class name (``"{}"`` or ``"{c}"``
    placeholders), all prompts of the class are encoded in one call, each prompt embedding
    is L2-normalised, the prompts are averaged, and the mean is L2-normalised again.

    Args:
        encode_text: Maps P prompts to a float tensor (P, D).
        classnames: C class names.
        templates: P templates such as ``"a photo of a {}."``.

    Returns:
        Float tensor (C, D) of unit-norm class embeddings.

    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    weights = []
    for name in classnames:
        prompts = [t.format(name, c=name) for t in templates]
        emb = encode_text(prompts)
        if emb.ndim != 2 or emb.shape[0] != len(prompts):
            raise ValueError(f"encode_text returned {tuple(emb.shape)} for {len(prompts)} prompts")
        weights.append(F.normalize(_normalise(emb).mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def classification_logits(image_emb: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarity of every image with every class embedding.

    Args:
        image_emb: Float tensor (N, D).
        classifier: Float tensor (C, D), e.g. from :func:`zeroshot_classifier`.

    Returns:
        Float tensor (N, C); ``argmax(1)`` is the predicted class (lowest index among ties).

    """
    img = _normalise(image_emb)
    return img @ _normalise(classifier).to(img.device, img.dtype).T


def classification_metrics(
    image_emb: Tensor, classifier: Tensor, labels: Tensor
) -> dict[str, float]:
    """Zero-shot classification accuracy (CLIP_benchmark semantics).

    Args:
        image_emb: Float tensor (N, D).
        classifier: Float tensor (C, D).
        labels: Long tensor (N,) of class ids in [0, C).

    Returns:
        ``top1``, ``top5`` (NaN when C < 5) and ``mean_per_class_recall``: the mean over the
        classes present in ``labels`` of the fraction of their images predicted correctly.

    """
    logits = classification_logits(image_emb, classifier)
    n, c = logits.shape
    labels = labels.to(logits.device, torch.long)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n == 0 or int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"need at least one image and labels in [0, {c})")
    correct = logits.argmax(1) == labels
    top5 = math.nan
    if c >= 5:
        top5 = float((logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean())
    hits = torch.bincount(labels[correct], minlength=c).double()
    counts = torch.bincount(labels, minlength=c).double()
    present = counts > 0
    return {
        "top1": float(correct.double().mean()),
        "top5": top5,
        "mean_per_class_recall": float((hits[present] / counts[present]).mean()),
    }


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Count matrix of true versus predicted classes.

    Args:
        pred: Long tensor (N,) of predicted class ids.
        labels: Long tensor (N,) of true class ids.
        num_classes: C.

    Returns:
        Long tensor (C, C); entry (i, j) counts images of true class i predicted as j.

    """
    pred, labels = pred.long().flatten().cpu(), labels.long().flatten().cpu()
    if pred.shape != labels.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")
    for name, x in (("pred", pred), ("labels", labels)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} values must lie in [0, {num_classes})")
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
