"""``mmpt schedule``: plot a config's LR schedule (PNG) before a run starts, without the model."""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

from mmpt.cli_args import Parser
from mmpt.io import read_yaml
from mmpt.models.schedules import Schedule
from mmpt.user_errors import debug_enabled

KEY = "model.init_args.lr_schedule"
LR_KEY = "model.init_args.optimizer.init_args.lr"


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mmpt schedule",
        description="Plot the LR of every optimizer step of a training config's "
        f"{KEY} (peak: {LR_KEY}), composing -c files as `mmpt fit` does. "
        "Nothing is built but the schedule.",
    )
    p.add_argument(
        "-c", "--config", action="append", required=True, help="config file(s), later ones win"
    )
    p.add_argument(
        "--total-steps",
        type=int,
        default=None,
        help="optimizer steps of the run (default: trainer.max_steps)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="PNG to write (default: <trainer.default_root_dir>/lr_schedule.png)",
    )
    p.add_argument(
        "--lr-only",
        action="store_true",
        help="plot and print the LR alone, without the fraction-of-peak axis and column",
    )
    return p


def schedule_values(schedule: Schedule, total: int) -> list[float]:
    """The schedule's factor of the peak LR at every optimizer step ``0 .. total - 1``.

    Args:
        schedule: The schedule (bound to its peak LR where it needs one, see ``Schedule.bind``).
        total: Optimizer steps of the run.

    Returns:
        ``total`` factors; the LR of step ``s`` is ``peak_lr * values[s]``.
    """
    return [schedule.factor(step, total) for step in range(total)]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings merged key by key, ``over`` winning (a new copy; inputs untouched)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` (e.g. ``trainer.max_steps``), ``None`` where any part is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_schedule(configs: list[str]) -> tuple[Schedule, float | None, dict[str, Any]]:
    """The schedule, the optimizer's peak LR and the merged config of ``configs``, in order.

    The schedule nodes are composed by jsonargparse as LightningCLI does (a later
    ``class_path`` keeps the earlier ``init_args`` its class accepts); everything else is
    merged as nested mappings.

    Raises:
        FileNotFoundError: A config file is missing.
        ValueError: A file is no mapping, no file has the schedule, or it does not parse.
    """
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{KEY}", type=Schedule)
    merged: dict[str, Any] = {}
    namespace = None
    for path in configs:
        cfg = read_yaml(path, "-c") or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"-c {path}: not a mapping of config keys")
        merged = merge(merged, cfg)
        node = get(cfg, KEY)
        if node is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                namespace = parser.parse_object(_nest(KEY, node), namespace=namespace)
        except ArgumentError as e:
            raise ValueError(f"-c {path}: {' '.join(str(e).split())}") from None
    if namespace is None:
        raise ValueError(f"no {KEY} in {', '.join(configs)}: nothing to plot")
    schedule = parser.instantiate(namespace)[KEY]
    peak = get(merged, LR_KEY)
    if peak is not None:
        schedule.bind(float(peak))
    return schedule, (float(peak) if peak is not None else None), merged


def total_steps(cfg: dict[str, Any], given: int | None) -> int:
    """``--total-steps``, else ``trainer.max_steps``.

    Raises:
        ValueError: Neither is a positive number of steps.
    """
    if given is not None:
        if given < 1:
            raise ValueError(f"--total-steps={given} must be >= 1")
        return given
    max_steps = get(cfg, "trainer.max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    raise ValueError(
        "the run length is unknown (trainer.max_steps is not set; an epoch-based run needs "
        "its data to count steps): pass --total-steps N"
    )


def plot(
    schedule: Schedule, total: int, peak: float | None, out: Path, lr_only: bool = False
) -> list[float]:
    """Write the LR of every step to ``out`` (PNG); returns the factors (``schedule_values``).

    Vertical lines mark the end of warmup and the start of decay; the peak is labelled.
    Without ``peak`` the y axis is the fraction of the peak.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = schedule_values(schedule, total)
    scale = peak if peak is not None else 1.0
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(total), [v * scale for v in values], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate" if peak is not None else "LR / peak")
    ax.set_title(f"{type(schedule).__name__}, {total:,} steps")
    ax.set_xlim(0, max(1, total - 1))
    warmup, decay = schedule.warmup_for(total), schedule.decay_start(total)
    if 0 < warmup < total:
        ax.axvline(warmup, color="tab:green", ls="--", lw=1, label=f"warmup end ({warmup:,})")
    if 0 < decay < total and decay != warmup:
        ax.axvline(decay, color="tab:red", ls="--", lw=1, label=f"decay start ({decay:,})")
    top = max(values) * scale
    ax.set_ylim(0, top * 1.12 or 1.0)
    ax.axhline(top, color="gray", ls=":", lw=1)
    label = f"peak {top:.3g}" if peak is not None else f"peak {top:.3g} x lr"
    ax.annotate(label, (values.index(max(values)), top), xytext=(4, 4), textcoords="offset points")
    if not lr_only and peak is not None:
        right = ax.secondary_yaxis("right", functions=(lambda y: y / peak, lambda f: f * peak))
        right.set_ylabel("fraction of peak")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower center", fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt schedule``; returns an exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        schedule, peak, cfg = load_schedule(args.config)
        total = total_steps(cfg, args.total_steps)
        root = get(cfg, "trainer.default_root_dir") or "."
        out = Path(args.out) if args.out else Path(root) / "lr_schedule.png"
        values = plot(schedule, total, peak, out, lr_only=args.lr_only)
    except (FileNotFoundError, ValueError) as e:
        if debug_enabled():  # MMPT_DEBUG=1: the traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    warmup, decay = schedule.warmup_for(total), schedule.decay_start(total)
    points = {"start": 0}
    if warmup > 0:
        points["end of warmup"] = warmup - 1
    points["middle"] = total // 2
    if warmup < decay < total:
        points["decay start"] = decay
    points["last"] = total - 1
    for name, step in sorted(points.items(), key=lambda kv: kv[1]):
        if not 0 <= step < total:
            continue
        f = values[step]
        lr = f"lr {f * peak:.4g}" if peak is not None else f"{f:.4f} x lr"
        share = "" if args.lr_only or peak is None else f"  ({f:.4f} x peak)"
        print(f"  {name:<14} step {step:>9,}  {lr}{share}")
    return 0


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out
