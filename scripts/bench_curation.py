"""Scoring benchmark: ``mmpt data score`` vs a plain WebDataset loop over the same model.

Both score the same shards with the tiny CLIP of ``configs/quickstart/clip_tiny.yaml`` (random
weights: the speed does not depend on them): image decode, resize to the model's 32 px, its
normalisation, tokenization, both towers, the cosine of each pair. The plain loop is what a
user writes by hand: ``wds.WebDataset(...).decode("pil").to_tuple("jpg", "txt")`` with the
model's own transforms in the workers, a DataLoader with the same batch size and workers, and
the model's ``encode_image`` / ``encode_text`` in a ``torch.no_grad`` loop. ``mmpt data score``
runs as the command (a Lightning predict job), with 1 rank and with 2 ranks under torchrun;
each rank reports its own samples/s after its first batch (workers up), as the plain loop is
timed, and the wall time of the command includes the process and loader start-up.

The machine this runs on may be shared, so one reading says little: the settings run
interleaved (plain, 1 rank, 2 ranks, plain, 1 rank, 2 ranks ...) ``--repeats`` times, each
is reported as the median and the min-max spread of its repeats, and the load average
(1 min) at the start and the end of the run is printed with the table.

    python scripts/bench_curation.py --samples 400 --repeats 3

Prints a Markdown table; ``--json FILE`` also writes every run as it completes.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_dataloader import machine, make_shards  # noqa: E402
from bench_harness import ResultLog  # noqa: E402

RECIPE = ROOT / "configs" / "quickstart" / "clip_tiny.yaml"


def setup(work: Path, samples: int) -> tuple[Path, Path, Path]:
    """Shards (64 px JPEGs), the recipe pointed at them, and a checkpoint of random weights."""
    from mmpt.run_config import build_from_config

    shards = make_shards(work / "shards", "small", samples)
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["data"]["init_args"] |= {"synthetic": None, "text_key": "txt", "val_text_key": "txt"}
    cfg["data"]["init_args"]["train"]["urls"] = str(shards)
    cfg["data"]["init_args"]["val"]["urls"] = str(shards)
    config = work / "clip.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ckpt = work / "random.ckpt"
    if not ckpt.exists():
        torch.manual_seed(0)
        model = build_from_config([str(config)], []).model
        torch.save({"state_dict": model.state_dict()}, ckpt)
    return shards, config, ckpt


def plain_loop(config: Path, ckpt: Path, shards: Path, bs: int, workers: int) -> dict[str, float]:
    """The hand-written WebDataset scoring loop; samples/s after the first batch."""
    import webdataset as wds

    from mmpt.datamodules.urls import resolve_source
    from mmpt.models.module import load_checkpoint
    from mmpt.run_config import build_from_config

    model = build_from_config([str(config)], []).model.eval()
    load_checkpoint(model, str(ckpt))
    pre = model.preprocess
    mean = torch.tensor(pre.image.mean).view(3, 1, 1)
    std = torch.tensor(pre.image.std).view(3, 1, 1)
    size = pre.image.size

    def image(img: Any) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img.convert("RGB").resize((size, size), 3)))
        return (x.permute(2, 0, 1).float() / 255 - mean) / std

    urls = resolve_source(str(shards)).urls
    data = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(image, lambda t: t)
    )
    loader = torch.utils.data.DataLoader(data.batched(bs), batch_size=None, num_workers=workers)
    n, start = 0, None
    with torch.no_grad():
        for images, texts in loader:
            img = model.encode_image(images)
            txt = model.encode_text(pre.tokenizer(list(texts)))
            (img * txt).sum(-1)
            if start is None:
                start = time.perf_counter()  # after the first batch: workers are up
            else:
                n += len(texts)
    return {"samples_per_s": n / (time.perf_counter() - start)}


def mmpt_score(config: Path, ckpt: Path, shards: Path, out: Path, ranks: int, args: Any) -> dict:
    """``mmpt data score`` as a command; 2 ranks under torchrun. Wall time and per-rank rates."""
    for f in out.glob("*.parquet") if out.exists() else []:
        f.unlink()  # a fresh output: nothing to resume
    cmd = ["-m", "mmpt.cli", "data", "score", "-c", str(config), "--ckpt", str(ckpt)]
    cmd += ["--from", str(shards), "--out", str(out), "--batch-size", str(args.batch_size)]
    cmd += ["--num-workers", str(args.workers), "--accelerator", "cpu", "--text-key", "txt"]
    if ranks > 1:
        with socket.socket() as sock:  # a free port: other jobs may hold torchrun's default
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        cmd = [*launch, "--master-port", port, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=out.parent
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    # each rank's rate after its first batch (workers up), as the plain loop's
    rates = [float(r) for r in re.findall(r"([\d.]+) after the first batch", done.stdout)]
    return {"wall_s": wall, "rank_samples_per_s": rates, "samples_per_s": sum(rates)}


def summary(runs: list[float]) -> str:
    """``median (min-max)`` of a setting's repeats."""
    return f"{statistics.median(runs):.0f} ({min(runs):.0f}-{max(runs):.0f})"


def main() -> None:
    """Run the settings interleaved, ``--repeats`` times, and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    p.add_argument("--work", type=Path, default=Path("runs/bench_curation"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.work = args.work.resolve()  # the scoring commands run from inside it
    args.work.mkdir(parents=True, exist_ok=True)
    shards, config, ckpt = setup(args.work, args.samples)
    log = ResultLog(
        str(args.json) if args.json else None,
        machine=machine(),
        samples=args.samples,
        batch_size=args.batch_size,
        workers=args.workers,
        load_avg_start=os.getloadavg(),
    )
    settings = {
        "plain WebDataset loop": lambda: plain_loop(
            config, ckpt, shards, args.batch_size, args.workers
        ),
        **{
            f"mmpt data score, {ranks} rank(s)": lambda ranks=ranks: mmpt_score(
                config, ckpt, shards, args.work / f"scores-{ranks}", ranks, args
            )
            for ranks in (1, 2)
        },
    }
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name, run in settings.items():
            result = {"setting": name, "repeat": repeat, "load_avg": os.getloadavg()[0], **run()}
            runs[name].append(result)
            log.results([result])
    log.data["load_avg_end"] = os.getloadavg()
    log.write()
    start, end = log.data["load_avg_start"][0], log.data["load_avg_end"][0]
    print(
        f"\n{machine()}; {args.samples} samples, batch {args.batch_size}, {args.workers} workers, "
        f"{args.repeats} interleaved repeats; load average (1 min) {start:.1f} at the start, "
        f"{end:.1f} at the end\n"
    )
    print("| scorer | samples/s (scoring), median (min-max) | wall s (incl. start-up) |")
    print("|---|---|---|")
    for name, rows in runs.items():
        wall = summary([r["wall_s"] for r in rows]) if "wall_s" in rows[0] else "-"
        print(f"| {name} | {summary([r['samples_per_s'] for r in rows])} | {wall} |")


if __name__ == "__main__":
    main()
