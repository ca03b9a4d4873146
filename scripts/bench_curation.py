"""Scoring benchmark: ``mmpt data score`` vs a plain WebDataset loop over the same model.

Both score the same shards with the tiny CLIP of ``configs/quickstart/clip_tiny.yaml`` (random
weights: the speed does not depend on them): image decode, resize to the model's 32 px, its
normalisation, tokenization, both towers, the cosine of each pair. The plain loop is what a
user writes by hand: ``wds.WebDataset(...).decode("pil").to_tuple("jpg", "txt")`` with the
model's own transforms in the workers, a DataLoader with the same batch size and workers, and
the model's ``encode_image`` / ``encode_text`` in a ``torch.no_grad`` loop. ``mmpt data score``
runs as the command (a Lightning predict job), with 1 rank and with 2 ranks under torchrun;
each rank reports its own samples/s after start-up, and the wall time includes start-up.

    python scripts/bench_curation.py --samples 4000 --workers 2

Prints a Markdown table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    cmd = ["-m", "mmpt.cli", "data", "score", "-c", str(config), "--ckpt", str(ckpt)]
    cmd += ["--from", str(shards), "--out", str(out), "--batch-size", str(args.batch_size)]
    cmd += ["--num-workers", str(args.workers), "--accelerator", "cpu", "--text-key", "txt"]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=out.parent
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    rates = [float(r) for r in re.findall(r"\(([\d.]+) samples/s\)", done.stdout)]
    return {"wall_s": wall, "rank_samples_per_s": rates, "samples_per_s": sum(rates)}


def main() -> None:
    """Run both and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/bench_curation"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards, config, ckpt = setup(args.work, args.samples)
    results = {
        "plain WebDataset loop": plain_loop(config, ckpt, shards, args.batch_size, args.workers)
    }
    for ranks in (1, 2):
        out = args.work / f"scores-{ranks}"
        if out.exists():
            for f in out.glob("*.parquet"):
                f.unlink()
        results[f"mmpt data score, {ranks} rank(s)"] = mmpt_score(
            config, ckpt, shards, out, ranks, args
        )
    print(
        f"\n{machine()}; {args.samples} samples, batch {args.batch_size}, {args.workers} workers\n"
    )
    print("| scorer | samples/s (scoring) | wall s (incl. start-up) |")
    print("|---|---|---|")
    for name, r in results.items():
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        print(f"| {name} | {r['samples_per_s']:.0f} | {wall} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
