"""The resizing/normalisation probe sweep, the torchgeo adapter and the sweep CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpt.eval.cli import main
from mmpt.eval.probe import knn_classify
from mmpt.eval.probe_sweep import (
    ModelInput,
    band_stats,
    parse_normalize,
    parse_resize,
    prepare,
    run_sweep,
    write_sweep,
)
from mmpt.eval.torchgeo_io import (
    canonical_band,
    load_split,
    weights_enum,
    weights_input,
    weights_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EUROSAT_DIR = ("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif")
CLASSES = ("AnnualCrop", "Forest", "SeaLake")
WEIGHT = "torchgeo:ResNet18_Weights.SENTINEL2_ALL_MOCO"


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny EuroSAT root as torchgeo's reader expects it: 13-band GeoTIFFs + split files."""
    import rasterio

    root = tmp_path_factory.mktemp("eurosat")
    base = root.joinpath(*EUROSAT_DIR)
    rng = np.random.default_rng(0)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(CLASSES):
        (base / name).mkdir(parents=True)
        for i in range(6):
            arr = (rng.integers(0, 200, (13, 8, 8)) + 1000 * (c + 1)).astype(np.uint16)
            profile = dict(driver="GTiff", width=8, height=8, count=13, dtype="uint16")
            with rasterio.open(base / name / f"{name}_{i}.tif", "w", **profile) as f:
                f.write(arr)
            split = "train" if i < 3 else "test" if i < 5 else "val"
            splits[split].append(f"{name}_{i}.jpg")
    for split, names in splits.items():
        (root / f"eurosat-{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_parse_settings_and_errors():
    assert parse_resize("pretrain, none,224") == ["pretrain", "none", 224]
    assert parse_normalize("checkpoint,minmax") == ["checkpoint", "minmax"]
    with pytest.raises(ValueError, match="--resize"):
        parse_resize("pretrain,big")
    with pytest.raises(ValueError, match="--normalize"):
        parse_normalize("checkpoint,zscore")


def test_prepare_matches_hand_formulas():
    raw = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2).repeat(2, 2, 1, 1)
    raw[:, 1] *= 2
    stats = band_stats(raw)
    model = ModelInput(4, (1.0, 2.0), (2.0, 4.0), 0.1)
    x = raw[:1]
    assert torch.allclose(
        prepare(x, None, "checkpoint", model, stats)[0, 1, 1, 1], torch.tensor((60 * 0.1 - 2) / 4)
    )
    assert torch.allclose(
        prepare(x, None, "minmax", model, stats)[0, :, 0, 1], torch.tensor([1 / 3, 1 / 3])
    )
    z = prepare(x, None, "dataset", model, stats)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(2), atol=1e-6)
    assert torch.equal(prepare(x, None, "none", model, stats), x)
    assert prepare(x, 4, "none", model, stats).shape == (1, 2, 4, 4)
    assert prepare(x, None, "none", model, stats).shape == (1, 2, 2, 2)


def _chips(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 2, size, size, generator=g) * 50 + 100 * y.view(-1, 1, 1, 1).float()
    return x, y


def test_sweep_table_shape_values_and_files(tmp_path):
    train, test = _chips(30, 8, 0), _chips(15, 8, 1)
    model = ModelInput(16, (0.0, 0.0), (100.0, 100.0))
    seen: list[tuple[int, ...]] = []

    def encode(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2C)
        seen.append(tuple(x.shape[-2:]))
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    rows = run_sweep(encode, model, train, test, ["pretrain", "none", 12], ["checkpoint", "none"],
                     k=3, epochs=5)  # fmt: skip
    assert [(r["resize"], r["normalize"]) for r in rows] == [
        (rs, n) for rs in ("pretrain", "none", "12") for n in ("checkpoint", "none")
    ]
    assert [r["size"] for r in rows] == [16, 16, 8, 8, 12, 12]
    assert {(16, 16), (8, 8), (12, 12)} <= set(seen)
    stats = band_stats(train[0])
    feats = [encode(prepare(x, 16, "checkpoint", model, stats)) for x in (train[0], test[0])]
    want = (knn_classify(feats[0], train[1], feats[1], k=3) == test[1]).double().mean()
    assert rows[0]["knn_top1"] == pytest.approx(float(want))
    assert all(0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0 for r in rows)
    paths = write_sweep(rows, tmp_path / "out", model="toy")
    report = json.loads(paths["json"].read_text())
    assert (
        report["rows"] == rows
        and report["metrics"]["pretrain/checkpoint/knn_top1"] == rows[0]["knn_top1"]
    )
    md = paths["markdown"].read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[2].startswith("| pretrain | 16 | checkpoint |")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fake_eurosat_reads_with_download_false(eurosat):
    x, y, names, bands = load_split("torchgeo:EuroSAT", eurosat, "train")
    assert x.shape == (9, 13, 8, 8) and x.dtype == torch.float32
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert bands[:2] == ("B1", "B2") and bands[-1] == "B8A" and len(bands) == 13
    # class c's pixels were written as 1000 * (c + 1) + [0, 200)
    assert torch.all((x // 1000).view(9, -1) == (y + 1).view(-1, 1).float())
    assert load_split("torchgeo:EuroSAT", eurosat, "test")[0].shape[0] == 6


def test_bad_dataset_inputs_are_clear(tmp_path, eurosat):
    with pytest.raises(ValueError, match="no non-geo dataset 'EuroSot'"):
        load_split("torchgeo:EuroSot", eurosat, "train")
    with pytest.raises(FileNotFoundError, match="--root"):
        load_split("torchgeo:EuroSAT", tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="not found there"):
        load_split("torchgeo:EuroSAT", tmp_path, "train")
    with pytest.raises(ValueError, match="torchgeo:<Name>"):
        load_split("EuroSAT", eurosat, "train")


def test_torchgeo_weight_gives_bands_normalisation_and_local_state_dict(tmp_path, monkeypatch):
    import timm

    enum = weights_enum(WEIGHT)
    pre = weights_input(enum)
    assert pre.size == 224 and pre.bands is not None and len(pre.bands) == 13
    assert pre.mean == (0.0,) * 13 and pre.std == (10000.0,) * 13
    assert canonical_band("B08") == "B8" and canonical_band("B8A") == "B8A"
    with pytest.raises(ValueError, match="SENTINEL2_ALL_MOCO"):
        weights_enum("torchgeo:ResNet18_Weights.NOPE")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--weights-file"):
        weights_model(enum)
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", in_chans=13, num_classes=7).eval()
    cached = tmp_path / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    net = weights_model(enum)  # from the hub cache, never downloaded
    x = torch.randn(2, 13, 32, 32)
    assert torch.allclose(net(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises((ValueError, RuntimeError)):
        weights_model(enum, weights_file=str(bad))


def test_cli_sweep_torchgeo_weight_on_torchgeo_dataset(tmp_path, eurosat, capsys):
    import timm

    torch.manual_seed(0)
    file = tmp_path / "rn18.pth"
    torch.save(timm.create_model("resnet18", in_chans=13).state_dict(), file)
    out = tmp_path / "sweep"
    args = ["probe", "--timm", "resnet18", "--weights", WEIGHT, "--weights-file", str(file)]
    args += ["--dataset", "torchgeo:EuroSAT", "--root", str(eurosat), "--resize", "16,none"]
    args += ["--normalize", "checkpoint,dataset,minmax,none", "--k", "3", "--epochs", "5"]
    args += ["--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "probe_sweep.json").read_text())
    assert len(report["rows"]) == 8 and report["pretrain_size"] == 224
    assert {r["size"] for r in report["rows"]} == {16, 8}
    assert report["num_train"] == 9 and report["num_test"] == 6
    assert (out / "probe_sweep.png").is_file()
    assert "| none | 8 | minmax |" in (out / "probe_sweep.md").read_text()


def test_cli_wrong_band_count_and_missing_model_are_clear(tmp_path, eurosat, capsys):
    args = ["probe", "--timm", "resnet18", "--dataset", "torchgeo:EuroSAT", "--root", str(eurosat)]
    args += ["--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "13 bands" in err and "takes 3" in err and "Traceback" not in err
    assert main(["probe", "--dataset", "torchgeo:EuroSAT", "--root", str(eurosat)]) == 2
    assert "--ckpt" in capsys.readouterr().err


def test_data_build_torchgeo_writes_tile_shards_with_bands(tmp_path, eurosat, capsys):
    from mmpt.data_cli import main as data_main
    from mmpt.eval.probe_sweep_cli import shard_tiles

    out = tmp_path / "shards"
    argv = ["build", "--kind", "torchgeo", "--dataset", "EuroSAT", "--from", str(eurosat)]
    assert data_main([*argv, "--split", "test", "--out", str(out)]) == 0
    meta = json.loads((out / "index.json").read_text())["meta"]
    assert meta["bands"][3] == "B4" and meta["classnames"] == list(CLASSES)
    x, y, bands = shard_tiles(str(out), "--test")
    want_x, want_y, _, _ = load_split("torchgeo:EuroSAT", eurosat, "test")
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and bands == meta["bands"]
    capsys.readouterr()
    assert (
        data_main(["build", "--kind", "torchgeo", "--from", str(eurosat), "--out", str(out)]) == 2
    )
    assert "needs --dataset" in capsys.readouterr().err


def test_checkpoint_tower_probes_native_size_without_touching_the_tower():
    from mmpt.eval.probe_sweep_cli import _any_size
    from mmpt.models.encoders.timm_vit import TimmVisionTower

    torch.manual_seed(0)
    tower = TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    ).eval()
    pos = tower.model.pos_embed.detach().clone()
    encode = _any_size(tower, "avg")
    x32 = torch.randn(2, 3, 32, 32)
    assert torch.equal(encode(x32), tower.pooled_features(x32, "avg"))
    assert encode(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert torch.equal(tower.model.pos_embed, pos)


def test_cli_sweep_mmpt_checkpoint_on_small_chips(tmp_path, capsys):
    from mmpt.synth import make_synthetic
    from tests.test_probe_cli import mae_checkpoint

    chips = tmp_path / "chips"
    make_synthetic("multispectral", chips, train_samples=28, val_samples=7, test_samples=14,
                   image_size=16)  # fmt: skip
    mae_checkpoint(tmp_path / "mae.ckpt", chips)  # pretrained at 48 px
    out = tmp_path / "sweep"
    args = ["probe", "--ckpt", str(tmp_path / "mae.ckpt"), "--train", str(chips / "train")]
    args += ["--test", str(chips / "test"), "--resize", "pretrain,none,24"]
    args += ["--normalize", "checkpoint,minmax", "--epochs", "5", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    rows = json.loads((out / "probe_sweep.json").read_text())["rows"]
    assert [r["size"] for r in rows] == [48, 48, 16, 16, 24, 24]
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in rows)
