"""The remote-sensing SSL quickstarts learn (slow): SatMAE++ vs MAE, MoCo v3 and DINO vs init."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mmpt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _knn(run: str, data: str, out: str, *extra: str) -> dict[str, float]:
    """kNN (k=5) of a run's last checkpoint and of the same tower at random init."""
    ckpt = f"runs/{run}/last/checkpoints/last.ckpt"
    args = ["eval", "probe", "--ckpt", ckpt, "--train", f"{data}/train", "--test", f"{data}/test"]
    assert main([*args, "--method", "knn", "--baseline", "--out", out, *extra]) == 0
    return json.loads((Path(out) / "probe.json").read_text())["metrics"]


def _losses(run: str) -> list[float]:
    metrics = sorted(Path("runs", run).glob("**/metrics.csv"))[-1]
    return [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r["train/loss"]]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["ssl4eo_moco_tiny", "ssl4eo_dino_tiny"])
def test_self_distillation_quickstart_beats_random_init(
    name: str, tmp_path: Path, monkeypatch
) -> None:
    """MoCo v3 / DINO on the land-cover tiles (210 steps each, a small ResNet): kNN (k=5) on the
    pooled features beats the same tower at random initialisation by a clear margin (measured:
    MoCo 0.843, DINO 0.860, random init 0.651). Random features key on mean colour, which the
    tiles' smooth per-tile gains blur, and cannot tell cropland from grassland by texture."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", f"configs/quickstart/{name}.yaml"]) == 0
    report = _knn(name, "data/landcover", "probe", "--pool", "model")
    assert report["knn/top1"] > report["knn_random_init/top1"] + 0.05, report


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_satmaepp_quickstart_vs_single_scale_mae(tmp_path: Path, monkeypatch) -> None:
    """SatMAE++ (scales 1/2/4) and the same recipe at scale 1 only (plain MAE), 150 steps each,
    both learn; their kNN on frozen features is reported (the issue asks for the comparison;
    measured: SatMAE++ 0.806, single-scale MAE 0.794, random init 0.797)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    recipe = "configs/quickstart/satmaepp_tiny.yaml"
    assert main(["fit", "-c", recipe]) == 0
    single = ["--model.scales", "[1]", "--model.scale_weights", "[1.0]"]
    root = ["--trainer.default_root_dir", "runs/single"]
    assert main(["fit", "-c", recipe, *single, *root]) == 0
    for run in ("satmaepp_tiny", "single"):
        losses = _losses(run)
        assert losses[-1] < 0.8 * losses[0], (run, losses)
    multi = _knn("satmaepp_tiny", "data/landcover64", "probe_multi")
    plain = _knn("single", "data/landcover64", "probe_single")
    print(f"kNN top-1: SatMAE++ {multi['knn/top1']:.3f}, single-scale MAE {plain['knn/top1']:.3f}, "
          f"random init {multi['knn_random_init/top1']:.3f}")  # fmt: skip
    assert multi["knn_random_init/top1"] == plain["knn_random_init/top1"]  # same tower, same seed
