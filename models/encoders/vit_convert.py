"""Source ViT tensors in a model's layout: position/patch embedding resizing, rename tables.

Used by :mod:`.vit_init`: the shape adaptations it applies to position embeddings and patch
kernels (band mapping included), and the timm <-> other-implementation name tables
(:class:`Rename`) that :func:`~.vit_init.init_converted_from` reads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv

from mmpt.bands import RGB

#: One colour, two names: RGB images and Sentinel-2 bands.
BAND_ALIASES = {"R": "B4", "G": "B3", "B": "B2", "B4": "R", "B3": "G", "B2": "B"}
GROUP_KEY = "patch_embed.group_embed"


def _resize_pos_embed(
    value: torch.Tensor, target: torch.Tensor, grid: tuple[int, int], src_prefix: int
) -> tuple[torch.Tensor, str] | None:
    """Resample (1, P_src + h*w, D) to the target's (1, P + H*W, D); None when it cannot."""
    if value.ndim != 3 or target.ndim != 3 or value.shape[-1] != target.shape[-1]:
        return None
    rows, own_prefix = value.shape[1], target.shape[1] - grid[0] * grid[1]
    square = [p for p in (src_prefix,) if rows > p and math.isqrt(rows - p) ** 2 == rows - p]
    if not square or own_prefix < 0:
        return None
    side = math.isqrt(rows - square[0])
    body = resample_abs_pos_embed(
        value[:, square[0] :], new_size=list(grid), old_size=[side, side], num_prefix_tokens=0
    )
    keep = min(square[0], own_prefix)
    out = torch.cat([value[:, :keep], target[:, keep:own_prefix].to(value.dtype), body], dim=1)
    how = f"grid {side}x{side} -> {grid[0]}x{grid[1]} (timm resample_abs_pos_embed)"
    if square[0] > own_prefix:
        how += f", {square[0] - own_prefix} prefix row(s) dropped"
    elif square[0] < own_prefix:
        how += f", {own_prefix - square[0]} prefix row(s) kept at init"
    return out, how


def _map_bands(
    weight: torch.Tensor, src: Sequence[str], own: Sequence[str]
) -> tuple[torch.Tensor, str] | None:
    """(D, C_src, p, p) -> (D, C_own, p, p) by band name; None when already in order."""
    index = {b: i for i, b in enumerate(src)}
    picks = [index.get(b, index.get(BAND_ALIASES.get(b, ""))) for b in own]
    if picks == list(range(len(src))):
        return None
    mean = weight.mean(dim=1)
    out = torch.stack([mean if i is None else weight[:, i] for i in picks], dim=1)
    filled = [b for b, i in zip(own, picks, strict=True) if i is None]
    how = f"bands {list(src)} -> {list(own)} by name"
    return out, how + (f", {filled} = mean of the source bands" if filled else "")


def _adapt_patch(
    value: torch.Tensor,
    target: torch.Tensor,
    src_bands: Sequence[str] | None,
    own_bands: Sequence[str] | None,
) -> tuple[torch.Tensor, list[str]]:
    """Match input channels (by band name or timm adapt_input_conv) and kernel size."""
    notes: list[str] = []
    if value.ndim != 4 or target.ndim != 4 or value.shape[0] != target.shape[0]:
        return value, notes
    c_src, c_own = value.shape[1], target.shape[1]
    own_bands = own_bands or (RGB if c_own == 3 else None)
    mapped = None
    if src_bands and own_bands and len(src_bands) == c_src and len(own_bands) == c_own:
        mapped = _map_bands(value, src_bands, own_bands)
    if mapped is not None:
        value, how = mapped
        notes.append(how)
    elif c_src != c_own:
        value = adapt_input_conv(c_own, value)
        notes.append(f"input channels {c_src} -> {c_own} (timm adapt_input_conv)")
    if value.shape[-2:] != target.shape[-2:]:
        old = tuple(value.shape[-2:])
        value = resample_patch_embed(value, list(target.shape[-2:]))
        notes.append(f"kernel {old} -> {tuple(target.shape[-2:])} (timm resample_patch_embed)")
    return value, notes


def _resize_grouped_pos_embed(
    value: torch.Tensor,
    target: torch.Tensor,
    grid: tuple[int, int],
    src_prefix: int,
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, str] | None:
    """:func:`_resize_pos_embed` aware of band-group towers (tokens group-major, grid (G*h, w)).

    A plain source into a grouped model is resampled to the spatial grid (h, w) and repeated
    for every group; a grouped source is not mapped onto another layout (None: reported).
    """
    if GROUP_KEY in state:
        return None
    if GROUP_KEY not in own:
        return _resize_pos_embed(value, target, grid, src_prefix)
    groups = own[GROUP_KEY].shape[0]
    spatial = (grid[0] // groups, grid[1])
    prefix = target.shape[1] - grid[0] * grid[1]
    one = target[:, : prefix + spatial[0] * spatial[1]]
    resized = _resize_pos_embed(value, one, spatial, src_prefix)
    if resized is None:
        return None
    out, how = resized
    body = out[:, prefix:].repeat(1, groups, 1)
    return torch.cat([out[:, :prefix], body], dim=1), f"{how}, repeated for {groups} band groups"


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(D,) or (N, D) -> timm's (1, N, D) token layout."""
    return t.reshape(1, -1, t.shape[-1])


@dataclass(frozen=True)
class Rename:
    """One timm ViT tensor and its name(s) in another implementation.

    Attributes:
        timm: timm name; ``{i}`` stands for the block index.
        theirs: Name(s) in the other module; several: the timm tensor is their tensors
            concatenated along dim 0 (timm ``qkv`` = q, k, v projections).
        to_timm: Their (concatenated) tensor -> timm layout; None: unchanged.
        from_timm: (timm tensor, their concatenated shape) -> their layout; None: reshape.
    """

    timm: str
    theirs: tuple[str, ...]
    to_timm: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_timm: Callable[[torch.Tensor, torch.Size], torch.Tensor] | None = None


def renames(layers: dict[str, str]) -> list[Rename]:
    """``weight`` and ``bias`` renames for each timm module -> their module name pair."""
    return [
        Rename(f"{t}.{p}", (f"{o}.{p}",)) for t, o in layers.items() for p in ("weight", "bias")
    ]


def token_rename(timm_name: str, theirs: str) -> Rename:
    """A class token (D,) or position embedding (N, D) stored flat in the other module."""
    return Rename(timm_name, (theirs,), to_timm=_tokens)


#: timm name -> (the module's name(s), the rule), for the entries of a table a module has.
Entries = dict[str, tuple[tuple[str, ...], Rename]]


def table_entries(names: Collection[str], table: Sequence[Rename]) -> Entries:
    """The entries of ``table`` whose names all exist in ``names``, blocks counted from them.

    A later entry for the same timm name replaces an earlier one.
    """
    entries: Entries = {}
    for rule in table:
        for i in itertools.count() if "{i}" in rule.timm else (0,):
            theirs = tuple(n.format(i=i) for n in rule.theirs)
            if not all(n in names for n in theirs):
                break
            entries[rule.timm.format(i=i)] = (theirs, rule)
    return entries


def timm_view(state: dict[str, torch.Tensor], entries: Entries) -> dict[str, torch.Tensor]:
    """A module's tensors named in ``entries``, in timm names and layouts."""
    view = {}
    for name, (theirs, rule) in entries.items():
        joined = torch.cat([state[n] for n in theirs]) if len(theirs) > 1 else state[theirs[0]]
        view[name] = rule.to_timm(joined) if rule.to_timm else joined
    return view


def from_timm_view(
    tensors: dict[str, torch.Tensor], entries: Entries, shapes: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """timm-named ``tensors`` -> the module's names and layouts (inverse of :func:`timm_view`).

    Args:
        tensors: timm name -> tensor, a subset of ``entries``' names.
        entries: The module's table entries (:func:`table_entries`).
        shapes: The module's state dict (only shapes are read; meta tensors do).
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        theirs, rule = entries[name]
        shape = torch.Size([sum(shapes[n].shape[0] for n in theirs), *shapes[theirs[0]].shape[1:]])
        value = rule.from_timm(value, shape) if rule.from_timm else value.reshape(shape)
        out.update(zip(theirs, value.chunk(len(theirs)), strict=True))
    return out
