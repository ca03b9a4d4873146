"""Evaluation reports: atomic JSON, recall/similarity/confusion plots and a console table."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from torch import Tensor

from mmpt.eval.modality import direction_labels
from mmpt.io import atomic_write_text

_MARKED_KS = (1, 5, 10)


def _jsonable(value: Any) -> Any:
    """Convert tensors, paths and non-finite floats into plain JSON values (NaN -> None)."""
    if hasattr(value, "tolist") and not isinstance(value, list | tuple | dict | str):
        value = value.tolist()  # tensors, numpy arrays and numpy scalars
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, metrics: dict[str, Any], **context: Any) -> Path:
    """Write metrics and their context as JSON, atomically (temporary file + rename).

    Args:
        path: Output file; parent folders are created.
        metrics: Metric name -> value; NaN and infinities are written as ``null``.
        **context: Extra top-level fields, e.g. ``checkpoint``, ``data``, ``num_images``,
            ``num_texts``. ``created`` (UTC ISO time) is added unless given.

    Returns:
        The path written.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": metrics, **context}
    payload.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    text = json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


def new_figure(width: float, height: float) -> Figure:
    """Create a figure drawn by the Agg canvas, without pyplot or a global backend switch."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG (parent folders created) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_recall_curves(
    t2i_ranks: Tensor,
    i2t_ranks: Tensor,
    path: str | Path,
    max_k: int = 50,
    title: str = "",
    log_x: bool = True,
    media: str = "image",
) -> Path:
    """Plot recall@k for k = 1..max_k in both retrieval directions, with R@1/5/10 marked.

    Args:
        t2i_ranks: Long tensor (M,) of 1-based text->image (text->media) ranks.
        i2t_ranks: Long tensor (N,) of 1-based image->text (media->text) ranks.
        path: Output PNG.
        max_k: Largest k on the x axis.
        title: Figure title.
        log_x: Use a logarithmic k axis.
        media: What was retrieved against text (``image``, ``video``, ``audio``): the
            curves' labels, e.g. ``text->audio``.

    Returns:
        The path written.

    """
    ks = torch.arange(1, max_k + 1)
    marked = [k for k in _MARKED_KS if k <= max_k]
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for k in marked:
        ax.axvline(k, color="grey", linestyle=":", linewidth=0.8)
    for name, ranks in zip(direction_labels(media), (t2i_ranks, i2t_ranks), strict=True):
        ranks = ranks.detach().cpu().flatten()
        recall = (ranks[None, :] <= ks[:, None]).double().mean(1) * 100
        at = [float(recall[k - 1]) for k in marked]
        label = ", ".join([name] + [f"R@{k} {r:.1f}" for k, r in zip(marked, at, strict=True)])
        (line,) = ax.plot(ks.numpy(), recall.numpy(), label=label)
        ax.plot(marked, at, "o", color=line.get_color())
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel="k", ylabel="recall@k (%)", ylim=(0, 101), title=title or "Retrieval recall")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)


def first_caption_similarity(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, max_images: int = 64
) -> Tensor:
    """Cosine similarity of the first images against the first caption of each.

    Args:
        image_emb: Float tensor (N, D).
        text_emb: Float tensor (M, D).
        text_to_image: Long tensor (M,); every one of the first ``max_images`` images needs
            a caption.
        max_images: Number of images (and captions) to keep.

    Returns:
        Float tensor (n, n), n = min(N, max_images); entry (i, j) is image i vs the first
        caption of image j, so matching pairs lie on the diagonal.

    """
    n = min(image_emb.shape[0], max_images)
    target = text_to_image.to(text_emb.device)
    first = [int((target == i).nonzero()[0]) for i in range(n)]
    img = F.normalize(image_emb[:n].float(), dim=-1)
    return img @ F.normalize(text_emb[first].float(), dim=-1).to(img.device, img.dtype).T


def plot_similarity_heatmap(sim: Tensor, path: str | Path, title: str = "") -> Path:
    """Plot an image x caption cosine-similarity matrix (at most the first 64 x 64).

    Args:
        sim: Float tensor (n, n), image i vs the first caption of image j (see
            :func:`first_caption_similarity`); matches on the diagonal.
        path: Output PNG.
        title: Figure title.

    Returns:
        The path written.

    """
    sim = sim.detach().float().cpu()[:64, :64]
    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(sim.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set(xlabel="caption (first of image j)", ylabel="image i", title=title or "Similarity")
    return save_figure(fig, path)


def plot_confusion_matrix(cm: Tensor, classnames: list[str], path: str | Path) -> Path:
    """Plot a row-normalised confusion matrix (rows = true class).

    Class names label the axes up to 50 classes and counts are written in the cells up to
    20 classes; larger matrices are drawn without them to stay legible.

    Args:
        cm: Long tensor (C, C) from :func:`mmpt.eval.metrics.confusion_matrix`.
        classnames: C class names.
        path: Output PNG.

    Returns:
        The path written.

    """
    cm = cm.detach().cpu().long()
    c = cm.shape[0]
    if cm.shape != (c, c) or len(classnames) != c:
        raise ValueError(f"cm {tuple(cm.shape)} does not match {len(classnames)} class names")
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    side = min(4.0 + 0.35 * c, 16.0)
    fig = new_figure(side, side)
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of true class", shrink=0.8)
    if c <= 50:
        ax.set_xticks(range(c), classnames, rotation=90)
        ax.set_yticks(range(c), classnames)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=color)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return save_figure(fig, path)


def _format(value: Any) -> str:
    """Format one metric value for the console table."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def print_metrics(metrics: dict[str, Any], title: str, console: Console | None = None) -> None:
    """Print metrics as a two-column Rich table.

    Args:
        metrics: Metric name -> value.
        title: Table title.
        console: Where to print; a new stdout console by default.

    """
    table = Table(title=title)
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, _format(value))
    (console or Console()).print(table)
