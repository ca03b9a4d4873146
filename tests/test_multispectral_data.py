"""``mmpt data build|synth --kind multispectral``: layouts, resampling, stats, skips, synth."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from mmpt.bands import S2_L1C
from mmpt.data_cli import main
from mmpt.shards import load_index
from mmpt.shards.multispectral_build import build_multispectral_shards, resize_matrix
from mmpt.synth.multispectral import (
    CLASSNAMES,
    WAVELENGTHS,
    render_tiles,
    spectral_gain,
    synth_multispectral,
)

SIDE = {"B2": 12, "B3": 12, "B4": 12, "B8": 12, "B1": 2, "B9": 2, "B10": 2}  # others 6 px
ACQUISITIONS = ("20200915T103021_20200915T103418_T32UMU", "20200310T103021_20200310T103418_T32UMU")


def read_shards(folder: Path) -> dict[str, dict[str, object]]:
    """Every sample of a shard folder as {key: {ext: decoded value}}."""
    samples: dict[str, dict[str, object]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "npy":
                    value: object = np.load(io.BytesIO(data))
                elif ext == "tif":
                    value = tifffile.imread(io.BytesIO(data))
                else:
                    value = json.loads(data) if ext == "json" else data.decode()
                samples.setdefault(key, {})[ext] = value
    return samples


def make_ssl4eo(root: Path, seed: int = 0) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Two locations x two seasons of S2 L1C single-band GeoTIFF-like files at 12/6/2 px."""
    rng = np.random.default_rng(seed)
    truth = {}
    for loc in ("0000007", "0000042"):
        for acq in ACQUISITIONS:
            folder = root / "s2c" / loc / acq
            folder.mkdir(parents=True)
            (folder / "metadata.json").write_text("{}")
            layers = {}
            for band in S2_L1C:
                side = SIDE.get(band, 6)
                layers[band] = rng.integers(0, 10000, (side, side), dtype=np.uint16)
                tifffile.imwrite(folder / f"{band}.tif", layers[band])
            truth[(loc, sorted(ACQUISITIONS).index(acq))] = layers
    return truth


def upsample(layer: np.ndarray, side: int) -> np.ndarray:
    """Reference: torch bilinear (align_corners=False) in float, rounded back to uint16."""
    x = torch.from_numpy(layer.astype(np.float64))[None, None]
    y = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return np.clip(np.rint(y[0, 0].numpy()), 0, 65535).astype(np.uint16)


def test_resize_matrix_matches_torch_bilinear() -> None:
    x = np.random.default_rng(0).normal(size=(5, 7))
    w_y, w_x = resize_matrix(5, 11), resize_matrix(7, 16)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(11, 16), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(w_y @ x @ w_x.T, ref, atol=1e-12)
    x = np.random.default_rng(1).normal(size=(12, 10))  # shrinking: PIL-style antialiasing
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(5, 4), mode="bilinear", antialias=True
    )[0, 0].numpy()
    np.testing.assert_allclose(resize_matrix(12, 5) @ x @ resize_matrix(10, 4).T, ref, atol=1e-6)
    np.testing.assert_allclose(resize_matrix(4, 2)[0], [3 / 7, 3 / 7, 1 / 7, 0])


def test_build_ssl4eo_stacks_resamples_and_records_stats(tmp_path: Path, capsys) -> None:
    truth = make_ssl4eo(tmp_path / "ssl4eo")
    out = tmp_path / "shards"
    argv = ["build", "--kind", "multispectral", "--from", str(tmp_path / "ssl4eo")]
    assert main([*argv, "--out", str(out), "--shard-size", "3", "--no-progress"]) == 0
    assert "wrote 4 samples in 2 shard(s)" in capsys.readouterr().out
    samples = read_shards(out)
    assert sorted(samples) == ["0000007_0", "0000007_1", "0000042_0", "0000042_1"]
    stacked = []
    for (loc, season), layers in truth.items():
        sample = samples[f"{loc}_{season}"]
        tile, info = sample["npy"], sample["json"]
        assert tile.shape == (13, 12, 12) and tile.dtype == np.uint16
        assert info["bands"] == list(S2_L1C) and info["sensor"] == "s2_l1c"
        assert info["season"] == season and info["source"].startswith(f"s2c/{loc}/2020")
        assert "label" not in info
        for c, band in enumerate(S2_L1C):  # 10 m bands untouched, others bilinear
            expected = layers[band] if SIDE.get(band) == 12 else upsample(layers[band], 12)
            np.testing.assert_allclose(tile[c], expected, atol=1, rtol=0, err_msg=band)  # .5 ties
        stacked.append(tile)
    index = load_index(out)
    meta = index.meta
    assert index.num_samples == 4 and meta["sensor"] == "s2_l1c" and meta["bands"] == list(S2_L1C)
    assert "zeroshot" not in meta and meta["layout"] == "ssl4eo-s12"
    assert "--kind multispectral" in meta["command"] and meta["build"]["format"] == "npy"
    x = np.stack(stacked).astype(np.float64)  # (N, C, H, W)
    for c, band in enumerate(S2_L1C):
        s = meta["band_stats"][band]
        v = x[:, c]
        np.testing.assert_allclose(
            [s["mean"], s["std"], s["min"], s["max"]], [v.mean(), v.std(), v.min(), v.max()],
            rtol=1e-9,
        )  # fmt: skip


def test_corrupt_band_is_a_counted_skip_and_size_resizes(tmp_path: Path) -> None:
    make_ssl4eo(tmp_path / "ssl4eo")
    (tmp_path / "ssl4eo/s2c/0000042" / ACQUISITIONS[0] / "B5.tif").write_bytes(b"II*\0garbage")
    (tmp_path / "ssl4eo/s2c/0000007" / ACQUISITIONS[1] / "B10.tif").unlink()
    report = build_multispectral_shards(
        tmp_path / "ssl4eo/s2c", tmp_path / "out", size=8, progress=False
    )
    assert report.written == 2 and report.skipped == {"corrupt_file": 1, "missing_band": 1}
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["0000007_1", "0000042_0"]  # season 1 = ACQUISITIONS[0] sorted
    assert all(s["npy"].shape == (13, 8, 8) for s in samples.values())
    assert load_index(tmp_path / "out").meta["skipped"] == report.skipped


def test_class_folders_labels_bands_and_tif_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "EuroSAT_MS"
    arrays = {}
    for name in ("River", "Forest"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 4000, (13, 8, 8), dtype=np.uint16)
            arrays[f"{name}_{name}_{i}"] = a
            if name == "River":  # (H, W, C), as GDAL writes pixel-interleaved tiles
                tifffile.imwrite(src / name / f"{name}_{i}.tif", a.transpose(1, 2, 0))
            else:
                np.save(src / name / f"{name}_{i}.npy", a)
    np.save(src / "River" / "odd.npy", np.zeros((5, 8, 8), np.uint16))
    reports = {}
    for fmt, workers in (("npy", 1), ("tif", 2)):
        out = tmp_path / fmt
        reports[fmt] = build_multispectral_shards(
            src, out, format=fmt, workers=workers, progress=False
        )
        samples = read_shards(out)
        assert list(samples) == sorted(arrays)  # Forest before River, files sorted
        for key, a in arrays.items():
            np.testing.assert_array_equal(samples[key][fmt], a)
            info = samples[key]["json"]
            assert info["class"] == key.split("_")[0]
            assert info["label"] == {"Forest": 0, "River": 1}[info["class"]]
            assert info["season"] is None and info["sensor"] == "s2_l1c"
        meta = load_index(out).meta
        assert meta["classnames"] == ["Forest", "River"] and meta["layout"] == "class-folders"
        assert meta["zeroshot"]["classnames"] == ["Forest", "River"]
        assert "{}" in meta["zeroshot"]["templates"][0]
    assert reports["npy"].skipped == reports["tif"].skipped == {"band_mismatch": 1}


def test_flat_folder_needs_sensor_for_odd_band_counts(tmp_path: Path, capsys) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    np.save(src / "a.npy", np.ones((4, 6, 6), np.float32))
    (src / "a.json").write_text(json.dumps({"label": 3, "class": "lake", "caption": "a lake"}))
    out = tmp_path / "out"
    argv = ["build", "--kind", "multispectral", "--from", str(src), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    assert "--sensor" in capsys.readouterr().err
    assert main([*argv, "--no-progress", "--sensor", "B4,B3,B2,B8"]) == 0
    info = read_shards(out)["a"]["json"]
    assert info["bands"] == ["B4", "B3", "B2", "B8"] and info["sensor"] is None
    assert (info["label"], info["class"], info["caption"]) == (3, "lake", "a lake")


def test_unknown_layout_names_the_three_layouts(tmp_path: Path, capsys) -> None:
    (tmp_path / "src" / "notes").mkdir(parents=True)
    (tmp_path / "src" / "notes" / "readme.txt").write_text("hi")
    argv = ["build", "--kind", "multispectral", "--from", str(tmp_path / "src")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layout not recognised" in err
    assert "SSL4EO-S12" in err and "class folders" in err and "flat folder" in err


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    kw = {"train_samples": 70, "val_samples": 14, "test_samples": 7, "image_size": 16}
    dirs = {"a": root / "a", "b": root / "b", "c": root / "c"}
    synth_multispectral(dirs["a"], seed=3, **kw)
    synth_multispectral(dirs["b"], seed=3, samples_per_shard=40, **kw)
    synth_multispectral(dirs["c"], seed=4, **kw)
    return dirs


def test_synth_is_deterministic_balanced_and_described(synth_dirs: dict[str, Path]) -> None:
    a, b, c = (read_shards(synth_dirs[k] / "train") for k in "abc")
    assert len(a) == 70 and a.keys() == b.keys()
    assert all(np.array_equal(a[k]["npy"], b[k]["npy"]) for k in a)  # shard size irrelevant
    assert not all(np.array_equal(a[k]["npy"], c[k]["npy"]) for k in a)
    labels = [s["json"]["label"] for s in a.values()]
    assert np.bincount(labels, minlength=7).tolist() == [10] * 7
    info = a["000000000"]["json"]
    assert info["bands"] == list(S2_L1C) and info["sensor"] == "s2_l1c"
    assert info["class"] == CLASSNAMES[info["label"]] and 0 <= info["season"] <= 3
    assert info["caption"].startswith(f"a satellite image of {info['class']} with a patch of ")
    assert a["000000000"]["txt"] == info["caption"]
    tile = a["000000000"]["npy"]
    assert tile.shape == (13, 16, 16) and tile.dtype == np.uint16
    meta = load_index(synth_dirs["a"] / "train").meta
    assert meta["zeroshot"]["classnames"] == list(CLASSNAMES) == meta["classnames"]
    x = np.stack([s["npy"] for s in a.values()]).astype(np.float64)
    means = [meta["band_stats"][band]["mean"] for band in S2_L1C]
    np.testing.assert_allclose(means, x.mean((0, 2, 3)), rtol=1e-9)
    assert meta["band_stats"]["B8"]["max"] == x[:, 7].max()
    assert load_index(synth_dirs["a"] / "test").num_samples == 7


def test_synth_tokenizer_covers_captions_and_prompts(synth_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(synth_dirs["a"] / "tokenizer"))
    texts = ["a satellite image of bare soil with a patch of wetland", "an aerial view of urban."]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"]


def test_cropland_and_grassland_share_spectra_but_not_texture() -> None:
    rng = np.random.default_rng(0)
    n, crop, grass = 64, CLASSNAMES.index("cropland"), CLASSNAMES.index("grassland")
    labels = np.array([crop] * n + [grass] * n)
    patches = np.full(2 * n, CLASSNAMES.index("water"))
    x = render_tiles(labels, patches, np.zeros(2 * n, int), S2_L1C, 32, rng).astype(np.float64)
    mean_crop, mean_grass = x[:n].mean((0, 2, 3)), x[n:].mean((0, 2, 3))
    np.testing.assert_allclose(mean_crop, mean_grass, rtol=0.06)
    grad = (np.diff(x, axis=2) ** 2).mean((1, 2, 3)) + (np.diff(x, axis=3) ** 2).mean((1, 2, 3))
    assert np.median(grad[:n]) > 2 * np.median(grad[n:])
    water = render_tiles(np.zeros(8, int), np.ones(8, int), np.zeros(8, int), S2_L1C, 32, rng)
    nir, red = S2_L1C.index("B8"), S2_L1C.index("B4")
    assert mean_grass[nir] > 3 * mean_grass[red]  # vegetation: NIR plateau above red
    assert np.median(water[:, nir]) < np.median(water[:, red]) * 1.2  # water: dark NIR


def test_cli_synth_multispectral(tmp_path: Path, capsys) -> None:
    argv = ["synth", "--kind", "multispectral", "--out", str(tmp_path), "--sensor", "s2_l2a"]
    sizes = ["--train-samples", "7", "--val-samples", "7", "--test-samples", "7"]
    assert main([*argv, *sizes, "--image-size", "16"]) == 0
    assert "test: 7 samples in 1 shard(s)" in capsys.readouterr().out
    assert load_index(tmp_path / "val").meta["bands"] == [b for b in S2_L1C if b != "B10"]


def test_spectral_gain_varies_level_and_tilt_smoothly_in_wavelength() -> None:
    """Per-tile gains: a wide level, a tilt that decorrelates blue from SWIR, and otherwise
    smooth over log wavelength (what is left after a quadratic fit is the band jitter)."""
    wavelengths = np.array(WAVELENGTHS, dtype=np.float64)
    log = np.log(spectral_gain(wavelengths, 2000, np.random.default_rng(0)))
    assert log.shape == (2000, 13)
    assert log.mean(1).std() > 0.1  # illumination level
    blue, swir = WAVELENGTHS.index(490), WAVELENGTHS.index(2190)
    assert np.corrcoef(log[:, blue], log[:, swir])[0, 1] < 0.7  # not one gain for all bands
    z = np.log(wavelengths)
    residual = log.T - np.polyval(np.polyfit(z, log.T, 2), z[:, None])
    assert np.abs(residual).max() < 0.16 and residual.std() > 0.02  # jitter within +-8 %
