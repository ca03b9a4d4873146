"""Retrieval metrics, plots and reports name the medium a model embeds: image, video or audio."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import ArgumentParser
from matplotlib.figure import Figure

import mmpt.eval.report as report
from mmpt.eval.callback import ZeroShotEvalCallback, write_reports
from mmpt.eval.embed import Embeddings, evaluate
from mmpt.eval.modality import directions, item_counts, media_of, rename_retrieval
from mmpt.eval.video_metrics import video_text_retrieval_metrics
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.video_text import VideoTextModule
from tests.helpers import TINY_LOG_MEL, TINY_TEXT, TINY_VIDEO, TINY_VISION


def build(spec: dict) -> torch.nn.Module:
    parser = ArgumentParser()
    parser.add_argument("--m", type=torch.nn.Module)
    return parser.instantiate_classes(parser.parse_object({"m": spec})).m


def test_media_of_the_model_families() -> None:
    text = build(TINY_TEXT)
    assert media_of(ContrastiveModule(vision=build(TINY_VISION), text=text)) == "image"
    audio = {**TINY_LOG_MEL, "init_args": {**TINY_LOG_MEL["init_args"], "embed_dim": 16}}
    assert media_of(ContrastiveModule(audio=build(audio), text=text)) == "audio"
    assert media_of(VideoTextModule(vision=build(TINY_VIDEO), text=text)) == "video"


def embeddings(n: int = 6) -> Embeddings:
    torch.manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    return Embeddings(items, items + 0.01, torch.arange(n), torch.full((n,), -1))


@pytest.mark.parametrize(
    ("media", "t2m", "m2t"), [("audio", "t2a", "a2t"), ("image", "t2i", "i2t")]
)
def test_evaluate_names_the_directions(media: str, t2m: str, m2t: str) -> None:
    metrics = evaluate(embeddings(), media=media).metrics
    assert metrics[f"retrieval/{t2m}/R@1"] == 1.0 and metrics[f"retrieval/{m2t}/R@1"] == 1.0
    others = {"t2i", "i2t", "t2a", "a2t", "t2v", "v2t"} - {t2m, m2t}
    assert not any(key.split("/")[1] in others for key in metrics), sorted(metrics)


def test_rename_retrieval_keeps_other_keys_and_rejects_unknown_media() -> None:
    out = rename_retrieval({"t2i/R@1": 0.5, "i2t/mean_rank": 2.0, "top1": 0.1}, "video")
    assert out == {"t2v/R@1": 0.5, "v2t/mean_rank": 2.0, "top1": 0.1}
    with pytest.raises(ValueError, match="unknown retrieval medium 'speech'"):
        directions("speech")


def test_video_metrics_use_the_same_names() -> None:
    emb = embeddings()
    out = video_text_retrieval_metrics(emb.image, emb.text, emb.text_to_image)
    names = {k.removeprefix("retrieval/") for k in evaluate(emb, media="video").metrics}
    assert set(out) == names and "t2v/R@1" in names and "v2t/median_rank" in names


def test_audio_report_and_plot_name_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Figure] = []
    save = report.save_figure
    monkeypatch.setattr(
        report, "save_figure", lambda fig, path: figures.append(fig) or save(fig, path)
    )

    class AudioModel:  # what ZeroShotEvalCallback reads of an audio-text ContrastiveModule
        audio = torch.nn.Identity()
        preprocess = SimpleNamespace(tokenizer=None)

    emb = embeddings()
    result = ZeroShotEvalCallback()._evaluate(AudioModel(), emb, {})
    assert result.media == "audio" and "retrieval/a2t/R@5" in result.metrics
    paths = write_reports(result, tmp_path, "val", **item_counts("audio", 6, 6))
    saved = json.loads(paths["json"].read_text())
    assert saved["modality"] == "audio" and saved["num_audio"] == 6 and "num_images" not in saved
    assert "retrieval/t2a/R@1" in saved["metrics"]
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend[0].startswith("text->audio,") and legend[1].startswith("audio->text,"), legend
