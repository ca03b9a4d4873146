"""Several validation sets (old and new domains): metric names per set, history, forgetting plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.eval.report import new_figure, save_figure, write_json

#: Metrics drawn in ``forgetting.png`` (those a run logged), one panel each.
PLOT_METRICS = (
    "loss",
    *("retrieval/t2i/R@1", "retrieval/i2t/R@1"),
    *("retrieval/t2a/R@1", "retrieval/a2t/R@1"),  # audio-text models
    *("retrieval/t2v/R@1", "retrieval/v2t/R@1"),  # video-text models
    "zeroshot/top1",
    "knn/top1",
)

#: Metrics where lower is better (their "drop" is a rise).
#: Metric-name endings where lower is better (every loss, every rank).
LOWER_IS_BETTER = ("loss", "_rank")


def val_set_names(trainer: Any) -> list[str]:
    """Names of the validation sets, in dataloader order.

    From the datamodule's ``val_set_names`` when it has them (``"val"`` for the plain
    validation set, then ``data.eval_sets``' names); else ``["val"]`` for a single loader and
    ``set0``, ``set1``, ... for several.

    Args:
        trainer: The running trainer, or None.

    Returns:
        One name per validation dataloader (``["val"]`` without a trainer).
    """
    if trainer is None:
        return ["val"]
    names = getattr(getattr(trainer, "datamodule", None), "val_set_names", None)
    if names:
        return list(names)
    count = len(trainer.num_val_batches or [0])
    return ["val"] if count <= 1 else [f"set{i}" for i in range(count)]


def eval_prefix(trainer: Any, stage: str, dataloader_idx: int = 0) -> str:
    """Metric prefix of a batch: ``val/<set>`` with several validation sets, else ``stage``.

    Args:
        trainer: The running trainer, or None.
        stage: ``"val"`` or ``"test"`` (test has one set: always ``"test"``).
        dataloader_idx: Index of the batch's dataloader.

    Returns:
        E.g. ``"val"`` (one set), ``"val/old_domain"`` (several) or ``"test"``.
    """
    if stage != "val":
        return stage
    names = val_set_names(trainer)
    name = names[dataloader_idx] if dataloader_idx < len(names) else "val"
    return stage if len(names) <= 1 or name == "val" else f"{stage}/{name}"


def split_metric(key: str, names: list[str]) -> tuple[str, str] | None:
    """``val/<set>/<metric>`` (several sets) or ``val/<metric>`` (one) -> (set, metric).

    Args:
        key: A logged metric name.
        names: The validation set names (see :func:`val_set_names`).

    Returns:
        (set name, metric name), or None for a key that is no validation metric.
    """
    if not key.startswith("val/"):
        return None
    rest = key[len("val/") :]
    if len(names) <= 1:
        return (names[0] if names else "val"), rest
    head, _, metric = rest.partition("/")
    if head in names and head != "val" and metric:
        return head, metric
    return ("val", rest) if "val" in names else None  # the plain set keeps ``val/<metric>``


@dataclass
class ForgettingHistory:
    """Every validation metric of every set, against the global step.

    Attributes:
        steps: Global step of each recorded validation.
        values: Set -> metric -> one value per recorded validation (NaN where not logged).
    """

    steps: list[int] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def record(self, step: int, metrics: dict[str, Any], names: list[str]) -> None:
        """Add one validation's metrics (e.g. ``trainer.callback_metrics``).

        Args:
            step: Global step of the validation.
            metrics: Logged name -> scalar (tensor or float); non-validation keys are ignored.
            names: The validation set names (see :func:`val_set_names`).
        """
        index = len(self.steps)
        self.steps.append(int(step))
        for key, value in metrics.items():
            parsed = split_metric(key, names)
            if parsed is None:
                continue
            series = self.values.setdefault(parsed[0], {}).setdefault(parsed[1], [])
            series.extend([math.nan] * (index - len(series)))  # metric new since last time
            series.append(float(value))
        for per_set in self.values.values():
            for series in per_set.values():
                series.extend([math.nan] * (index + 1 - len(series)))

    def __len__(self) -> int:
        return len(self.steps)

    def forgetting(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per set and metric: best, last and drop (best - last; last - best when lower is better).

        Returns:
            Set -> metric -> ``{"best", "last", "drop", "best_step"}``; metrics never logged
            as a finite value are left out.
        """
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, per_set in self.values.items():
            for metric, series in per_set.items():
                seen = [(v, s) for v, s in zip(series, self.steps, strict=True) if math.isfinite(v)]
                if not seen:
                    continue
                lower = metric.rsplit("/", 1)[-1].endswith(LOWER_IS_BETTER)
                best, best_step = (min if lower else max)(seen, key=lambda p: p[0])
                last = seen[-1][0]
                drop = last - best if lower else best - last
                out.setdefault(name, {})[metric] = {
                    "best": best,
                    "last": last,
                    "drop": drop,
                    "best_step": best_step,
                }
        return out

    def write(self, out_dir: Path, metrics: tuple[str, ...] = PLOT_METRICS) -> dict[str, Path]:
        """Write ``forgetting.json`` (history + drops) and ``forgetting.png`` into ``out_dir``.

        Args:
            out_dir: Output folder (created).
            metrics: Metrics to draw, one panel each (those never logged are left out).

        Returns:
            ``{"forgetting_json": path, "forgetting_plot": path}`` (no plot when no drawn metric
            was logged).
        """
        paths = {
            "forgetting_json": write_json(
                out_dir / "forgetting.json",
                self.forgetting(),
                steps=self.steps,
                history=self.values,
            )
        }
        drawn = [m for m in metrics if any(m in per_set for per_set in self.values.values())]
        if drawn:
            paths["forgetting_plot"] = plot_forgetting(self, drawn, out_dir / "forgetting.png")
        return paths


def plot_forgetting(history: ForgettingHistory, metrics: list[str], path: Path) -> Path:
    """One panel per metric, one line per validation set, x = global step.

    Args:
        history: The recorded validations.
        metrics: Metric names to draw (e.g. ``retrieval/t2i/R@1``).
        path: Output PNG.

    Returns:
        The path written.
    """
    fig = new_figure(4.0 * len(metrics), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for name, per_set in history.values.items():
            if metric in per_set:
                ax.plot(history.steps, per_set[metric], marker="o", label=name)
        ax.set(xlabel="global step", title=metric)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)
