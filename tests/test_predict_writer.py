"""``mmpt predict``'s EmbeddingWriter: per-rank .npy + keys, caption indices re-based, MAE rows."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmpt.batch import ImageBatch
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEModule
from mmpt.predict_writer import EmbeddingWriter, load_predictions


def _mae() -> MAEModule:
    torch.manual_seed(0)
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    tower = TimmVisionTower("vit_tiny_patch16_224", image_size=32, embed_dim=0, model_kwargs=kwargs)
    return MAEModule(tower, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _loader(batches: list[ImageBatch]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _batches(n: int, size: int) -> list[ImageBatch]:
    g = torch.Generator().manual_seed(0)
    return [
        ImageBatch(
            images=torch.randn(size, 3, 32, 32, generator=g),
            labels=torch.arange(size) % 3,
            keys=[f"{b:03d}-{i}" for i in range(size)],
        )
        for b in range(n)
    ]


def _trainer(out: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EmbeddingWriter(str(out))],
    )


def test_mae_predict_writes_normalised_pooled_features_with_keys(tmp_path: Path) -> None:
    mae = _mae()
    batches = _batches(3, 4)
    _trainer(tmp_path).predict(mae, _loader(batches), return_predictions=False)
    got = load_predictions(tmp_path)
    assert got["keys"] == [k for b in batches for k in b.keys]
    assert got["image_emb"].shape == (12, 32) and got["labels"].tolist() == [0, 1, 2, 0] * 3
    mae.eval()
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            mae.encoder.pooled_features(batches[1].images, "avg"), dim=-1
        )
    np.testing.assert_allclose(got["image_emb"][4:8], want.numpy(), atol=1e-6)
    manifest = json.loads((tmp_path / "rank000" / "manifest.json").read_text())
    assert manifest["arrays"]["image_emb"] == [12, 32] and manifest["items"] == 12


class _Paired(L.LightningModule):
    """Two captions per item: text_to_image within each batch is [0, 0, 1, 1, ...]."""

    def predict_step(self, batch: ImageBatch, batch_idx: int) -> dict:
        n = len(batch)
        return {
            "keys": batch.keys,
            "image_emb": batch.images.flatten(1)[:, :4],
            "text_emb": torch.zeros(2 * n, 4),
            "text_to_image": torch.arange(n).repeat_interleave(2),
        }


def test_caption_indices_are_rebased_over_batches_and_ranks(tmp_path: Path) -> None:
    _trainer(tmp_path).predict(_Paired(), _loader(_batches(3, 2)), return_predictions=False)
    assert json.loads((tmp_path / "rank000" / "keys.json").read_text())[2] == "001-0"
    got = load_predictions(tmp_path)
    assert got["text_to_image"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # a second "rank" folder: its indices continue after the first rank's items
    (tmp_path / "rank001").mkdir()
    for f in (tmp_path / "rank000").iterdir():
        (tmp_path / "rank001" / f.name).write_bytes(f.read_bytes())
    both = load_predictions(tmp_path)
    assert both["text_to_image"][12:].tolist() == [i + 6 for i in got["text_to_image"]]
    assert len(both["keys"]) == 12


class _NoKeys(_Paired):
    def predict_step(self, batch: ImageBatch, batch_idx: int) -> dict:
        return {**super().predict_step(batch, batch_idx), "keys": []}


def test_missing_keys_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 items but 0 keys"):
        _trainer(tmp_path).predict(_NoKeys(), _loader(_batches(1, 2)), return_predictions=False)


def test_not_a_predictions_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an mmpt predict folder"):
        load_predictions(tmp_path)
