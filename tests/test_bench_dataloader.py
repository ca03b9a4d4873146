"""scripts/bench_dataloader.py at a tiny size: the tuned baseline and all three pipelines run."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tuned_crop_resize_gives_uint8_at_the_target_size() -> None:
    tuned = load("bench_dataloader_tuned")
    bench = load("bench_dataloader")
    rng = __import__("numpy").random.default_rng(0)
    noise = rng.normal(0, 6, (480, 480, 3)).astype("float32")
    data = bench.synth_jpeg(480, 400, rng, noise)
    out = tuned.crop_resize(data, 64)  # 480x400 -> draft at 1/4 (120x100) >= 64
    assert out.shape == (64, 64, 3) and out.dtype.name == "uint8"
    images = torch.from_numpy(out[None].copy()).permute(0, 3, 1, 2)
    normed = tuned.normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normed.dtype == torch.float32 and normed.min() >= -1 and normed.max() <= 1


def test_bench_dataloader_tiny(tmp_path: Path) -> None:
    bench = load("bench_dataloader")
    args = argparse.Namespace(
        data=str(tmp_path), samples=48, batch_size=8, workers=0, warmup_batches=1,
        repeats=1, shuffle_buffer=16,
    )  # fmt: skip
    table = bench.bench("small", args)
    rows = {cells[0]: cells for cells in zip(*(c._cells for c in table.columns), strict=True)}
    assert set(rows) == {"open_clip-style wds", "tuned wds (draft, fused, uint8)", "mmpt"}
    assert rows["mmpt"][-1].startswith("1.00x")
    for cells in rows.values():
        assert float(cells[1]) > 0 and cells[-1].endswith(")")
