"""The FIBER quickstarts learn (slow: minutes on CPU): ITM re-ranking beats the dual encoder's
retrieval on held-out images, and grounding is far above the centre-box baseline."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mmpt.cli import main
from mmpt.synth import make_synthetic

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


def last_validation(run: Path) -> dict[str, float]:
    """The last row of the run's metrics.csv that holds validation metrics."""
    rows = list(csv.DictReader(sorted(run.rglob("metrics.csv"))[-1].open()))
    val = [{k: float(v) for k, v in r.items() if v and k.startswith("val/")} for r in rows]
    return [v for v in val if v][-1]


@pytest.fixture
def grounding_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_synthetic("grounding", "data/grounding")
    return tmp_path


@pytest.mark.slow
def test_fine_quickstart_grounds_far_above_the_centre_box(grounding_data: Path) -> None:
    args = ["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "2"]
    assert main(["fit", "-c", str(QUICKSTART / "fiber_fine_tiny.yaml"), *args]) == 0
    val = last_validation(grounding_data / "runs" / "fiber_fine_tiny")
    # measured: accuracy 0.70, R@1 0.69 after 2 epochs; the centre box 0.013 / 0.010
    assert val["val/grounding/accuracy"] > 0.4
    assert val["val/grounding/accuracy"] > 10 * max(val["val/grounding/centre_accuracy"], 0.01)
    assert val["val/grounding/R@1"] > 10 * max(val["val/grounding/centre_R@1"], 0.01)


def train_values(run: Path, key: str) -> list[float]:
    """Every logged value of the training metric ``key`` in the run's metrics.csv."""
    rows = csv.DictReader(sorted(run.rglob("metrics.csv"))[-1].open())
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_coarse_quickstart_itm_reranking_beats_itc(grounding_data: Path) -> None:
    """Both quickstart stages: ITC alignment, then the fused coarse stage (CPU minutes)."""
    assert main(["fit", "-c", str(QUICKSTART / "fiber_align_tiny.yaml")]) == 0
    aligned = grounding_data / "runs" / "fiber_align_tiny" / "last" / "checkpoints" / "last.ckpt"
    coarse = ["fit", "-c", str(QUICKSTART / "fiber_coarse_tiny.yaml")]
    assert main([*coarse, "--model.init_from", str(aligned)]) == 0
    run = grounding_data / "runs" / "fiber_coarse_tiny"
    val = last_validation(run)
    itc = [val[f"val/retrieval/itc/{d}/R@1"] for d in ("t2i", "i2t")]
    itm = [val[f"val/retrieval/itm/{d}/R@1"] for d in ("t2i", "i2t")]
    assert min(itc) > 3 / 300  # 300 held-out images: chance 1/300
    acc = train_values(run, "train/itm_acc")[-10:]  # the last 100 steps
    assert sum(acc) / len(acc) > 0.7  # the ITM head leaves the 1/3-positive prior (0.667)
    # issue 19's acceptance line; both directions, as 300 captions make one direction noisy
    assert sum(itm) > sum(itc), f"ITM-re-ranked R@1 {itm} vs ITC {itc}"
