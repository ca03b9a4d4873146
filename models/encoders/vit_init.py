"""Initialise an image ViT from the ViT weights of another checkpoint (MAE -> contrastive: MAWS)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmpt.bands import RGB
from mmpt.safe_load import load_torch_file

from .timm_weights import resolve_checkpoint_file
from .vit_convert import BAND_ALIASES as BAND_ALIASES
from .vit_convert import GROUP_KEY as GROUP_KEY
from .vit_convert import (
    Rename,
    _adapt_patch,
    _resize_grouped_pos_embed,
    from_timm_view,
    table_entries,
    timm_view,
)
from .vit_convert import _map_bands as _map_bands
from .vit_convert import _resize_pos_embed as _resize_pos_embed
from .vit_convert import _tokens as _tokens
from .vit_convert import renames as renames
from .vit_convert import token_rename as token_rename

log = logging.getLogger(__name__)

INIT_FLAG = "--model.init_args.vision.init_args.init_from"
#: Where a timm ViT sits in a checkpoint that records no image tower, tried in this order.
PREFIXES = ("encoder.model.", "vision.model.", "vision.visual.trunk.", "model.", "")
PATCH_KEY = "patch_embed.proj.weight"


@dataclass
class InitReport:
    """What :func:`init_vit_from` (or :func:`init_converted_from`) did.

    Attributes:
        source: Checkpoint file read.
        prefix: Key prefix of the ViT in that file (``""`` for a bare timm state dict).
        loaded: Model keys set from the checkpoint.
        missing: Model keys left at their initialisation.
        unexpected: Source keys under ``prefix`` (prefix stripped) that were not used.
        resized: Model key (timm name) -> how its source tensor was adapted.
        mismatched: Source key -> why it was not loaded (a shape no rule adapts).
    """

    source: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, str] = field(default_factory=dict)

    def summary(self, limit: int = 5) -> str:
        """One line: counts, the first ``limit`` names of each list and every adaptation."""

        def few(names: Sequence[str]) -> str:
            return f" {list(names[:limit])}{' ...' if len(names) > limit else ''}" if names else ""

        parts = [
            f"init_from {self.source} (prefix {self.prefix!r}): loaded {len(self.loaded)}",
            f"missing {len(self.missing)}{few(self.missing)}",
            f"unexpected {len(self.unexpected)}{few(self.unexpected)}",
        ]
        parts += [f"{k}: {how}" for k, how in self.resized.items()]
        parts += [f"{k} not loaded: {why}" for k, why in self.mismatched.items()]
        return "; ".join(parts)


@dataclass
class _Source:
    file: str
    prefix: str
    tried: tuple[str, ...]
    state: dict[str, torch.Tensor]  # prefix stripped
    bands: tuple[str, ...] | None
    sample: list[str]


def _clean(key: str) -> str:
    key = key.replace("_orig_mod.", "")  # torch.compile wrappers
    return key.removeprefix("module.")  # DDP


def _choose_prefix(keys: Collection[str], own: Collection[str], candidates: Sequence[str]) -> str:
    """The candidate under which most keys are model keys (the earliest on a tie)."""
    hits = [sum(k[len(p) :] in own for k in keys if k.startswith(p)) for p in candidates]
    return candidates[hits.index(max(hits))]


def _recorded(tower: dict) -> tuple[str, tuple[str, ...] | None]:
    """Prefix and bands of the image tower an mmpt checkpoint records."""
    cls = str(tower.get("tower", {}).get("class_path", ""))
    inner = "visual.trunk." if cls.endswith("OpenCLIPVisionTower") else "model."
    pre = tower.get("preprocess") or {}
    bands = pre.get("bands")
    if bands is None and pre.get("channels", 3) == 3:
        bands = RGB  # an mmpt tower without bands takes RGB images
    return f"{tower.get('attr', 'vision')}.{inner}", None if bands is None else tuple(bands)


def _checkpoint_file(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{flag}: no checkpoint at {path!r} (an mmpt/Lightning .ckpt, a timm state dict "
            ".pth/.safetensors or a folder holding one)"
        )
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "last.ckpt")):
        return os.path.join(path, "last.ckpt")
    return resolve_checkpoint_file(path, flag)


def read_vit_source(path: str, own: Collection[str], flag: str = INIT_FLAG) -> _Source:
    """Open a checkpoint and pick the ViT weights in it, memory-mapped where possible.

    Args:
        path: mmpt/Lightning checkpoint, timm state dict file or a folder holding one.
        own: timm-style key names of the model to initialise (choose the prefix).
        flag: Command-line flag quoted in errors.

    Returns:
        The file, prefix, prefixes tried, ViT tensors (prefix stripped) and source band names.

    Raises:
        FileNotFoundError: No file at ``path``.
    """
    file = _checkpoint_file(path, flag)
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            raw = {_clean(k): k for k in f.keys()}  # noqa: SIM118
            prefix = _choose_prefix(raw, own, PREFIXES)
            state = {
                k[len(prefix) :]: f.get_tensor(r) for k, r in raw.items() if k.startswith(prefix)
            }
        return _Source(file, prefix, PREFIXES, state, None, sorted(raw)[:5])
    obj = load_torch_file(file)  # weights_only with mmpt's allow-list (mmpt.safe_load)
    candidates, bands = PREFIXES, None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        from mmpt.models.module import TOWER_KEY  # Lightning is imported only here

        if isinstance(obj.get(TOWER_KEY), dict):
            recorded, bands = _recorded(obj[TOWER_KEY])
            candidates = (recorded, *(p for p in PREFIXES if p != recorded))
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # official MAE / DeiT releases
    tensors = {_clean(k): v for k, v in obj.items() if torch.is_tensor(v)}
    prefix = _choose_prefix(tensors, own, candidates)
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return _Source(file, prefix, candidates, state, bands, sorted(tensors)[:5])


def adapt_vit_state(
    source: _Source,
    own: dict[str, torch.Tensor],
    grid: tuple[int, int],
    bands: Sequence[str] | None,
    report: InitReport,
) -> dict[str, torch.Tensor]:
    """Source tensors that fit ``own`` (timm names), adapted; fills ``report``'s lists.

    Args:
        source: Opened checkpoint (:func:`read_vit_source`).
        own: The model's tensors by timm name.
        grid: The model's patch grid (h, w) the position embedding must cover.
        bands: The model's input band names (None: RGB for 3 channels, else unnamed).
        report: Filled in place (``loaded``/``missing`` in timm names).

    Returns:
        Tensors to load, by timm name, in the model's shapes and dtypes.
    """
    state = source.state
    src_prefix = int("cls_token" in state)
    src_prefix += state["reg_token"].shape[1] if "reg_token" in state else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target, notes = own[key], []
        if key == "pos_embed" and value.shape != target.shape:
            resized = _resize_grouped_pos_embed(value, target, grid, src_prefix, state, own)
            if resized is not None:
                value, how = resized
                notes.append(how)
        elif key == PATCH_KEY:
            value, notes = _adapt_patch(value, target, source.bands, bands)
        if value.shape != target.shape:
            report.mismatched[key] = f"{tuple(state[key].shape)} vs model {tuple(target.shape)}"
            report.unexpected.append(key)
            continue
        if notes:
            report.resized[key] = "; ".join(notes)
        out[key] = value.to(target.dtype)
    report.loaded = list(out)
    report.missing = [k for k in own if k not in out]
    return out


def _finish(report: InitReport, source: _Source, path: str, flag: str) -> InitReport:
    if not report.loaded:
        raise ValueError(
            f"{flag}={path!r}: no ViT weight of {source.file} fits this model (prefixes tried: "
            f"{list(source.tried)}; source keys e.g. {source.sample}; shape mismatches: "
            f"{dict(list(report.mismatched.items())[:3])}). init_from reads timm-named ViT "
            "weights: an mmpt checkpoint of a timm-based tower or a timm state dict."
        )
    log.info("%s", report.summary())
    return report


def _grid(model: nn.Module, own: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Patch grid of a timm ViT (from its patch embedding, else its position embedding)."""
    size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    rows = own["pos_embed"].shape[1] if "pos_embed" in own else 0
    rows -= 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    return math.isqrt(max(rows, 0)), math.isqrt(max(rows, 0))


def init_vit_from(
    model: nn.Module, path: str, bands: Sequence[str] | None = None, flag: str = INIT_FLAG
) -> InitReport:
    """Load the ViT weights of a checkpoint into a timm ``VisionTransformer``, adapting shapes.

    The position embedding (1, P + h*w, D) is resampled to the model's grid (prefix rows
    dropped or left at init when the class/register tokens differ), the patch kernel
    (D, C, p, p) resampled to the model's patch size and its input channels copied by band
    name (``R``/``G``/``B`` = ``B4``/``B3``/``B2``; bands the source lacks get the mean over
    its bands) or, without names, adapted by ``timm.models.adapt_input_conv``. Other tensors
    load when name and shape match; the rest is reported.

    Args:
        model: timm ViT (``patch_embed``, ``pos_embed``, ``blocks``...).
        path: mmpt/Lightning checkpoint (its recorded image tower gives prefix and bands; else
            ``encoder.model.``, ``vision.model.``, ``vision.visual.trunk.``, ``model.``, ``""``
            are tried), a timm ``.pth``/``.safetensors`` state dict or a folder holding one.
        bands: The model's input band names; None: RGB for 3 channels, else unnamed.
        flag: Command-line flag quoted in errors.

    Returns:
        The report (also logged at INFO).

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
        ValueError: No weight of the checkpoint fits the model.
    """
    own = model.state_dict()
    source = read_vit_source(path, own.keys(), flag)
    report = InitReport(source.file, source.prefix)
    tensors = adapt_vit_state(source, own, _grid(model, own), bands, report)
    _finish(report, source, path, flag)
    model.load_state_dict(tensors, strict=False)
    return report


def init_converted_from(
    module: nn.Module,
    path: str,
    table: Sequence[Rename],
    grid: tuple[int, int],
    bands: Sequence[str] | None = None,
    flag: str = INIT_FLAG,
) -> InitReport:
    """:func:`init_vit_from` for a ViT with other parameter names (open_clip, Hugging Face).

    The module's tensors named in ``table`` are viewed in timm names and layouts, adapted like
    a timm model's, then converted back and loaded. Blocks are counted from the module.

    Args:
        module: The ViT to initialise.
        path: Checkpoint, as for :func:`init_vit_from`.
        table: timm <-> module names; entries whose names the module lacks are skipped, a
            later entry for the same timm name replaces an earlier one.
        grid: The module's patch grid (h, w).
        bands: The module's input band names; None: RGB for 3 channels.
        flag: Command-line flag quoted in errors.

    Returns:
        The report; ``loaded``/``missing`` in the module's names, the rest in timm names.

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
        ValueError: No weight of the checkpoint fits the module.
    """
    own = module.state_dict()
    entries = table_entries(own.keys(), table)
    canon = timm_view(own, entries)
    source = read_vit_source(path, canon.keys(), flag)
    report = InitReport(source.file, source.prefix)
    tensors = adapt_vit_state(source, canon, grid, bands, report)
    out = from_timm_view(tensors, entries, own)
    report.loaded = list(out)
    report.missing = [k for k in own if k not in out]
    _finish(report, source, path, flag)
    module.load_state_dict(out, strict=False)
    return report
