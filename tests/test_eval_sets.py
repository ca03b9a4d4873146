"""Several validation sets (continual pretraining): per-set streams, loaders, metrics, reports
and the forgetting history/plot, on a tiny contrastive model fitted for two steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.streams import StreamConfig
from mmpt.eval.callback import ZeroShotEvalCallback
from mmpt.eval.forgetting import ForgettingHistory, eval_prefix, split_metric
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import OpenCLIPTextTower, TimmVisionTower
from mmpt.shards import ShardWriter
from tests.helpers import TINY_TEXT, TINY_VISION, jpeg_bytes, write_shards

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:Total length of .list. across ranks is zero"),
]

ZEROSHOT = {"classnames": ["zero", "one", "two"], "templates": ["a photo of {}"]}


def labelled_set(out: Path, n: int, tag: str) -> Path:
    """``n`` labelled image-text pairs whose index carries zero-shot class names."""
    meta = {"zeroshot": ZEROSHOT, "domain": tag}
    with ShardWriter(out, samples_per_shard=n, modalities=["image", "text"], meta=meta) as w:
        for i in range(n):
            w.write(
                {
                    "__key__": f"{tag}{i:04d}",
                    "jpg": jpeg_bytes(1000 * len(tag) + i),
                    "txt": f"{tag} caption {i}",
                    "json": {"label": i % 3},
                }
            )
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval_sets")
    return {
        "tmp": tmp,
        "train": write_shards(tmp / "train", n=16, per_shard=8),
        "old": labelled_set(tmp / "old", 6, "old"),
        "new": labelled_set(tmp / "new", 6, "new"),
    }


def make_model() -> ContrastiveModule:
    torch.manual_seed(0)
    vision = TimmVisionTower(**TINY_VISION["init_args"])
    return ContrastiveModule(vision, OpenCLIPTextTower(**TINY_TEXT["init_args"]))


def make_dm(model: ContrastiveModule, data: dict[str, Path], **kw: Any) -> ImageTextDataModule:
    return ImageTextDataModule(
        train=StreamConfig(urls=str(data["train"]), shuffle_buffer=0),
        batch_size=8,
        val_batch_size=6,
        num_workers=0,
        preprocess=model.preprocess,
        **kw,
    )


def sets(data: dict[str, Path], *names: str) -> dict[str, StreamConfig]:
    return {n: StreamConfig(urls=str(data[n]), shuffle_buffer=0) for n in names}


class CountValidations(L.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count += not trainer.sanity_checking


def fit(dm: ImageTextDataModule, model: ContrastiveModule, root: Path, **kw: Any) -> dict[str, Any]:
    counter, evaluator = CountValidations(), ZeroShotEvalCallback(**kw)
    trainer = L.Trainer(
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[counter, evaluator],
    )
    trainer.fit(model, datamodule=dm)
    return {"trainer": trainer, "validations": counter.count, "eval": evaluator}


# --- datamodule -----------------------------------------------------------------------------


def test_datamodule_builds_one_loader_per_set(data: dict[str, Path]) -> None:
    model = make_model()
    dm = make_dm(model, data, val=sets(data, "old")["old"], eval_sets=sets(data, "old", "new"))
    dm.setup("fit")
    assert dm.val_set_names == ["val", "old", "new"]
    assert [m["domain"] for m in dm.val_metas] == ["old", "old", "new"]
    assert dm.val_meta["zeroshot"] == ZEROSHOT
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 3

    plain = make_dm(model, data, val=sets(data, "new")["new"])
    plain.setup("fit")
    assert plain.val_set_names == ["val"]
    assert isinstance(plain.val_dataloader(), torch.utils.data.DataLoader)  # as before
    assert make_dm(model, data).val_dataloader() == []

    with pytest.raises(ValueError, match="eval_sets"):
        make_dm(model, data, eval_sets=sets(data, "old") | {"val": StreamConfig(urls="x")})


# --- fit: per-set metrics, reports and the forgetting report ---------------------------------


def test_fit_logs_and_reports_each_set(data: dict[str, Path], tmp_path: Path) -> None:
    model = make_model()
    run = fit(make_dm(model, data, eval_sets=sets(data, "old", "new")), model, tmp_path)
    metrics = run["trainer"].callback_metrics
    assert not [k for k in metrics if "dataloader_idx" in k]
    for name in ("old", "new"):
        for metric in (
            "loss",
            "retrieval/t2i/R@1",
            "retrieval/i2t/R@1",
            "zeroshot/top1",
            "knn/top1",
        ):
            assert math.isfinite(float(metrics[f"val/{name}/{metric}"])), (name, metric)
    assert "val/loss" not in metrics and "val/retrieval/t2i/R@1" not in metrics

    n = run["validations"]
    assert n == 2
    for name in ("old", "new"):
        reports = sorted((tmp_path / "eval" / name).glob("val_step*.json"))
        assert len(reports) == n
        report = json.loads(reports[-1].read_text())
        assert report["set"] == name and report["num_images"] == 6
        assert (tmp_path / "eval" / name / "val_step2_recall.png").is_file()
        assert (tmp_path / "eval" / name / "val_step2_confusion.png").is_file()

    assert (tmp_path / "eval" / "forgetting.png").stat().st_size > 0
    out = json.loads((tmp_path / "eval" / "forgetting.json").read_text())
    assert out["steps"] == [1, 2]
    assert set(out["history"]) == {"old", "new"}
    for name in ("old", "new"):
        assert len(out["history"][name]["retrieval/t2i/R@1"]) == n
        assert len(out["history"][name]["loss"]) == n
        assert len(out["history"][name]["knn/top1"]) == n
        drop = out["metrics"][name]["zeroshot/top1"]
        assert drop["drop"] == pytest.approx(drop["best"] - drop["last"])
    assert run["eval"].last_report["forgetting_json"] == tmp_path / "eval" / "forgetting.json"


@pytest.mark.parametrize("track", [None, True], ids=["default", "tracked"])
def test_single_val_set_keeps_its_keys(
    data: dict[str, Path], tmp_path: Path, track: bool | None
) -> None:
    model = make_model()
    dm = make_dm(model, data, val=sets(data, "old")["old"])
    run = fit(dm, model, tmp_path, track_forgetting=track)
    metrics = run["trainer"].callback_metrics
    for key in ("val/loss", "val/retrieval/t2i/R@1", "val/zeroshot/top1"):
        assert key in metrics
    assert not [k for k in metrics if "dataloader_idx" in k or k.startswith("val/val/")]
    assert len(list((tmp_path / "eval").glob("val_step*.json"))) == run["validations"] == 2
    if track is None:  # one set: no forgetting report unless asked for, as before
        assert not list((tmp_path / "eval").glob("forgetting*"))
        return
    out = json.loads((tmp_path / "eval" / "forgetting.json").read_text())
    assert list(out["history"]) == ["val"] and len(out["history"]["val"]["loss"]) == 2


# --- helpers --------------------------------------------------------------------------------


def test_prefix_and_metric_names() -> None:
    assert eval_prefix(None, "val", 0) == "val"
    assert eval_prefix(None, "test", 3) == "test"
    assert split_metric("val/old/retrieval/t2i/R@1", ["old", "new"]) == (
        "old",
        "retrieval/t2i/R@1",
    )
    assert split_metric("val/loss", ["val"]) == ("val", "loss")
    assert split_metric("val/other/loss", ["old", "new"]) is None
    assert split_metric("train/loss", ["val"]) is None


def test_history_fills_gaps_and_measures_drops() -> None:
    history = ForgettingHistory()
    names = ["old", "new"]
    history.record(10, {"val/old/loss": 1.0, "val/old/zeroshot/top1": 0.8}, names)
    history.record(20, {"val/old/loss": 0.5, "val/new/loss": 2.0, "train/loss": 9.0}, names)
    history.record(30, {"val/old/loss": 0.9, "val/old/zeroshot/top1": 0.5}, names)
    assert history.steps == [10, 20, 30]
    assert history.values["new"]["loss"][0] != history.values["new"]["loss"][0]  # NaN
    assert history.values["old"]["zeroshot/top1"][1] != history.values["old"]["zeroshot/top1"][1]
    drops = history.forgetting()
    assert drops["old"]["loss"] == {"best": 0.5, "last": 0.9, "drop": pytest.approx(0.4)} | {
        "best_step": 20
    }
    assert drops["old"]["zeroshot/top1"]["drop"] == pytest.approx(0.3)
    assert drops["new"]["loss"]["drop"] == 0.0


def test_losses_and_ranks_are_lower_is_better_in_the_forgetting_report():
    from mmpt.eval.forgetting import ForgettingHistory

    history = ForgettingHistory()
    history.steps = [10, 20]
    history.values = {
        "old": {"contrastive_loss": [2.0, 1.0], "retrieval/t2i/mean_rank": [5.0, 3.0]},
    }
    report = history.forgetting()["old"]
    loss = report["contrastive_loss"]
    assert (loss["best"], loss["drop"]) == (1.0, 0.0)  # an improvement, not forgetting
    assert report["retrieval/t2i/mean_rank"]["best"] == 3.0


def test_plain_val_keeps_its_keys_beside_eval_sets_and_names_are_checked():
    from types import SimpleNamespace

    from mmpt.eval.forgetting import eval_prefix, split_metric

    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set_names=["val", "old"]))
    assert eval_prefix(trainer, "val", 0) == "val"
    assert eval_prefix(trainer, "val", 1) == "val/old"
    assert split_metric("val/loss", ["val", "old"]) == ("val", "loss")
    assert split_metric("val/old/loss", ["val", "old"]) == ("old", "loss")
    with pytest.raises(ValueError, match="reserved"):
        ImageTextDataModule(eval_sets={"retrieval": StreamConfig(urls="x")})


# --- kNN probe per set, also for models without text (MAE) ----------------------------------


class _FeaturesOnly(L.LightningModule):
    """Returns only features and labels, like an MAE: no text, no zero-shot."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        x, y = batch
        return {"features": x * self.scale, "labels": y}


def test_knn_probe_per_set_without_text(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(4)
    feats = torch.eye(3, 8)[labels] * 5 + 0.1 * torch.randn(12, 8, generator=gen)
    unlabelled = TensorDataset(feats, -torch.ones(12, dtype=torch.long))
    loaders = [DataLoader(TensorDataset(feats, labels), batch_size=5), DataLoader(unlabelled)]
    evaluator = ZeroShotEvalCallback(knn_k=3)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[evaluator],
    )
    trainer.validate(_FeaturesOnly(), dataloaders=loaders)
    metrics = trainer.callback_metrics
    assert float(metrics["val/set0/knn/top1"]) == 1.0
    assert "val/set1/knn/top1" not in metrics  # no labels: no probe
    assert not [k for k in metrics if "retrieval" in k or "zeroshot" in k]
    assert evaluator.history.values["set0"]["knn/top1"] == [1.0]


def test_mae_validation_step_returns_pooled_features_with_labels() -> None:
    from mmpt.batch import ImageTextBatch
    from mmpt.eval.callback import embedding_outputs
    from mmpt.models.mae import MAEModule

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    tower = TimmVisionTower("vit_tiny_patch16_224", image_size=32, embed_dim=0, model_kwargs=kwargs)
    model = MAEModule(tower, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.zeros(3, 4, dtype=torch.long)
    batch = ImageTextBatch(images, tokens, torch.arange(3), labels=torch.tensor([0, 1, -1]))
    out = model.validation_step(batch, 0)
    assert out["image_emb"].shape == (3, 32) and torch.isfinite(out["loss"])
    assert torch.allclose(out["image_emb"], tower.pooled_features(images, "avg"))
    assert embedding_outputs(out)["text_emb"].shape == (0, 32)
    unlabelled = ImageTextBatch(images, tokens, torch.arange(3), labels=-torch.ones(3).long())
    assert torch.is_tensor(model.validation_step(unlabelled, 0))  # loss only, as before
