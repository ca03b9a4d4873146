"""Evaluation report files: JSON round trip, PNG plots and the console table."""

import io
import json
import math

import matplotlib
import torch
from PIL import Image
from rich.console import Console

from mmpt.eval.metrics import confusion_matrix
from mmpt.eval.report import (
    first_caption_similarity,
    plot_confusion_matrix,
    plot_recall_curves,
    plot_similarity_heatmap,
    print_metrics,
    write_json,
)


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        im.verify()


def test_write_json_round_trip_nan_to_null(tmp_path):
    metrics = {"top1": 0.5, "top5": float("nan"), "t2i/R@1": torch.tensor(0.25)}
    out = write_json(
        tmp_path / "sub" / "metrics.json",
        metrics,
        checkpoint=tmp_path / "last.ckpt",
        data="coco-val",
        num_images=3,
        num_texts=6,
    )
    assert out == tmp_path / "sub" / "metrics.json"
    loaded = json.loads(out.read_text())
    assert loaded["metrics"] == {"top1": 0.5, "top5": None, "t2i/R@1": 0.25}
    assert loaded["checkpoint"] == str(tmp_path / "last.ckpt")
    assert loaded["data"] == "coco-val" and loaded["num_images"] == 3
    assert loaded["num_texts"] == 6 and "created" in loaded
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left
    # overwriting replaces the file in place
    write_json(out, {"top1": 1.0}, created="fixed")
    assert json.loads(out.read_text()) == {"metrics": {"top1": 1.0}, "created": "fixed"}


def test_plots_are_valid_pngs(tmp_path):
    backend = matplotlib.get_backend()
    t2i = torch.tensor([1, 3, 2, 1, 3, 3, 12, 60])
    i2t = torch.tensor([1, 1, 3, 7])
    _assert_png(plot_recall_curves(t2i, i2t, tmp_path / "recall.png", max_k=20, title="tiny"))
    _assert_png(plot_recall_curves(t2i, i2t, tmp_path / "recall_lin.png", log_x=False))
    sim = torch.rand(70, 70)
    _assert_png(plot_similarity_heatmap(sim, tmp_path / "sim.png", title="sim"))
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    _assert_png(plot_confusion_matrix(cm, ["cat", "dog", "car"], tmp_path / "cm.png"))
    assert matplotlib.get_backend() == backend


def test_print_metrics_table():
    buf = io.StringIO()
    console = Console(file=buf, width=100, color_system=None)
    print_metrics({"t2i/R@1": 1 / 3, "top5": math.nan, "n": 7}, "zero-shot", console=console)
    text = buf.getvalue()
    assert "zero-shot" in text
    assert "t2i/R@1" in text and "0.3333" in text
    assert "nan" in text and "7" in text


def test_first_caption_similarity_diagonal():
    images = torch.eye(3, 4)
    texts = torch.tensor([[0.9, 0.1, 0, 0], [0, 0, 2.0, 0], [0.6, 0.2, 0, 0], [0, 3.0, 0, 0]])
    # captions -> images [1, 0, 1, 2]: the first caption of img0 is cap1, of img1 is cap0
    sim = first_caption_similarity(images, texts, torch.tensor([1, 0, 1, 2]), max_images=2)
    norm = (0.9**2 + 0.1**2) ** 0.5
    expected = torch.tensor([[0.0, 0.9 / norm], [0.0, 0.1 / norm]])
    torch.testing.assert_close(sim, expected)
