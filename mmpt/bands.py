"""Spectral bands of the sensors mmpt reads, by name, and SatMAE-style band groups.

Band lists are in the order the products ship them (and SSL4EO-S12 stacks them):

- Sentinel-2 L1C (top-of-atmosphere), 13 bands: B1 ... B12 with B8A after B8, B10 (cirrus)
  included.
- Sentinel-2 L2A (surface reflectance), 12 bands: L1C without B10.
- Sentinel-1 GRD, 2 polarisations: VV, VH (in dB in SSL4EO-S12).
- RGB: R, G, B (ordinary images; mean/std come from the vision tower's pretrained cfg).

A model can also take any list of band names (e.g. ``[B4, B3, B2, B8]``); samples are
matched to it by name, so a tile stored with 13 bands feeds a 4-band model without copies.
"""

from __future__ import annotations

from collections.abc import Sequence

S2_L1C = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A = tuple(b for b in S2_L1C if b != "B10")
S1 = ("VV", "VH")
RGB = ("R", "G", "B")

SENSORS: dict[str, tuple[str, ...]] = {
    "s2_l1c": S2_L1C,
    "s2_l2a": S2_L2A,
    "s1": S1,
    "rgb": RGB,
}

#: SatMAE / SatMAE++ groups: 10 m visible + NIR, 20 m red edge, 20 m SWIR (B1, B9, B10 left out).
SATMAE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("B2", "B3", "B4", "B8"),
    ("B5", "B6", "B7", "B8A"),
    ("B11", "B12"),
)
GROUP_PRESETS: dict[str, tuple[tuple[str, ...], ...]] = {"satmae": SATMAE_GROUPS}

#: Bands shown as red, green, blue when a tile is drawn (reconstructions, inspect).
DISPLAY_BANDS = (("B4", "B3", "B2"), ("R", "G", "B"), ("VV", "VH", "VV"))


def resolve_bands(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A sensor name (``s2_l1c``, ``s2_l2a``, ``s1``, ``rgb``) or a list of band names.

    Raises:
        ValueError: Unknown sensor, an empty list or a repeated band.
    """
    if isinstance(spec, str):
        if spec.lower() not in SENSORS:
            raise ValueError(
                f"unknown sensor {spec!r}; known: {', '.join(SENSORS)} (or give a list of "
                "band names, e.g. [B4, B3, B2, B8])"
            )
        return SENSORS[spec.lower()]
    bands = tuple(str(b) for b in spec)
    if not bands:
        raise ValueError("the band list is empty")
    repeated = sorted({b for b in bands if bands.count(b) > 1})
    if repeated:
        raise ValueError(f"bands {repeated} appear more than once in {list(bands)}")
    return bands


def resolve_groups(
    spec: str | Sequence[Sequence[str]], bands: Sequence[str]
) -> tuple[tuple[int, ...], ...]:
    """Band groups (``satmae`` or lists of band names) as channel indices into ``bands``.

    Bands of ``bands`` in no group are not embedded (SatMAE drops B1, B9, B10).

    Raises:
        ValueError: Unknown preset, an empty group, a band missing from ``bands`` or a band in
            two groups.
    """
    if isinstance(spec, str):
        if spec.lower() not in GROUP_PRESETS:
            raise ValueError(f"unknown band group preset {spec!r}; known: {list(GROUP_PRESETS)}")
        spec = GROUP_PRESETS[spec.lower()]
    index = {b: i for i, b in enumerate(bands)}
    groups, seen = [], set()
    for group in spec:
        if not group:
            raise ValueError("a band group is empty")
        missing = [b for b in group if b not in index]
        if missing:
            raise ValueError(f"band group {list(group)}: {missing} not in the bands {list(bands)}")
        twice = [b for b in group if b in seen]
        if twice:
            raise ValueError(f"bands {twice} are in more than one group")
        seen.update(group)
        groups.append(tuple(index[b] for b in group))
    if not groups:
        raise ValueError("band_groups is empty")
    return tuple(groups)


def display_channels(bands: Sequence[str]) -> tuple[int, int, int]:
    """Channel indices to draw as red, green, blue: true colour where possible, else 0/1/2."""
    for trio in DISPLAY_BANDS:
        if all(b in bands for b in trio):
            return tuple(list(bands).index(b) for b in trio)  # type: ignore[return-value]
    n = len(bands)
    return (0, min(1, n - 1), min(2, n - 1))


def band_stats(source: str, bands: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-band mean and std (raw sample units) of ``bands`` from a shard index.

    Args:
        source: A shard folder or its ``index.json``, whose ``meta.band_stats`` maps band name
            -> ``{"mean": m, "std": s}`` (written by ``mmpt data build|synth --kind
            multispectral``).
        bands: Bands wanted, in model order.

    Raises:
        FileNotFoundError: No index there.
        ValueError: The index has no band statistics, or not for every band.
    """
    from pathlib import Path

    from mmpt.shards.index import INDEX_NAME, load_index

    folder = Path(source).parent if Path(source).name == INDEX_NAME else Path(source)
    index = load_index(folder)
    if index is None:
        raise FileNotFoundError(f"stats_from: no {INDEX_NAME} in {str(folder)!r}")
    stats = index.meta.get("band_stats") or {}
    missing = [b for b in bands if b not in stats]
    if missing:
        raise ValueError(
            f"stats_from: {folder / INDEX_NAME} has no statistics for bands {missing} (it has "
            f"{sorted(stats)}); rebuild the shards with `mmpt data build --kind multispectral` "
            "or give mean/std explicitly"
        )
    return [float(stats[b]["mean"]) for b in bands], [float(stats[b]["std"]) for b in bands]
