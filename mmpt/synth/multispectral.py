"""Synthetic Sentinel-2 land-cover tiles: class spectra and textures, two told apart by texture."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.bands import S2_L1C, SENSORS
from mmpt.shards.multispectral_build import TEMPLATES, BandStats, resize_matrix, tile_meta
from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, clear_previous
from mmpt.synth.vocab import synth_vocabulary, write_word_tokenizer

GENERATOR_NAME = "mmpt.synth.multispectral"
CLASSNAMES = ("water", "forest", "cropland", "grassland", "urban", "bare soil", "wetland")
#: Centre wavelengths (nm) of the Sentinel-2 bands, in :data:`mmpt.bands.S2_L1C` order.
WAVELENGTHS = (443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190)
#: Reflectance of each material in the 13 L1C bands (B1 ... B12 with B8A; B10 is cirrus).
SPECTRA: dict[str, tuple[float, ...]] = {
    "water": (.070, .060, .055, .035, .025, .018, .015, .012, .010, .008, .002, .006, .004),
    "lush": (.035, .040, .085, .035, .130, .340, .430, .470, .480, .440, .004, .230, .110),
    "sparse": (.055, .060, .095, .075, .140, .240, .280, .300, .310, .290, .004, .270, .170),
    "forest": (.030, .030, .050, .028, .080, .220, .280, .310, .320, .290, .003, .150, .065),
    "marsh": (.040, .045, .075, .050, .100, .220, .270, .290, .300, .270, .004, .170, .090),
    "concrete": (.140, .150, .160, .170, .175, .180, .185, .190, .192, .185, .006, .210, .195),
    "asphalt": (.070, .075, .080, .085, .088, .090, .092, .095, .096, .094, .004, .110, .100),
    "soil": (.080, .090, .120, .160, .190, .210, .230, .250, .260, .260, .005, .330, .290),
}  # fmt: skip
VEGETATION = ("lush", "sparse", "forest", "marsh")
#: Red-edge/NIR factor of vegetation by season (0 spring ... 3 winter).
SEASON_GREENNESS = (1.0, 0.92, 0.85, 0.78)
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}
_CHUNK_PIXELS = 256 * 32 * 32  # tile pixels rendered at a time
_NOISE = 0.003  # sensor noise std in reflectance
#: Per-tile log-gain ranges (+-) of the smooth atmospheric/calibration gain: level, tilt and
#: curvature over log wavelength, and each band's own calibration jitter (fraction).
_GAIN_LEVEL, _GAIN_TILT, _GAIN_CURVE, _GAIN_BAND = 0.3, 0.3, 0.2, 0.08


def caption_for(classname: str, patch: str) -> str:
    """Caption of a tile of ``classname`` holding a minority patch of ``patch``."""
    return f"a satellite image of {classname} with a patch of {patch}"


def _smooth(rng: np.random.Generator, n: int, size: int, grid: int) -> np.ndarray:
    """(n, size, size) low-frequency noise: a (grid x grid) normal field upsampled bilinearly."""
    w = resize_matrix(grid, size)
    return np.einsum("sa,nab,tb->nst", w, rng.standard_normal((n, grid, grid)), w)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _texture(
    name: str, rng: np.random.Generator, n: int, s: int
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Materials, abundances (n, K, s, s) and brightness (n, s, s) of ``n`` tiles of a class."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    fine = rng.standard_normal((n, s, s))
    if name == "water":  # smooth, low frequency
        return ("water",), np.ones((n, 1, s, s)), 1 + 0.04 * _smooth(rng, n, s, 3)
    if name == "forest":  # blobby canopy: crowns and gaps
        blobs = _smooth(rng, n, s, max(3, s // 4))
        return ("forest",), np.ones((n, 1, s, s)), 0.75 + 0.5 * _sigmoid(2.5 * blobs)
    if name == "cropland":  # parallel stripes at a random angle alternating two spectra
        theta = rng.uniform(0, np.pi, (n, 1, 1))
        period, phase = rng.uniform(4, 8, (n, 1, 1)), rng.uniform(0, 1, (n, 1, 1))
        u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase
        stripe = np.floor(2 * u) % 2
        return ("lush", "sparse"), np.stack([stripe, 1 - stripe], 1), 1 + 0.02 * fine
    if name == "grassland":  # the cropland spectra mixed evenly, with fine noise
        a = np.clip(0.5 + 0.12 * fine, 0, 1)
        return ("lush", "sparse"), np.stack([a, 1 - a], 1), 1 + 0.02 * rng.standard_normal(a.shape)
    if name == "urban":  # rectangular blocks of concrete or bare ground between asphalt roads
        block = rng.integers(4, 9, (n, 1, 1))
        oy, ox = rng.integers(0, 8, (n, 1, 1)) % block, rng.integers(0, 8, (n, 1, 1)) % block
        by, bx = ((yy + oy) // block).astype(int), ((xx + ox) // block).astype(int)
        nb = s // 4 + 2
        ids = np.arange(n)[:, None, None]
        t = rng.uniform(0, 0.8, (n, nb, nb))[ids, by, bx]
        bright = rng.uniform(0.8, 1.2, (n, nb, nb))[ids, by, bx]
        road = (((yy + oy) % block == 0) | ((xx + ox) % block == 0)).astype(np.float64)
        a = np.stack([(1 - t) * (1 - road), t * (1 - road), road], 1)
        return ("concrete", "soil", "asphalt"), a, np.where(road > 0, 1.0, bright)
    if name == "bare soil":  # smooth gradients
        phi = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        ramp = ((xx - s / 2) * np.cos(phi) + (yy - s / 2) * np.sin(phi)) / s
        return ("soil",), np.ones((n, 1, s, s)), 1 + 0.3 * ramp + 0.04 * _smooth(rng, n, s, 3)
    if name == "wetland":  # pools of open water in marsh vegetation
        level = rng.uniform(-0.3, 0.3, (n, 1, 1))
        w = _sigmoid(6 * (_smooth(rng, n, s, max(3, s // 5)) - level))
        return ("water", "marsh"), np.stack([w, 1 - w], 1), 1 + 0.03 * fine
    raise ValueError(f"no texture for class {name!r}")


def spectral_gain(wavelengths: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, C) per-tile, per-band gains: a smooth curve over log wavelength times band jitter.

    ``exp(a + b z + c (z^2 - 1/3))`` with ``z`` the band's log wavelength mapped to [-1, 1] and
    ``a, b, c`` uniform in +-(0.3, 0.3, 0.2) per tile (illumination, aerosol transmission that
    tilts the spectrum, water-vapour/calibration curvature), times an independent factor in
    [0.92, 1.08] per band (radiometric calibration). Mean colour then varies between tiles of one
    class about as much as between vegetation classes, so texture has to tell them apart.
    """
    logw = np.log(wavelengths)
    span = max(float(logw.max() - logw.min()), 1e-9)
    z = 2 * (logw - logw.min()) / span - 1
    a, b, c = (rng.uniform(-r, r, (n, 1)) for r in (_GAIN_LEVEL, _GAIN_TILT, _GAIN_CURVE))
    jitter = rng.uniform(1 - _GAIN_BAND, 1 + _GAIN_BAND, (n, len(wavelengths)))
    return np.exp(a + b * z + c * (z**2 - 1 / 3)) * jitter


def render_tiles(
    labels: np.ndarray,
    patches: np.ndarray,
    seasons: np.ndarray,
    bands: tuple[str, ...],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render tiles of the given classes as Sentinel-2 digital numbers.

    Each tile: its class's materials and texture, an elliptical minority patch of class
    ``patches[i]``, a seasonal red-edge/NIR factor on vegetation, a random per-band gain smooth
    in wavelength (:func:`spectral_gain`), a haze offset falling with wavelength (1/lambda^2)
    and Gaussian sensor noise; reflectance x 10000, rounded.

    Args:
        labels: (N,) class ids into :data:`CLASSNAMES`.
        patches: (N,) class ids of the minority patches.
        seasons: (N,) season ids 0-3.
        bands: Bands to render (names from :data:`mmpt.bands.S2_L1C`).
        size: Tile side in pixels.
        rng: Source of all randomness.

    Returns:
        (N, C, size, size) uint16 array.

    """
    n, chans = len(labels), [S2_L1C.index(b) for b in bands]
    wavelengths = np.array(WAVELENGTHS, dtype=np.float64)[chans]
    nir = ((wavelengths > 700) & (wavelengths < 1000)).astype(np.float64)
    refl = np.zeros((2, n, len(bands), size, size), np.float32)  # main class, patch class
    for c, name in enumerate(CLASSNAMES):
        which, idx = np.nonzero(np.stack([labels == c, patches == c]))
        if len(idx) == 0:
            continue
        materials, abundance, bright = _texture(name, rng, len(idx), size)
        spectra = np.array([SPECTRA[m] for m in materials])[None, :, chans]  # (1, K, C)
        green = np.array(SEASON_GREENNESS)[seasons[idx]][:, None, None]  # (m, 1, 1)
        veg = np.array([m in VEGETATION for m in materials], dtype=np.float64)[None, :, None]
        spectra = spectra * (1 - veg * nir * (1 - green))
        mixed = np.swapaxes(spectra, 1, 2) @ abundance.reshape(len(idx), len(materials), -1)
        refl[which, idx] = mixed.reshape(-1, len(bands), size, size) * bright[:, None]
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.15, 0.85, (2, n, 1, 1))
    ry, rx = rng.uniform(0.12, 0.3, (2, n, 1, 1))
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)[:, None]
    tiles = np.where(mask, refl[1], refl[0])
    gain = spectral_gain(wavelengths, n, rng)[:, :, None, None]
    haze = rng.uniform(0, 0.03, (n, 1, 1, 1)) * (490 / wavelengths)[None, :, None, None] ** 2
    tiles = (tiles * gain + haze).astype(np.float32)
    tiles += rng.standard_normal(tiles.shape, dtype=np.float32) * np.float32(_NOISE)
    return np.clip(np.rint(tiles * 10000), 1, 65535).astype(np.uint16)


def _write_split(
    folder: Path,
    split: str,
    count: int,
    seed: int,
    bands: tuple[str, ...],
    sensor: str,
    image_size: int,
    samples_per_shard: int,
    meta: dict[str, Any],
) -> int:
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    k = len(CLASSNAMES)
    labels = rng.permutation(np.arange(count) % k)
    patches = (labels + rng.integers(1, k, count)) % k
    seasons = rng.integers(0, 4, count)
    stats = BandStats(bands)
    writer = ShardWriter(folder, samples_per_shard, modalities=["image", "text"],
                         meta={**meta, "split": split})  # fmt: skip
    with writer:
        chunk = max(8, _CHUNK_PIXELS // image_size**2)
        for start in range(0, count, chunk):
            sl = slice(start, start + chunk)
            tiles = render_tiles(labels[sl], patches[sl], seasons[sl], bands, image_size, rng)
            for i, tile in enumerate(tiles, start):
                stats.update(tile)
                cls, patch = CLASSNAMES[labels[i]], CLASSNAMES[patches[i]]
                key, buf = f"{i:09d}", io.BytesIO()
                np.save(buf, tile, allow_pickle=False)
                info = {"key": key, "label": int(labels[i]), "class": cls,
                        "season": int(seasons[i]), "bands": list(bands), "sensor": sensor,
                        "source": f"synthetic/{split}/{key}", "patch_class": patch,
                        "caption": caption_for(cls, patch)}  # fmt: skip
                writer.write({"__key__": key, "npy": buf.getvalue(), "txt": info["caption"],
                              "json": info})  # fmt: skip
        writer.index.meta["band_stats"] = stats.to_dict()
    return len(writer.index.shards)


def tile_words() -> list[str]:
    """Vocabulary of the tokenizer: the synthetic vocabulary plus every caption and prompt."""
    from tokenizers.pre_tokenizers import Whitespace

    texts = [caption_for(a, b) for a in CLASSNAMES for b in CLASSNAMES if a != b]
    texts += [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    split = Whitespace()
    words = {piece for text in texts for piece, _ in split.pre_tokenize_str(text)}
    return sorted(words | set(synth_vocabulary()))


def synth_multispectral(
    out: str | Path,
    train_samples: int = 2000,
    val_samples: int = 350,
    test_samples: int = 350,
    image_size: int = 32,
    seed: int = 0,
    sensor: str = "s2_l1c",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write synthetic land-cover tiles as ``out/train``, ``out/val`` and ``out/test``.

    Seven classes (:data:`CLASSNAMES`), balanced in every split, each a spectral signature
    over all bands of ``sensor`` and a texture: water smooth, forest blobby canopy,
    cropland stripes alternating two vegetation spectra, grassland the same two spectra
    mixed in fine noise (same mean spectrum as cropland: texture alone tells them apart),
    urban blocks of concrete or bare ground between roads, bare soil smooth gradients,
    wetland pools of water in marsh. A per-tile gain smooth in wavelength with per-band
    jitter, haze, a minority patch of another class and sensor noise keep per-band mean colour
    from separating the classes (cosine kNN on it: about 0.78 top-1, 0.86 without the gain). Samples
    are ``<key>.npy`` ((C, H, W) uint16, reflectance x 10000), ``<key>.txt`` (caption) and
    ``<key>.json`` (``label``, ``class``, ``season``, ``bands``, ``sensor``, ``source``,
    ``patch_class``, ``caption``); ``index.json`` ``meta`` holds ``sensor``, ``bands``,
    ``band_stats`` (from the written split), ``classnames`` and ``zeroshot``.

    Args:
        out: Output folder; ``train/``, ``val/``, ``test/`` and ``tokenizer/`` go inside.
        train_samples: Training tiles.
        val_samples: Validation tiles.
        test_samples: Test tiles.
        image_size: Tile side in pixels (at least 16).
        seed: Same seed gives byte-identical shards.
        sensor: ``s2_l1c`` (13 bands) or ``s2_l2a`` (12 bands).
        samples_per_shard: Tiles per ``.tar`` shard.
        overwrite: Replace shards in the split folders that this generator did not write.

    Returns:
        Dict with ``out``, the split and ``tokenizer`` folders, ``<split>_samples``,
        ``<split>_shards`` and ``num_classes``.

    Raises:
        ValueError: A parameter is out of range, or a split folder holds other shards.

    """
    if sensor not in ("s2_l1c", "s2_l2a"):
        raise ValueError(f"sensor (--sensor) must be s2_l1c or s2_l2a, got {sensor!r}")
    counts = {"train": train_samples, "val": val_samples, "test": test_samples}
    check_minimums({f"{k}_samples": (n, 1) for k, n in counts.items()}
                   | {"image_size": (image_size, 16)})  # fmt: skip
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out, bands = Path(out), SENSORS[sensor]
    meta = tile_meta(sensor, bands, list(CLASSNAMES))
    meta["generator"] = {"name": GENERATOR_NAME, "seed": seed, "image_size": image_size,
                         "samples_per_shard": samples_per_shard,
                         **{f"{k}_samples": v for k, v in counts.items()}}  # fmt: skip
    result: dict[str, Any] = {"out": str(out), "num_classes": len(CLASSNAMES)}
    for split, n in counts.items():
        folder = out / split
        clear_previous(folder, overwrite, GENERATOR_NAME)
        shards = _write_split(folder, split, n, seed, bands, sensor, image_size,
                              samples_per_shard, meta)  # fmt: skip
        result |= {split: str(folder), f"{split}_samples": n, f"{split}_shards": shards}
    result["tokenizer"] = str(write_word_tokenizer(out / "tokenizer", tile_words()))
    return result
