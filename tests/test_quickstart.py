"""The quickstarts learn: CLIP R@1 far above chance; the VLM uses its images (slow)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mmpt.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quickstart_reaches_recall_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CLIP quickstart, from scratch (data generated on the fly): R@1 >= 0.30 both ways,
    where chance is 1/192."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/clip_tiny.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/clip_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/retrieval/t2i/R@1")]
    final = rows[-1]
    assert float(final["val/retrieval/t2i/R@1"]) >= 0.30
    assert float(final["val/retrieval/i2t/R@1"]) >= 0.30


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vila_quickstart_uses_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`make demo`'s VLM run: held-out caption loss with the true images is clearly below the
    loss with the images shuffled across samples."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/vila_stage1.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/vila_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    final = rows[-1]
    true, shuffled = float(final["val/loss"]), float(final["val/loss_shuffled_images"])
    assert true < 0.75 * shuffled, (true, shuffled)
