"""The UniVL quickstart learns (slow): after StagedP its captions of held-out clips beat the same
decoder fed shuffled videos on CIDEr, and text->video R@1 is far above chance (1/180)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = "configs/quickstart/univl_tiny_stage1.yaml"
STAGE2 = "configs/quickstart/univl_tiny_stage2.yaml"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_univl_quickstart_captions_and_retrieves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", STAGE1]) == 0
    assert main(["fit", "-c", STAGE1, "-c", STAGE2]) == 0
    ckpt = "runs/univl_tiny_stage2/last/checkpoints/last.ckpt"
    args = ["eval", "univl", "-c", STAGE1, "-c", STAGE2, "--ckpt", ckpt, "--out", "eval"]
    assert main([*args, "--shuffled-baseline", "--num-workers", "1"]) == 0
    report = json.loads((tmp_path / "eval" / "univl.json").read_text())["metrics"]
    assert report["caption/CIDEr"] > 2 * report["shuffled/CIDEr"], report
    assert report["caption/ROUGE-L"] > report["shuffled/ROUGE-L"], report
    assert report["t2v/R@1"] > 10 / 180, report  # 10x chance
    assert report["rerank/t2v/R@10"] >= report["t2v/R@10"] - 1e-9  # re-ranking inside the top 10
