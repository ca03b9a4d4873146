"""Multispectral tiles: npy/tif reading (both TIFF layouts), band matching by name and its
errors, DataError stopping a stream while a corrupt tile is a counted skip, tile crops and
normalisation against direct computations."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from mmpt.bands import S2_L1C, S2_L2A
from mmpt.datamodules.stages import SkipCounter, map_skipping
from mmpt.datamodules.tiles import (
    BandMismatch,
    DataError,
    TileTransform,
    normalize_tiles,
    read_tile,
    select_bands,
)
from mmpt.datamodules.transforms import ImageReader, normalize_for, normalize_images
from mmpt.preprocess import ImagePreprocess


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def tif_bytes(array: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def tile(c: int, h: int = 8, w: int = 9, dtype: Any = np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10000, (c, h, w)).astype(dtype)


def sample(ext: str, data: bytes, meta: dict[str, Any] | None = None, key: str = "t0") -> dict:
    out: dict[str, Any] = {"__key__": key, ext: data}
    if meta is not None:
        out["json"] = json.dumps(meta).encode()
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
def test_read_npy_with_band_names(dtype: Any) -> None:
    array = tile(4, dtype=dtype)
    names = ["B2", "B3", "B4", "B8"]
    got, have = read_tile(sample("npy", npy_bytes(array), {"bands": names, "label": 1}))
    assert got.dtype == dtype and np.array_equal(got, array)
    assert have == names


def test_read_npy_names_from_sensor_or_unknown() -> None:
    array = tile(12)
    _, have = read_tile(sample("npy", npy_bytes(array), {"sensor": "s2_l2a"}))
    assert have == list(S2_L2A) and len(have) == 12 and "B10" not in have
    _, have = read_tile(sample("npy", npy_bytes(array), {"label": 3}))
    assert have is None
    _, have = read_tile(sample("npy", npy_bytes(array)))  # no json at all
    assert have is None


@pytest.mark.parametrize(
    ("layout", "kw"),
    [
        ("planar", {"planarconfig": "separate"}),  # (C, H, W) written as one planar page
        ("contig", {"planarconfig": "contig"}),  # (H, W, C) interleaved samples
        ("pages", {}),  # (C, H, W) with C > 4: one page a band
    ],
)
@pytest.mark.parametrize("ext", ["tif", "tiff"])
def test_read_tif_layouts(layout: str, kw: dict[str, Any], ext: str) -> None:
    array = tile(5, h=6, w=7)
    stored = np.moveaxis(array, 0, -1) if layout == "contig" else array
    data = tif_bytes(stored, **kw)
    with tifffile.TiffFile(io.BytesIO(data)) as t:  # the layout really is what we meant
        planar = t.pages[0].planarconfig == tifffile.PLANARCONFIG.SEPARATE
        assert t.asarray().shape == stored.shape and planar == (layout == "planar")
    names = ["VV", "VH", "B2", "B3", "B4"]
    got, have = read_tile(sample(ext, data, {"bands": names}), "npy;tif;tiff")
    assert got.shape == (5, 6, 7) and np.array_equal(got, array)
    assert have == names
    got, have = read_tile(sample(ext, data))  # no json: the page's layout alone decides
    assert np.array_equal(got, array) and have is None


def test_tif_json_band_count_breaks_an_odd_layout() -> None:
    """(H, W, 3) written as 3-wide grey pages reads as (H, W, 3) with one band a page; the
    json's 3 band names say the last axis holds the bands."""
    array = tile(3, h=6, w=7)
    data = tif_bytes(np.moveaxis(array, 0, -1), photometric="minisblack")
    got, _ = read_tile(sample("tif", data, {"bands": ["B4", "B3", "B2"]}))
    assert np.array_equal(got, array)


def test_read_tile_bad_inputs() -> None:
    # a tile that contradicts its own json is a bad sample (skipped and counted), not a
    # model mismatch; a whole set of them stops at map_skipping's leading-failure limit
    with pytest.raises(ValueError, match="json names 13 bands") as exc:  # e.g. (H, W, C) arrays
        read_tile(sample("npy", npy_bytes(tile(12)), {"sensor": "s2_l1c"}))
    assert not isinstance(exc.value, DataError)
    with pytest.raises(DataError, match="unknown sensor 'landsat9'"):
        read_tile(sample("npy", npy_bytes(tile(12)), {"sensor": "landsat9"}))
    with pytest.raises(KeyError, match="npy;tif"):
        read_tile({"__key__": "x", "jpg": b""}, "npy;tif")


def test_select_bands_picks_and_reorders_by_name() -> None:
    array = tile(13)
    want = ("B4", "B3", "B2", "B8")
    got = select_bands(array, list(S2_L1C), want, "k")
    assert np.array_equal(got, np.stack([array[3], array[2], array[1], array[7]]))
    assert select_bands(array, list(S2_L1C), S2_L1C, "k") is array
    assert select_bands(array, None, S2_L1C, "k") is array  # unknown names, right count


def test_missing_band_is_a_band_mismatch() -> None:
    with pytest.raises(BandMismatch) as exc:
        select_bands(tile(12), list(S2_L2A), S2_L1C, "tile_0042")
    msg = str(exc.value)
    assert "'tile_0042'" in msg and "missing ['B10']" in msg
    assert str(list(S2_L2A)) in msg and str(list(S2_L1C)) in msg
    assert isinstance(exc.value, DataError)


def test_unknown_names_with_wrong_count_is_a_band_mismatch() -> None:
    with pytest.raises(BandMismatch, match="has 12 bands but the model takes 13") as exc:
        select_bands(tile(12), None, S2_L1C, "k")
    assert "`bands`" in str(exc.value) and "`sensor`" in str(exc.value)


def test_map_skipping_reraises_data_errors_and_counts_the_rest() -> None:
    def fn(s: dict[str, Any]) -> int:
        if s["kind"] == "bad":
            raise ValueError("corrupt")
        if s["kind"] == "mismatch":
            raise BandMismatch("wrong bands")
        return s["i"]

    samples = [{"__key__": f"k{i}", "kind": "ok", "i": i} for i in range(3)]
    samples.insert(1, {"__key__": "kb", "kind": "bad"})
    handler = SkipCounter()
    assert list(map_skipping(samples, fn, handler)) == [0, 1, 2]
    assert handler.total == 1
    samples.append({"__key__": "km", "__url__": "s.tar", "kind": "mismatch"})
    handler = SkipCounter()
    with pytest.raises(BandMismatch, match=r"wrong bands \(sample 'km' in s\.tar\)"):
        list(map_skipping(samples, fn, handler))
    assert handler.total == 1


def write_tiles(out: Path, samples: list[dict[str, Any]]) -> Path:
    from mmpt.shards import ShardWriter

    with ShardWriter(out, samples_per_shard=100, modalities=["image"]) as w:
        for s in samples:
            w.write(s)
    return out


def tile_stream(shards: Path, bands: tuple[str, ...]) -> Any:
    """A ShardStream of tiles read for a model taking ``bands`` (no datamodule)."""
    from mmpt.batch import ImageBatch
    from mmpt.datamodules.streams import ShardStream, StreamConfig

    pre = ImagePreprocess(size=8, mean=(0.0,) * len(bands), std=(1.0,) * len(bands))
    pre.channels, pre.bands = len(bands), bands
    read = ImageReader(pre, train=False)

    def collate(items: list[tuple[torch.Tensor, str]]) -> ImageBatch:
        images = torch.stack([im for im, _ in items])
        return ImageBatch(images, torch.full((len(items),), -1), [k for _, k in items])

    cfg = StreamConfig(urls=str(shards), shuffle_buffer=0, shuffle_shards=False)
    return ShardStream(
        cfg.sources("data.val"), cfg, lambda s: (read(s), s["__key__"]), collate, 2, partial=True
    )


def test_band_mismatch_stops_a_stream_but_a_corrupt_tile_is_skipped(tmp_path: Path) -> None:
    good = [
        {"__key__": f"g{i}", "npy": npy_bytes(tile(13, seed=i)), "json": {"sensor": "s2_l1c"}}
        for i in range(3)
    ]
    corrupt = {"__key__": "c", "npy": b"\x93NUMPY not really", "json": {"sensor": "s2_l1c"}}
    shards = write_tiles(tmp_path / "ok", good[:1] + [corrupt] + good[1:])
    batches = list(tile_stream(shards, ("B4", "B3", "B2")))
    assert [k for b in batches for k in b.keys] == ["g0", "g1", "g2"]
    assert sum(b.skipped for b in batches) == 1

    l2a = {"__key__": "l2a", "npy": npy_bytes(tile(12)), "json": {"sensor": "s2_l2a"}}
    shards = write_tiles(tmp_path / "mismatch", good + [l2a])
    with pytest.raises(BandMismatch, match=r"tile 'l2a' .* missing \['B10'\]"):
        list(tile_stream(shards, ("B2", "B10")))


def test_tile_transform_eval_resizes_the_whole_tile() -> None:
    chip = tile(3, h=64, w=64, dtype=np.int16)
    got = TileTransform(224, train=False)(chip)
    ref = F.interpolate(
        torch.from_numpy(chip.astype(np.float32))[None], size=(224, 224), mode="bilinear"
    )[0]
    assert got.dtype == torch.float32 and got.shape == (3, 224, 224)
    torch.testing.assert_close(got, ref)

    big = tile(2, h=40, w=30)
    got = TileTransform(16, train=False)(big)
    src = torch.from_numpy(big.astype(np.float32))[None]
    ref = F.interpolate(src, size=(16, 16), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(got, ref)
    plain = F.interpolate(src, size=(16, 16), mode="bilinear")[0]
    assert not torch.allclose(got, plain)  # shrinking is antialiased

    same = tile(2, h=16, w=16)
    assert torch.equal(TileTransform(16, train=False)(same), torch.from_numpy(same.astype("f4")))
    flat = np.full((2, 20, 20), 3000, dtype=np.uint16)  # raw units: no scaling
    torch.testing.assert_close(TileTransform(8, train=False)(flat), torch.full((2, 8, 8), 3000.0))


def test_tile_transform_train_crops_and_flips() -> None:
    random.seed(0)
    array = tile(4, h=32, w=24)
    t = TileTransform(16, train=True)
    for _ in range(50):
        top, left, h, w = t.crop_box(32, 24)
        assert top >= 0 and top + h <= 32 and left >= 0 and left + w <= 24
        assert 0.5 * 32 * 24 * 0.9 <= h * w <= 32 * 24
    out = t(array)
    assert out.dtype == torch.float32 and out.shape == (4, 16, 16)

    # a full-tile "crop": the output is the eval resize, possibly flipped each way
    full = TileTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    square = tile(2, h=20, w=20)
    base = TileTransform(16, train=False)(square)
    variants = [base, base.flip(-1), base.flip(-2), base.flip(-1).flip(-2)]
    seen = set()
    for _ in range(40):
        got = full(square)
        match = [i for i, v in enumerate(variants) if torch.equal(got, v)]
        assert match, "train output is not a flip of the resized tile"
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}
    no_flip = TileTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert all(torch.equal(no_flip(square), base) for _ in range(10))


def test_normalize_tiles_matches_the_formula() -> None:
    pre = ImagePreprocess(size=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), channels=3)
    pre.bands, pre.scale = ("B4", "B3", "B2"), 1e-4
    raw = torch.from_numpy(tile(6, h=4, w=5).astype(np.float32)).view(2, 3, 4, 5)
    got = normalize_tiles(raw, pre)
    x = raw.numpy().astype(np.float64)
    for c in range(3):
        ref = (x[:, c] * 1e-4 - pre.mean[c]) / pre.std[c]
        np.testing.assert_allclose(got[:, c].numpy(), ref, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(normalize_for(raw, pre), got)


def test_normalize_for_dispatches_and_checks_channels() -> None:
    rgb = ImagePreprocess(size=4, mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(
        normalize_for(images, rgb), normalize_images(images, rgb.mean, rgb.std)
    )
    s2 = ImagePreprocess(size=4, mean=(0.0,) * 13, std=(1.0,) * 13, channels=13, bands=S2_L1C)
    with pytest.raises(ValueError, match=r"images have 12 channels but the model takes 13"):
        normalize_for(torch.zeros(2, 12, 4, 4), s2)
    with pytest.raises(ValueError, match=r"4 channels .* takes 3 \(RGB\)"):
        normalize_for(torch.zeros(2, 4, 4, 4, dtype=torch.uint8), rgb)


def test_image_reader_dispatches_by_mode() -> None:
    import pickle

    s2 = ImagePreprocess(size=8, mean=(0.0,) * 2, std=(1.0,) * 2, channels=2, bands=("B8", "B2"))
    read = pickle.loads(pickle.dumps(ImageReader(s2, train=False)))
    array = tile(13, h=8, w=8)
    got = read(sample("npy", npy_bytes(array), {"sensor": "s2_l1c"}))
    assert torch.equal(got, torch.from_numpy(array[[7, 1]].astype(np.float32)))
    with pytest.raises(KeyError, match="npy;tif;tiff"):
        read(sample("jpg", b"", {"sensor": "s2_l1c"}))
    rgb = ImageReader(ImagePreprocess(size=8), train=False)
    with pytest.raises(KeyError, match="jpg;jpeg;png;webp"):
        rgb(sample("npy", npy_bytes(array)))


def test_a_stream_where_nothing_decodes_stops_instead_of_retrying_forever() -> None:
    """e.g. jpg shards for a multispectral model: every sample fails the same way."""
    counter = SkipCounter()
    bad = ({"__key__": f"k{i}", "jpg": b""} for i in range(10_000))
    with pytest.raises(DataError, match="first 50 samples all failed") as info:
        list(map_skipping(bad, lambda s: read_tile(s, "npy;tif"), counter, 50))
    assert "npy;tif" in str(info.value) and counter.total == 50
    # one good sample first: later failures are ordinary counted skips
    mixed = [{"__key__": "ok", "npy": npy_bytes(tile(2))}] + [{"__key__": "b", "jpg": b""}] * 80
    out = list(map_skipping(mixed, lambda s: read_tile(s, "npy;tif"), SkipCounter(), 50))
    assert len(out) == 1
