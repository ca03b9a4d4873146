"""Collect image/text embeddings batch by batch and turn them into zero-shot metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmpt.eval.metrics import (
    classification_logits,
    classification_metrics,
    confusion_matrix,
    metrics_from_ranks,
    retrieval_ranks,
    zeroshot_classifier,
)
from mmpt.eval.modality import rename_retrieval


@dataclass
class Embeddings:
    """Embeddings of an evaluation set.

    Attributes:
        image: (N, D) L2-normalised image embeddings.
        text: (M, D) L2-normalised caption embeddings.
        text_to_image: (M,) image index of each caption.
        labels: (N,) class ids, -1 where unknown.
    """

    image: torch.Tensor
    text: torch.Tensor
    text_to_image: torch.Tensor
    labels: torch.Tensor


@dataclass
class EmbeddingAccumulator:
    """Concatenates per-batch evaluation outputs into one set.

    Each batch gives ``image_emb``, ``text_emb``, ``text_to_image`` and ``labels``; the
    caption->image indices are re-based onto the whole set.
    """

    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _images: int = 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """Add one batch's outputs (moved to CPU, float32)."""
        n = out["image_emb"].shape[0]
        self.parts.append(
            {
                "image": out["image_emb"].detach().float().cpu(),
                "text": out["text_emb"].detach().float().cpu(),
                "text_to_image": out["text_to_image"].cpu() + self._images,
                "labels": out["labels"].cpu(),
            }
        )
        self._images += n

    def __len__(self) -> int:
        return self._images

    def result(self) -> Embeddings:
        """All batches so far, concatenated."""
        if not self.parts:
            raise ValueError("no evaluation samples were seen: is the evaluation set empty?")
        cat = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
        return Embeddings(cat["image"], cat["text"], cat["text_to_image"], cat["labels"])


@dataclass
class EvalResult:
    """Metrics plus what the plots need."""

    metrics: dict[str, float]
    t2i_ranks: torch.Tensor | None = None
    i2t_ranks: torch.Tensor | None = None
    confusion: torch.Tensor | None = None
    classnames: list[str] | None = None
    media: str = "image"


def evaluate(
    emb: Embeddings,
    encode_text: Callable[[list[str]], torch.Tensor] | None = None,
    zeroshot: dict | None = None,
    retrieval: bool = True,
    ks: tuple[int, ...] = (1, 5, 10),
    media: str = "image",
) -> EvalResult:
    """Zero-shot retrieval and (when class names, templates and labels exist) classification.

    Args:
        emb: The evaluation set's embeddings.
        encode_text: Prompts -> (P, D) normalised embeddings, for the classifier.
        zeroshot: ``{"classnames": [...], "templates": [...]}`` (from the shards' index).
        retrieval: Compute retrieval metrics.
        ks: Recall cut-offs.
        media: What ``emb.image`` holds: ``image``, ``video`` or ``audio``
            (:func:`mmpt.eval.modality.media_of`); it names the retrieval directions.

    Returns:
        Metrics named ``retrieval/t2i/R@1`` ... (``t2a``/``a2t`` for audio, ``t2v``/``v2t``
        for video), ``zeroshot/top1`` ... and plot inputs.
    """
    out = EvalResult(metrics={}, media=media)
    if retrieval:
        out.t2i_ranks, out.i2t_ranks = retrieval_ranks(emb.image, emb.text, emb.text_to_image)
        m = rename_retrieval(metrics_from_ranks(out.t2i_ranks, out.i2t_ranks, ks=ks), media)
        out.metrics.update({f"retrieval/{k}": v for k, v in m.items()})
    labelled = emb.labels >= 0
    if zeroshot and encode_text is not None and bool(labelled.any()):
        names, templates = zeroshot["classnames"], zeroshot["templates"]
        classifier = zeroshot_classifier(encode_text, names, templates)
        img, lab = emb.image[labelled], emb.labels[labelled]
        m = classification_metrics(img, classifier.to(img), lab)
        out.metrics.update({f"zeroshot/{k}": v for k, v in m.items()})
        pred = classification_logits(img, classifier.to(img)).argmax(dim=-1)
        out.confusion = confusion_matrix(pred, lab, len(names))
        out.classnames = list(names)
    return out
