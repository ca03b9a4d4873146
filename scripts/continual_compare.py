"""Continual-update comparison on the quickstart's two domains: forgetting and gain per method.

In the manner of "A Practitioner's Guide to Continual Multimodal Pretraining" (FoMo-in-Flux),
the model trained on domain A (``configs/quickstart/clip_tiny.yaml``) is updated on domain B
(``configs/quickstart/continual_tiny.yaml``) in several ways, one fresh ``mmpt fit`` each, with
the overlays ``configs/continual/<setting>.yaml``: ``full`` (every weight), ``lora``, ``dora``
(peft adapters only), ``lora_merge`` (LoRA merged into the base every epoch and restarted),
``ema`` (full, evaluated on an EMA of the weights). The A model itself is evaluated first
(``mmpt validate``), and per setting the script reports, on each domain's held-out set, the
final metric, the forgetting on A (base - final) and the gain on B (final - base)::

    mmpt fit -c configs/quickstart/clip_tiny.yaml          # domain A, once
    python scripts/continual_compare.py --out runs/continual_compare

Writes ``OUT/continual_compare.json``, ``OUT/continual_compare.md`` and
``OUT/continual_compare.png`` (gain on B against forgetting on A, one point per setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("full", "lora", "dora", "lora_merge", "ema")
METRICS = ("retrieval/t2i/R@1", "retrieval/i2t/R@1")
OLD, NEW = "A", "B"


def last_values(run_dir: Path) -> dict[str, float]:
    """The last finite value of every column of the newest ``metrics.csv`` under ``run_dir``.

    Raises:
        FileNotFoundError: The run wrote no metrics.
    """
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}: did the run fail?")
    out: dict[str, float] = {}
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(number):
                    out[key] = number
    return out


def score(values: dict[str, float], domain: str, metrics: tuple[str, ...]) -> float:
    """Mean of ``metrics`` on validation set ``domain`` (``val/<domain>/<metric>``)."""
    keys = [f"val/{domain}/{m}" for m in metrics]
    missing = [k for k in keys if k not in values]
    if missing:
        raise KeyError(f"metrics not logged: {missing} (logged: {sorted(values)[:8]} ...)")
    return sum(values[k] for k in keys) / len(keys)


def run_mmpt(subcommand: str, configs: list[str], root: Path, extra: list[str]) -> dict[str, Any]:
    """One ``mmpt <subcommand>`` in a fresh process; its metrics, wall time and trainable count."""
    cmd = [sys.executable, "-m", "mmpt.cli", subcommand]
    for cfg in configs:
        cmd += ["-c", cfg]
    cmd += ["--trainer.default_root_dir", str(root), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (root.parent / f"{root.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return {"values": last_values(root), "seconds": seconds, "trainable": trained(done.stdout)}


def trained(log: str) -> list[float | None]:
    """(trainable, total) parameter counts from Lightning's model summary in a run's output."""
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
    counts: list[float | None] = []
    for what in ("Trainable params", "Total params"):
        found = re.findall(rf"{what}: ([\d.]+) ?([KMB]?)", log)
        counts.append(float(found[-1][0]) * scale[found[-1][1]] if found else None)
    return counts


def compare(
    config: str, settings: list[str], out: Path, extra: list[str], metrics: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Evaluate the base, run every setting, and return one table row each (base first)."""
    out.mkdir(parents=True, exist_ok=True)
    base = run_mmpt("validate", [config], out / "base", extra=[])
    old0, new0 = score(base["values"], OLD, metrics), score(base["values"], NEW, metrics)
    rows = [{"setting": "base (A model)", OLD: old0, NEW: new0, "forgetting": 0.0, "gain": 0.0}]
    for name in settings:
        overlay = str(REPO / "configs" / "continual" / f"{name}.yaml")
        result = run_mmpt("fit", [config, overlay], out / name, extra)
        old, new = score(result["values"], OLD, metrics), score(result["values"], NEW, metrics)
        train, total = result["trainable"]
        rows.append(
            {
                "setting": name,
                OLD: old,
                NEW: new,
                "forgetting": old0 - old,
                "gain": new - new0,
                "trainable_share": train / total if train is not None and total else None,
                "seconds": result["seconds"],
            }
        )
        write_reports(rows, out, metrics, config, extra)  # after each run: partial results stay
    return rows


def markdown(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """The table: final score on A and B, forgetting on A, gain on B, trainable share."""
    what = " + ".join(metrics) if len(metrics) == 1 else f"mean of {', '.join(metrics)}"
    lines = [
        f"Score: {what} on each domain's held-out set.",
        "",
        f"| setting | {OLD} (old) | {NEW} (new) | forgetting on {OLD} | gain on {NEW} "
        "| trained weights | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("trainable_share")
        seconds = r.get("seconds")
        lines.append(
            f"| {r['setting']} | {r[OLD]:.3f} | {r[NEW]:.3f} | {r['forgetting']:+.3f} "
            f"| {r['gain']:+.3f} | {'' if share is None else f'{share:.1%}'} "
            f"| {'' if seconds is None else f'{seconds:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Gain on the new domain against forgetting on the old one, one labelled point a setting."""
    from mmpt.eval.report import new_figure, save_figure

    fig = new_figure(5.0, 4.0)
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["forgetting"], r["gain"], s=40)
        ax.annotate(r["setting"], (r["forgetting"], r["gain"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set(xlabel=f"forgetting on {OLD} (lower is better)", ylabel=f"gain on {NEW}")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def write_reports(
    rows: list[dict[str, Any]], out: Path, metrics: tuple[str, ...], config: str, extra: list[str]
) -> None:
    """JSON (rows + how they were made), Markdown table and plot into ``out``."""
    meta = {"config": config, "overrides": extra, "metrics": list(metrics)}
    (out / "continual_compare.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "continual_compare.md").write_text(markdown(rows, metrics))
    plot(rows, out / "continual_compare.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart/continual_tiny.yaml")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--out", default="runs/continual_compare")
    p.add_argument("--metrics", nargs="+", default=list(METRICS))
    p.add_argument(
        "overrides", nargs="*", help="extra `mmpt fit` flags for every setting, after --, "
        "e.g. -- --trainer.max_epochs 2",
    )  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    rows = compare(args.config, args.settings, out, args.overrides, tuple(args.metrics))
    print(markdown(rows, tuple(args.metrics)))
    print(f"written to {out}/continual_compare.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
