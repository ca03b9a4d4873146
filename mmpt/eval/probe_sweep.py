"""Resizing/normalisation probe sweep: kNN and linear top-1 for every (resize, normalize) pair.

Corley et al. 2024 ("Revisiting pre-trained remote sensing model benchmarks: resizing and
normalization matters") show that frozen-feature probes of remote-sensing models move by
tens of points with the input size and the normalisation: probe small chips at the
pretraining size, with the pretraining normalisation. This module runs that protocol on raw
tiles held in memory; the CLI (:mod:`mmpt.eval.probe_cli`) feeds it tiles and an encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpt.eval.probe import knn_classify, linear_probe, probe_metrics
from mmpt.eval.report import new_figure, save_figure, write_json
from mmpt.io import atomic_write_text

NORMALIZE = ("checkpoint", "dataset", "minmax", "none")
Encoder = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ModelInput:
    """What the probed model was pretrained on (its "checkpoint" preprocessing).

    Attributes:
        size: Square pretraining input size in pixels (the ``pretrain`` resize).
        mean: Per-channel mean, in scaled units.
        std: Per-channel std, in scaled units.
        scale: Multiplier on raw values before mean/std (1e-4 for Sentinel-2 numbers).
        bands: Band names in channel order; None when the model does not say (RGB/any).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    bands: tuple[str, ...] | None = None


def parse_resize(spec: str) -> list[str | int]:
    """``pretrain,none,224`` -> ``["pretrain", "none", 224]``.

    Raises:
        ValueError: An entry is neither ``pretrain``, ``none`` nor a positive integer.
    """
    out: list[str | int] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in ("pretrain", "none"):
            out.append(item)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise ValueError(
                f"--resize: {item!r} is not pretrain, none or a size in pixels (e.g. 224)"
            )
    if not out:
        raise ValueError("--resize is empty; give e.g. pretrain,none,224")
    return out


def parse_normalize(spec: str) -> list[str]:
    """``checkpoint,minmax`` -> ``["checkpoint", "minmax"]``.

    Raises:
        ValueError: An entry is not one of :data:`NORMALIZE`.
    """
    out = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in out if s not in NORMALIZE]
    if bad or not out:
        raise ValueError(f"--normalize: {bad or spec!r}; choose from {', '.join(NORMALIZE)}")
    return out


def band_stats(raw: Tensor) -> dict[str, Tensor]:
    """Per-band mean, std, min and max of raw tiles (the ``dataset``/``minmax`` statistics).

    Args:
        raw: Float tensor (N, C, H, W) of raw values.

    Returns:
        Dict of (C,) float tensors: ``mean``, ``std``, ``min``, ``max``.
    """
    x = raw.transpose(0, 1).reshape(raw.shape[1], -1).double()  # (C, N*H*W)
    return {
        "mean": x.mean(1).float(),
        "std": x.std(1, unbiased=False).float(),
        "min": x.amin(1).float(),
        "max": x.amax(1).float(),
    }


def prepare(
    raw: Tensor, size: int | None, normalize: str, model: ModelInput, stats: dict[str, Tensor]
) -> Tensor:
    """Resize then normalise raw tiles for one sweep setting.

    Args:
        raw: Float tensor (B, C, H, W) of raw values.
        size: Target square size (bilinear, antialiased when shrinking); None keeps H, W.
        normalize: ``checkpoint`` ``(x * scale - mean) / std`` with the model's numbers;
            ``dataset`` ``(x - mean) / std`` with the training tiles' per-band statistics;
            ``minmax`` ``(x - min) / (max - min)`` per band; ``none`` raw values.
        model: The model's pretraining input.
        stats: :func:`band_stats` of the training tiles.

    Returns:
        Float tensor (B, C, size, size) (or (B, C, H, W)).
    """
    x = raw.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    view = (1, -1, 1, 1)
    if normalize == "checkpoint":
        mean = torch.tensor(model.mean).view(view)
        std = torch.tensor(model.std).view(view)
        return (x * model.scale - mean) / std
    if normalize == "dataset":
        return (x - stats["mean"].view(view)) / stats["std"].clamp_min(1e-6).view(view)
    if normalize == "minmax":
        span = (stats["max"] - stats["min"]).clamp_min(1e-6)
        return (x - stats["min"].view(view)) / span.view(view)
    return x


@torch.no_grad()
def encode_all(encode: Encoder, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, D) of prepared images (N, C, H, W), ``batch_size`` at a time."""
    return torch.cat([encode(images[i : i + batch_size]).float().cpu() for i in
                      range(0, len(images), batch_size)])  # fmt: skip


def run_sweep(
    encode: Encoder,
    model: ModelInput,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    resizes: Sequence[str | int],
    normalizes: Sequence[str],
    k: int = 5,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Top-1 of kNN and linear probes for every (resize, normalize) combination.

    Args:
        encode: Maps prepared images (B, C, H, W) to features (B, D).
        model: The model's pretraining input (size for ``pretrain``, numbers for
            ``checkpoint``).
        train: Raw training tiles (N, C, H, W) and labels (N,).
        test: Raw test tiles (M, C, H', W') and labels (M,).
        resizes: ``pretrain``, ``none`` or sizes in pixels.
        normalizes: Entries of :data:`NORMALIZE`.
        k: kNN neighbours (cosine).
        epochs: Linear-probe epochs.
        seed: Linear-probe seed.
        batch_size: Encoder batch size.

    Returns:
        One row per setting: ``resize``, ``size`` (pixels fed to the model), ``normalize``,
        ``knn_top1``, ``linear_top1``.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    stats = band_stats(train_x)
    rows = []
    for resize in resizes:
        size = model.size if resize == "pretrain" else None if resize == "none" else int(resize)
        for norm in normalizes:
            feats = [
                encode_all(encode, prepare(x, size, norm, model, stats), batch_size)
                for x in (train_x, test_x)
            ]
            knn = knn_classify(feats[0], train_y, feats[1], k=k, num_classes=num_classes)
            lin = linear_probe(feats[0], train_y, feats[1], num_classes, epochs=epochs, seed=seed)
            rows.append({
                "resize": str(resize),
                "size": size if size is not None else int(test_x.shape[-1]),
                "normalize": norm,
                "knn_top1": probe_metrics(knn, test_y, num_classes)["top1"],
                "linear_top1": probe_metrics(lin, test_y, num_classes)["top1"],
            })  # fmt: skip
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a Markdown table, one line per setting (top-1 in percent)."""
    lines = [
        "| resize | size (px) | normalize | kNN top-1 | linear top-1 |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['resize']} | {r['size']} | {r['normalize']} | "
            f"{100 * r['knn_top1']:.1f} | {100 * r['linear_top1']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per normalisation, one bar per (resize, method)."""
    norms = list(dict.fromkeys(r["normalize"] for r in rows))
    resizes = list(dict.fromkeys(r["resize"] for r in rows))
    bars = [(rs, m) for m in ("knn", "linear") for rs in resizes]
    fig = new_figure(max(5.0, 1.6 * len(norms) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(bars)
    lookup = {(r["normalize"], r["resize"]): r for r in rows}
    for j, (rs, method) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(norms))]
        ys = [100 * lookup[(n, rs)][f"{method}_top1"] if (n, rs) in lookup else 0 for n in norms]
        ax.bar(xs, ys, width, label=f"{method}, resize {rs}", hatch="//" if method == "linear"
               else None)  # fmt: skip
    ax.set_xticks(range(len(norms)), norms)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("normalize")
    ax.set_title(title or "probe sweep")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def write_sweep(rows: Sequence[dict[str, Any]], out: str | Path, **context: Any) -> dict[str, Path]:
    """Write ``probe_sweep.json``, ``probe_sweep.md`` and ``probe_sweep.png`` into ``out``.

    Returns:
        The written paths by kind (``json``, ``markdown``, ``png``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {f"{r['resize']}/{r['normalize']}/{m}_top1": r[f"{m}_top1"] for r in rows
               for m in ("knn", "linear")}  # fmt: skip
    paths = {"json": write_json(out / "probe_sweep.json", metrics, rows=list(rows), **context)}
    md = out / "probe_sweep.md"
    atomic_write_text(md, markdown_table(rows))
    paths["markdown"] = md
    paths["png"] = plot_sweep(rows, out / "probe_sweep.png", title=str(context.get("model", "")))
    return paths
