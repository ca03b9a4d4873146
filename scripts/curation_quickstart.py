"""Curation quickstart: a CLIP trained on CLIP-filtered data beats one trained on the raw data.

Steps, each an ``mmpt`` command a user would run:

1. ``mmpt data synth --kind image-text``: the synthetic shapes set (train + held-out val).
2. A "raw" web-like copy of its training set where a fraction ``--noise`` of the captions
   belong to another image (written here with webdataset's TarWriter).
3. A scorer: the tiny CLIP trained on a small clean subset (DFN's filtering network on
   high-quality data).
4. ``mmpt data score`` of the raw set with the scorer; ``mmpt data filter --keep
   "top(clip, F)"`` keeps the best fraction.
5. The tiny CLIP trained for the same number of steps on raw and on curated data; retrieval
   R@1 on the held-out set (``mmpt eval retrieval``) for both.

    python scripts/curation_quickstart.py --work runs/curation_quickstart

Writes ``<work>/report.json`` and ``<work>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "quickstart" / "clip_tiny.yaml"


def mmpt(*args: str) -> None:
    """Run one ``mmpt`` command (as a user would), failing loudly."""
    print("$ mmpt", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "mmpt.cli", *args], check=True)


def noisy_copy(train: Path, out: Path, noise: float, seed: int, clean: Path, clean_n: int) -> float:
    """Copy ``train`` to ``out`` with a fraction ``noise`` of captions swapped; the first
    ``clean_n`` samples also go, untouched, to ``clean``. Returns the swapped fraction."""
    import webdataset as wds

    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source

    rng = random.Random(seed)
    samples = list(read_shards(resolve_source(str(train)).urls, SkipCounter()))
    captions = [s["txt"] for s in samples]
    out.mkdir(parents=True)
    clean.mkdir(parents=True)
    swapped = 0
    with (
        wds.ShardWriter(str(out / "raw-%06d.tar"), maxcount=1000, verbose=0) as raw,
        wds.ShardWriter(str(clean / "clean-%06d.tar"), maxcount=1000, verbose=0) as good,
    ):
        for i, s in enumerate(samples):
            sample = {"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"]}
            if i < clean_n:
                good.write(dict(sample))
            if rng.random() < noise:
                sample["txt"] = captions[rng.randrange(len(captions))]
                swapped += sample["txt"] != s["txt"]
            raw.write(sample)
    return swapped / len(samples)


def fit(work: Path, name: str, train: Path, val: Path, steps: int) -> Path:
    """Train the tiny CLIP recipe on ``train`` for ``steps`` steps; returns its checkpoint."""
    root = work / "runs" / name
    mmpt(
        "fit", "-c", str(RECIPE),
        "--data.init_args.train.urls", str(train),
        "--data.init_args.val.urls", str(val),
        "--data.init_args.synthetic", "null",
        "--data.init_args.text_key", "txt",
        "--trainer.max_steps", str(steps),
        "--trainer.max_epochs", "-1",
        "--trainer.check_val_every_n_epoch", "1000",
        "--trainer.default_root_dir", str(root),
    )  # fmt: skip
    return next(root.glob("version_*/checkpoints/last.ckpt"))


def retrieval(work: Path, name: str, ckpt: Path, val: Path) -> dict[str, float]:
    """``mmpt eval retrieval`` of a checkpoint on the held-out set."""
    out = work / "eval" / name
    mmpt("eval", "retrieval", "-c", str(RECIPE), "--ckpt", str(ckpt), "--data", str(val),
         "--out", str(out), "--device", "cpu")  # fmt: skip
    return json.loads((out / "retrieval.json").read_text())["metrics"]


def main() -> None:
    """Run the comparison and write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/curation_quickstart"))
    p.add_argument("--noise", type=float, default=0.5, help="fraction of wrong captions")
    p.add_argument("--keep", type=float, default=0.5, help="fraction the filter keeps")
    p.add_argument("--steps", type=int, default=300, help="training steps of each CLIP")
    p.add_argument("--scorer-steps", type=int, default=200)
    p.add_argument("--clean", type=int, default=1000, help="clean samples the scorer sees")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    shapes = work / "shapes"
    if not (shapes / "train" / "index.json").exists():
        mmpt("data", "synth", "--kind", "image-text", "--out", str(shapes))
    raw, clean = work / "raw", work / "clean"
    if not raw.exists():
        swapped = noisy_copy(shapes / "train", raw, args.noise, 0, clean, args.clean)
        mmpt("data", "index", str(raw))
        mmpt("data", "index", str(clean))
    else:
        swapped = args.noise
    val = shapes / "val"
    scorer = fit(work, "scorer", clean, val, args.scorer_steps)
    scores = work / "scores"
    mmpt("data", "score", "-c", str(RECIPE), "--ckpt", str(scorer), "--from", str(raw),
         "--out", str(scores), "--text-key", "txt", "--accelerator", "cpu")  # fmt: skip
    curated = work / "curated"
    if not curated.exists():
        keep = f"top(clip, {args.keep})"
        mmpt("data", "filter", "--from", str(raw), "--scores", str(scores), "--keep", keep,
             "--out", str(curated), "--samples-per-shard", "1000")  # fmt: skip
    results = {}
    for name, data in (("raw", raw), ("curated", curated)):
        results[name] = retrieval(work, name, fit(work, name, data, val, args.steps), val)
    precision = _kept_precision(shapes / "train", curated)
    report = {
        "noise": swapped,
        "kept_fraction": args.keep,
        "kept_with_right_caption": precision,
        "steps": args.steps,
        "t2i_R@1": {k: v["retrieval/t2i/R@1"] for k, v in results.items()},
        "i2t_R@1": {k: v["retrieval/i2t/R@1"] for k, v in results.items()},
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| training data | text->image R@1 | image->text R@1 |",
        "|---|---|---|",
        *(f"| {k} | {report['t2i_R@1'][k]:.3f} | {report['i2t_R@1'][k]:.3f} |" for k in results),
    ]
    (work / "report.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2))


def _kept_precision(train: Path, curated: Path) -> float:
    """Fraction of the curated samples whose caption is their own (the filter's precision)."""
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source

    truth = {
        s["__key__"]: s["txt"] for s in read_shards(resolve_source(str(train)).urls, SkipCounter())
    }
    kept = list(read_shards(resolve_source(str(curated)).urls, SkipCounter()))
    return sum(truth[s["__key__"]] == s["txt"] for s in kept) / max(len(kept), 1)


if __name__ == "__main__":
    main()
