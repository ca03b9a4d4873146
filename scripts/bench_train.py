"""Training throughput of mmpt configs: samples/s, tokens/s, TFLOP/s, MFU, data wait, memory.

Each ``--config`` is built as ``mmpt fit`` would build it (``build_cli(run=False)``), then
trained for ``--warmup + --steps`` steps on its own datamodule (quickstart configs synthesise
their data on first use) under :class:`~mmpt.throughput.ThroughputMonitor`; the last
``--steps`` steps are averaged. No checkpoint, logger or validation. A config that fails is
recorded (its error and traceback in the JSON) and the next one still runs; ``--json`` is
rewritten after every config. ``configs/bench/`` holds real-shape recipes (CLIP ViT-B/16, MAE
ViT-B/16, a so400m + 0.5B VLM) on synthetic data, which ``scripts/gpu_check.sh`` runs.

    python scripts/bench_train.py --config configs/quickstart/clip_tiny.yaml \\
        --config configs/quickstart/vila_stage1.yaml --steps 5 --device cpu \\
        --set data.init_args.batch_size=8 --set data.init_args.num_workers=0
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("config", "config", "{}"),
    ("samples/s", "perf/samples_per_s", "{:.1f}"),
    ("tokens/s", "perf/tokens_per_s", "{:.0f}"),
    ("TFLOP/s", "perf/tflops_per_s", "{:.4g}"),
    ("MFU", "perf/mfu", "{:.1%}"),
    ("data wait", "perf/data_wait_fraction", "{:.1%}"),
    ("peak mem GiB", "peak_mem_gib", "{:.2f}"),
)


def bench_config(
    config: str,
    steps: int,
    warmup: int = 1,
    device: str = "auto",
    precision: str | None = None,
    peak_tflops: float | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train ``config`` for ``warmup + steps`` steps and return the averaged throughput.

    Args:
        config: A ``mmpt fit`` YAML config.
        steps: Steps averaged.
        warmup: Steps run first and not averaged (at least 1: the first includes loader start).
        device: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision; default the config's.
        peak_tflops: Peak TFLOP/s of the device (else the table of :func:`peak_flops`).
        overrides: ``key=value`` CLI overrides, e.g. ``data.init_args.batch_size=8``.

    Returns:
        ``config``, the ``perf/*`` values of :class:`ThroughputMonitor` and ``peak_mem_gib``
        (CUDA max allocated, or the process's max RSS on CPU).
    """
    from mmpt.cli import build_cli
    from mmpt.throughput import ThroughputMonitor

    args = ["-c", config, "--trainer.logger=false", *(f"--{o}" for o in overrides or [])]
    cli = build_cli(args, run=False)
    monitor = ThroughputMonitor(window=steps, peak_tflops=peak_tflops, log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision or cli.trainer.precision,
        max_steps=max(1, warmup) + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    if cuda:
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is KiB on Linux
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"config": config, **monitor.last, "peak_mem_gib": mem}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`bench_config` results (``-`` where a value is missing)."""
    cells = [[title for title, _, _ in COLUMNS]]
    for row in rows:
        line = []
        for _, key, fmt in COLUMNS:
            value = row.get(key)
            ok = value is not None and not (isinstance(value, float) and math.isnan(value))
            line.append(fmt.format(value) if ok else "-")
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line: benchmark every ``--config`` and print one table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True, help="mmpt fit config (repeat)")
    p.add_argument("--steps", type=int, default=10, help="steps averaged")
    p.add_argument("--warmup", type=int, default=2, help="steps not averaged (>= 1)")
    p.add_argument("--device", default="auto", help="cpu, gpu or auto")
    p.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: the config's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    rows: list[dict[str, Any]] = []
    for config in args.config:  # one failure is recorded, the next config still runs
        try:
            rows.append(
                bench_config(
                    config,
                    args.steps,
                    args.warmup,
                    args.device,
                    args.precision,
                    args.peak_tflops,
                    args.set,
                )
            )
        except Exception as err:  # noqa: BLE001 (recorded with its traceback)
            rows.append({"config": config, "error": f"{type(err).__name__}: {err}"})
            rows[-1]["traceback"] = traceback.format_exc()[-3000:]
            print(f"{config}: FAILED: {rows[-1]['error']}", file=sys.stderr)
        if args.json:  # after every config: an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
