"""``mmpt eval probe``: the tower and its preprocessing come from the checkpoint alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpt.eval.cli import main
from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEModule
from mmpt.shards.writer import ShardWriter
from mmpt.synth import make_synthetic

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("landcover")
    make_synthetic("multispectral", out, train_samples=70, val_samples=7, test_samples=35)
    return out


def mae_checkpoint(path: Path, tiles: Path, bands: str | list[str] = "s2_l1c") -> MAEModule:
    """A tiny MAE over ``bands`` at 48 px (the 32 px tiles are resized), saved as Lightning does."""
    torch.manual_seed(0)
    encoder = TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=48,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        bands=bands,
        scale=1e-4,
        stats_from=str(tiles / "train"),
    )
    mae = MAEModule(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():  # weights unlike a fresh init, so loading them is observable
        for p in mae.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt: dict = {"state_dict": mae.state_dict()}
    mae.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return mae


def test_tower_from_checkpoint_rebuilds_weights_and_preprocessing(tmp_path, tiles):
    mae = mae_checkpoint(tmp_path / "mae.ckpt", tiles)
    tower = tower_from_checkpoint(str(tmp_path / "mae.ckpt"))
    assert tower.image_preprocess == mae.encoder.image_preprocess
    pre = tower.image_preprocess
    index = json.loads((tiles / "train" / "index.json").read_text())["meta"]["band_stats"]
    assert pre.size == 48 and pre.scale == 1e-4 and len(pre.bands) == 13
    assert pre.mean[3] == pytest.approx(index["B4"]["mean"] * 1e-4)
    assert pre.std[7] == pytest.approx(index["B8"]["std"] * 1e-4)
    for key, value in mae.encoder.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    x = torch.randn(2, 13, 48, 48)
    assert torch.allclose(
        tower.pooled_features(x, "avg"), mae.encoder.eval().pooled_features(x, "avg")
    )
    fresh = tower_from_checkpoint(str(tmp_path / "mae.ckpt"), load_weights=False)
    assert not torch.equal(fresh.model.pos_embed, tower.model.pos_embed)


def test_probe_writes_json_and_confusion_plots(tmp_path, tiles, capsys):
    mae_checkpoint(tmp_path / "mae.ckpt", tiles)
    out = tmp_path / "eval"
    args = ["probe", "--ckpt", str(tmp_path / "mae.ckpt"), "--train", str(tiles / "train")]
    args += ["--test", str(tiles / "test"), "--method", "both", "--baseline", "--out", str(out)]
    args += ["--num-workers", "0", "--batch-size", "16", "--epochs", "20"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "probe.json").read_text())
    metrics = report["metrics"]
    for tag in ("knn", "linear", "knn_random_init", "linear_random_init"):
        assert 0.0 <= metrics[f"{tag}/top1"] <= 1.0
        assert set(metrics[f"{tag}/per_class_recall"]) == set(report["classnames"])
        png = out / f"probe_{tag}_cm.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["num_train"] == 70 and report["num_test"] == 35
    assert report["classnames"][:2] == ["water", "forest"]
    assert report["preprocess"]["size"] == 48 and len(report["preprocess"]["bands"]) == 13
    # 7 well-separated spectral classes: even a tiny random tower beats chance (1/7) by far
    assert metrics["knn_random_init/top1"] > 0.5
    assert "knn/top1" in capsys.readouterr().out


def test_probe_picks_the_models_bands_by_name(tmp_path, tiles):
    """A 4-band model probes 13-band tiles: the bands are selected by name."""
    mae_checkpoint(tmp_path / "mae.ckpt", tiles, bands=["B4", "B3", "B2", "B8"])
    args = ["probe", "--ckpt", str(tmp_path / "mae.ckpt"), "--train", str(tiles / "train")]
    args += ["--test", str(tiles / "test"), "--out", str(tmp_path / "eval"), "--num-workers", "0"]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert report["preprocess"]["bands"] == ["B4", "B3", "B2", "B8"]


def test_tiles_without_a_model_band_stop_with_a_clear_error(tmp_path, tiles, capsys):
    mae_checkpoint(tmp_path / "mae.ckpt", tiles)  # 13 bands
    l2a = tmp_path / "l2a"
    with ShardWriter(l2a, samples_per_shard=10) as writer:
        for i in range(4):
            arr = np.full((12, 32, 32), 1000 + i, dtype=np.uint16)
            buf = io.BytesIO()
            np.save(buf, arr)
            meta = {"sensor": "s2_l2a", "label": i % 2}
            writer.write({"__key__": f"{i:04d}", "npy": buf.getvalue(), "json": meta})
    args = ["probe", "--ckpt", str(tmp_path / "mae.ckpt"), "--train", str(l2a)]
    args += ["--test", str(l2a), "--num-workers", "0", "--out", str(tmp_path / "eval")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "B10" in err and "missing" in err and "Traceback" not in err


def test_checkpoint_without_a_tower_record_is_a_clear_error(tmp_path, tiles, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    args = ["probe", "--ckpt", str(tmp_path / "other.ckpt"), "--train", str(tiles / "train")]
    args += ["--test", str(tiles / "test")]
    assert main(args) == 2
    assert "records no image tower" in capsys.readouterr().err
    assert main([*args[:2], str(tmp_path / "missing.ckpt"), *args[3:]]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_tower_without_pooled_features_is_a_clear_error(tmp_path, tiles, capsys):
    import dataclasses

    from mmpt.models.encoders import VideoViTTower
    from mmpt.models.module import TOWER_KEY
    from tests.helpers import TINY_VIDEO

    video = VideoViTTower(**TINY_VIDEO["init_args"])
    ckpt = {
        "state_dict": {f"vision.{k}": v for k, v in video.state_dict().items()},
        TOWER_KEY: {
            "attr": "vision",
            "tower": video.describe(),
            "preprocess": dataclasses.asdict(video.image_preprocess),
        },
    }
    torch.save(ckpt, tmp_path / "video.ckpt")
    args = ["probe", "--ckpt", str(tmp_path / "video.ckpt"), "--train", str(tiles / "train")]
    assert main([*args, "--test", str(tiles / "test")]) == 2
    err = capsys.readouterr().err
    assert "VideoViTTower has no pooled_features" in err and "Traceback" not in err
