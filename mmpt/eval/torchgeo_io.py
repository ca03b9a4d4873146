"""torchgeo adapter: datasets read from a local root and pretrained weights from a local file.

``torchgeo:EuroSAT`` names a class of ``torchgeo.datasets``, read with ``download=False``
(a missing root stops with one message); ``torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO``
names a ``torchgeo.models`` weight enum, whose ``meta`` gives the architecture, input bands
and channel count and whose ``transforms`` give the size and normalisation. The state dict
comes from ``--weights-file`` or the torch hub cache, where torchgeo itself keeps it; nothing
is downloaded. torchgeo is imported only here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmpt.eval.probe_sweep import ModelInput

PREFIX = "torchgeo:"


def canonical_band(name: str) -> str:
    """Sentinel-2 band names in mmpt's spelling: ``B01`` -> ``B1``, ``B8A`` unchanged."""
    m = re.fullmatch(r"B0*(\d+A?)", name.strip().upper())
    return f"B{m.group(1)}" if m else name.strip()


def _strip(spec: str, flag: str) -> str:
    if not spec.startswith(PREFIX) or len(spec) == len(PREFIX):
        raise ValueError(f"{flag} {spec!r}: expected torchgeo:<Name>, e.g. torchgeo:EuroSAT")
    return spec[len(PREFIX) :]


def dataset_class(spec: str) -> type:
    """The ``torchgeo.datasets`` class named by ``torchgeo:<Name>``.

    Raises:
        ValueError: Not a torchgeo dataset class name.
    """
    import torchgeo.datasets as tgd

    name = _strip(spec, "--dataset")
    cls = getattr(tgd, name, None)
    if not isinstance(cls, type) or not issubclass(cls, tgd.NonGeoDataset):
        known = sorted(
            n for n in getattr(tgd, "__all__", ()) if isinstance(getattr(tgd, n, None), type)
            and issubclass(getattr(tgd, n), tgd.NonGeoClassificationDataset)
        )  # fmt: skip
        raise ValueError(
            f"--dataset {spec!r}: torchgeo has no non-geo dataset {name!r}; e.g. "
            f"{', '.join(['torchgeo:' + k for k in known[:8]])} ..."
        )
    return cls


def load_split(
    spec: str, root: str | Path, split: str
) -> tuple[Tensor, Tensor, list[str], tuple[str, ...]]:
    """Every sample of one split of a torchgeo classification dataset, as raw tiles.

    Args:
        spec: ``torchgeo:<Name>`` (EuroSAT, So2Sat, UCMerced ...).
        root: The dataset's local root (as given to torchgeo).
        split: ``train``, ``val`` or ``test``.

    Returns:
        tiles (N, C, H, W) float32 in the dataset's raw units, labels (N,) long, class names,
        band names (mmpt spelling, e.g. ``B4``).

    Raises:
        FileNotFoundError: ``root`` is missing or torchgeo finds no data in it.
        ValueError: Unknown dataset, or labels that are not one class id per sample.
    """
    from torchgeo.datasets import DatasetNotFoundError

    cls = dataset_class(spec)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root}: no such folder (the {spec} dataset's root)")
    try:
        ds = cls(root=str(root), split=split, download=False)
    except DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"--root {root}: {spec} split {split!r} not found there ({e}); download it once "
            f"with torchgeo (download=True) on a machine with internet, then pass its root"
        ) from None
    tiles, labels = [], []
    for i in range(len(ds)):
        sample = ds[i]
        label = torch.as_tensor(sample["label"])
        if label.numel() != 1:
            raise ValueError(f"{spec}: multi-label samples; the probe needs one class each")
        tiles.append(sample["image"].float())
        labels.append(int(label))
    if not tiles:
        raise FileNotFoundError(f"--root {root}: {spec} split {split!r} is empty")
    bands = getattr(ds, "bands", None) or getattr(ds, "all_band_names", None) or ()
    names = list(getattr(ds, "classes", None) or [])
    return (
        torch.stack(tiles),
        torch.tensor(labels),
        [str(n) for n in names],
        tuple(canonical_band(b) for b in bands),
    )


def weights_enum(spec: str) -> Any:
    """The ``torchgeo.models`` weight named by ``torchgeo:<Enum>.<MEMBER>``.

    Raises:
        ValueError: No such enum or member.
    """
    import torchgeo.models as tgm

    name = _strip(spec, "--weights")
    enum_name, _, member = name.partition(".")
    enum = getattr(tgm, enum_name, None)
    if enum is None or not member or member not in getattr(enum, "__members__", {}):
        options = list(getattr(enum, "__members__", {})) if enum is not None else []
        raise ValueError(
            f"--weights {spec!r}: not a torchgeo weight; give torchgeo:<Enum>.<MEMBER>, e.g. "
            f"torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO{' (members: ' if options else ''}"
            f"{', '.join(options)}{')' if options else ''}"
        )
    return enum[member]


def _per_channel(values: Any, n: int) -> tuple[float, ...]:
    v = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    return tuple(v * n if len(v) == 1 else v[:n])


def weights_input(weights: Any) -> ModelInput:
    """Size, per-band mean/std (in raw units) and bands of a torchgeo weight.

    The normalisation is read from the weight's ``transforms`` (the Normalize step; a
    ``mean=0, std=10000`` divide for the SSL4EO-S12 weights); the size from its CenterCrop
    (else Resize; 224 when neither says).
    """
    n = int(weights.meta.get("in_chans", 3))
    mean, std, size = (0.0,), (1.0,), 224
    transforms = weights.transforms
    steps = list(transforms.modules()) if isinstance(transforms, nn.Module) else []
    for step in steps:
        flags = getattr(step, "flags", {}) or {}
        m = getattr(step, "mean", None) if hasattr(step, "mean") else flags.get("mean")
        s = getattr(step, "std", None) if hasattr(step, "std") else flags.get("std")
        if m is not None and s is not None:
            mean, std = m, s
        crop = getattr(step, "size", None) or flags.get("size")
        if type(step).__name__ == "CenterCrop" and crop is not None:
            size = int(crop if isinstance(crop, int) else crop[0])
    bands = tuple(canonical_band(b) for b in weights.meta.get("bands") or ()) or None
    return ModelInput(size, _per_channel(mean, n), _per_channel(std, n), 1.0, bands)


def weights_model(
    weights: Any, model_name: str | None = None, weights_file: str | None = None
) -> nn.Module:
    """A timm model with a torchgeo weight's state dict loaded from a local file.

    Args:
        weights: A torchgeo weight enum member.
        model_name: timm architecture; default the weight's ``meta["model"]``.
        weights_file: The ``.pth`` file; default the torch hub cache entry torchgeo uses.

    Returns:
        The model, headless (``num_classes=0``: forward gives pooled features), eval mode.

    Raises:
        FileNotFoundError: The state dict is not on disk (never downloaded).
        ValueError: The state dict does not fit the model.
    """
    import timm

    if weights_file is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise FileNotFoundError(
                f"--weights {weights}: {cached} is not on disk; pass the .pth with "
                f"--weights-file (fetch it once from {weights.url})"
            )
        weights_file = str(cached)
    if not Path(weights_file).is_file():
        raise FileNotFoundError(f"--weights-file {weights_file}: no such file")
    name = model_name or weights.meta.get("model")
    model = timm.create_model(name, in_chans=int(weights.meta.get("in_chans", 3)), num_classes=0)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"--weights-file {weights_file} does not fit timm {name!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def match_bands(
    tiles: Tensor, have: Sequence[str], want: Sequence[str] | None, source: str
) -> Tensor:
    """The model's bands of tiles (N, C, H, W), picked by name in the model's order.

    Raises:
        ValueError: A band the model needs is missing, or (without names) the channel
            counts differ.
    """
    if want is None or not have:
        return tiles
    have_c = [canonical_band(b) for b in have]
    missing = [b for b in want if canonical_band(b) not in have_c]
    if missing:
        raise ValueError(
            f"{source} has bands {list(have)} but the model takes {list(want)}: missing "
            f"{missing}; pick a model/weight for these bands"
        )
    return tiles[:, [have_c.index(canonical_band(b)) for b in want]]
