"""``mmpt data build --kind torchgeo``: one split of a torchgeo dataset -> multispectral shards.

The dataset is read from its local root with ``download=False`` (:mod:`mmpt.eval.torchgeo_io`);
each sample becomes ``<key>.npy`` (the (C, H, W) tile in the dataset's raw units, float32)
plus ``<key>.json`` (``label``, ``class``, ``bands``, ``source``), so the tiles feed mmpt's
tile pipeline and probes with bands matched by name. The index records the band names,
class names and per-band mean/std/min/max.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mmpt.eval.torchgeo_io import PREFIX, load_split
from mmpt.shards.build import BuildReport
from mmpt.shards.writer import ShardWriter


def build_torchgeo_shards(
    source: str | Path,
    out: str | Path,
    dataset: str | None = None,
    split: str | None = None,
    samples_per_shard: int = 500,
    progress: bool = True,
) -> BuildReport:
    """Write one split of a torchgeo classification dataset as tile shards.

    Args:
        source: The dataset's local root (``--from``).
        out: Output shard folder.
        dataset: ``EuroSAT`` or ``torchgeo:EuroSAT`` (any torchgeo non-geo dataset with one
            class per sample).
        split: ``train`` (default), ``val`` or ``test``.
        samples_per_shard: Samples per ``.tar``.
        progress: Print how many tiles were read (the split is read into memory first).

    Returns:
        What was written.

    Raises:
        ValueError: No ``--dataset``, or an unknown one.
        FileNotFoundError: The root holds no such dataset.
    """
    if not dataset:
        raise ValueError("--kind torchgeo needs --dataset NAME (e.g. EuroSAT)")
    spec = dataset if dataset.startswith(PREFIX) else PREFIX + dataset
    split = split or "train"
    tiles, labels, classnames, bands = load_split(spec, source, split)
    if progress:
        print(f"read {len(labels)} {spec} {split} tiles {tuple(tiles.shape[1:])} from {source}")
    flat = tiles.transpose(0, 1).reshape(tiles.shape[1], -1).double()
    stats = {b: {"mean": float(flat[i].mean()), "std": float(flat[i].std(unbiased=False)),
                 "min": float(flat[i].min()), "max": float(flat[i].max())}
             for i, b in enumerate(bands)}  # fmt: skip
    meta = {"source": spec, "split": split, "bands": list(bands), "classnames": classnames,
            "band_stats": stats}  # fmt: skip
    report = BuildReport(out=str(out))
    with ShardWriter(out, samples_per_shard, modalities=["image"], meta=meta) as writer:
        for i, (tile, label) in enumerate(zip(tiles.numpy(), labels.tolist(), strict=True)):
            buf = io.BytesIO()
            np.save(buf, tile.astype(np.float32), allow_pickle=False)
            info = {"label": int(label), "bands": list(bands), "source": f"{spec}/{split}/{i}"}
            if label < len(classnames):
                info["class"] = classnames[label]
            writer.write({"__key__": f"{i:09d}", "npy": buf.getvalue(), "json": info})
            report.written += 1
    report.shards = [str(Path(out) / s.name) for s in writer.index.shards]
    return report
