"""``model.init_from``: initialise a model from checkpoints in mmpt's and the ecosystem's formats.

What a path is decides how it is read (:mod:`mmpt.models.init_sources`):

- an mmpt/Lightning ``.ckpt`` or a folder holding ``last.ckpt``: weights matched by name;
- a torch state dict or ``.safetensors`` file: by name, or as an open_clip ``CLIP`` state
  dict (``open_clip_pytorch_model.bin``/``open_clip_model.safetensors``) onto the model's
  open_clip towers, or as a timm model's state dict (``pytorch_model.bin``/
  ``model.safetensors``) onto its ``TimmVisionTower`` s, whichever loads the most weights;
- a Hugging Face CLIP/SigLIP folder (full or vision model) onto its ``HFVisionTower`` s (and
  ``HFTextTower`` s of the same text model);
- a transformers LLaVA folder or an mmpt export folder (``mmpt_vlm.json``).

Unless ``init_from_strict`` is false, loading is refused when less than
:data:`MIN_LOADED_FRACTION` of the weights the sources can fill (the whole model for mmpt
checkpoints and state dicts, the targeted towers for open_clip, timm and Hugging Face
sources) would load: typically a checkpoint of another family (a VLM run given to a CLIP
model). With several files the fraction counts them together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .init_sources import (
    FLAG,
    HF_TYPES,
    Mapped,
    by_name,
    family_of,
    from_folder_hooks,
    from_hf_clip,
    from_open_clip,
    from_timm,
    hf_model_type,
    tensors_of,
)

log = logging.getLogger("mmpt.models")

#: Least share (by number of values) of the fillable weights that must load.
MIN_LOADED_FRACTION = 0.5
STRICT_FLAG = "model.init_args.init_from_strict"


class InitFromError(ValueError):
    """``model.init_from`` cannot be applied: nothing fits, or too little does.

    ``mmpt fit`` prints it as one ``error:`` line.
    """


@dataclass
class InitFromReport:
    """What one ``init_from`` source gave.

    Attributes:
        source: The path.
        format: How it was read (``mmpt checkpoint``, ``open_clip``, ``timm``...).
        family: The model family it holds.
        loaded: Model keys set from it.
        missing: Model keys in its scope that no source of the list set.
        unexpected: Source keys not used (no such model key, or a shape no rule adapts).
        adapted: Model key -> how its tensor was adapted.
    """

    source: str
    format: str
    family: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)

    def summary(self, limit: int = 5) -> str:
        """One line: format, counts and the first ``limit`` names of each list."""

        def few(names: Sequence[str]) -> str:
            return f" {list(names[:limit])}{' ...' if len(names) > limit else ''}" if names else ""

        line = (
            f"init_from {self.source} ({self.format}, {self.family}): loaded "
            f"{len(self.loaded)} tensors, {len(self.missing)} missing{few(self.missing)}, "
            f"{len(self.unexpected)} unexpected{few(self.unexpected)}, "
            f"{len(self.adapted)} adapted"
        )
        return "; ".join([line, *[f"{k}: {how}" for k, how in self.adapted.items()][:limit]])


def read_source(path: str, model: nn.Module) -> Mapped:
    """Map ``path`` onto ``model``'s keys with the reader its format needs.

    Raises:
        FileNotFoundError: No file or folder at ``path``.
        mmpt.safe_load.UnsafeCheckpointError: A pickle that needs more than plain data.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{FLAG}: no checkpoint at {path!r} (an mmpt .ckpt, a state dict or .safetensors "
            "file, an open_clip or timm checkpoint, or a Hugging Face CLIP/SigLIP, LLaVA or "
            "mmpt export folder)"
        )
    if os.path.isdir(path):
        hooked = from_folder_hooks(path, model)
        if hooked is not None:
            return hooked
        if hf_model_type(path) in HF_TYPES:
            return from_hf_clip(path, model)
        if os.path.isfile(os.path.join(path, "last.ckpt")):
            path = os.path.join(path, "last.ckpt")
        else:
            from mmpt.models.encoders.timm_weights import resolve_checkpoint_file

            path = resolve_checkpoint_file(path, FLAG)
    state, lightning = tensors_of(path)
    plain = by_name(state, "mmpt checkpoint", lightning)
    if lightning:
        return plain
    candidates = [plain]
    if any(k.startswith("visual.") for k in state) or "token_embedding.weight" in state:
        # an open_clip CLIP (text keys at the top) or CustomTextCLIP (text.*) state dict
        candidates.append(from_open_clip(state, model))
    from mmpt.models.encoders.timm_vit import TimmVisionTower

    if any(isinstance(m, TimmVisionTower) for m in model.modules()):
        candidates.append(from_timm(path, model))
    own = model.state_dict()
    return max(candidates, key=lambda m: _values(_fitting(m, own), own))


def _fitting(mapped: Mapped, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mapped tensors whose name and shape are the model's."""
    return {k: v for k, v in mapped.state.items() if k in own and own[k].shape == v.shape}


def _values(keys: Sequence[str] | dict, own: dict[str, torch.Tensor]) -> int:
    return sum(own[k].numel() for k in keys)


def load_init_from(
    model: nn.Module, paths: Sequence[str], strict: bool = True
) -> list[InitFromReport]:
    """Load ``paths`` in order into ``model`` (a later file wins where two fill one weight).

    Args:
        model: The model (an :class:`~mmpt.models.module.MMPTModule` or any module).
        paths: Checkpoints, folders or files in the formats of this module's docstring.
        strict: Refuse when less than :data:`MIN_LOADED_FRACTION` of the fillable weights
            would load; False loads what fits and logs the same message as a WARNING.

    Returns:
        One report per path (logged, at WARNING when anything is missing or unexpected).

    Raises:
        FileNotFoundError: A path does not exist.
        InitFromError: Nothing of a source fits, or (strict) too little of them all does.
        mmpt.safe_load.UnsafeCheckpointError: A pickle that needs more than plain data.
    """
    own = model.state_dict()
    mapped = [read_source(p, model) for p in paths]
    fits = [_fitting(m, own) for m in mapped]
    for path, m, fit in zip(paths, mapped, fits, strict=True):
        if not fit:
            raise InitFromError(
                f"{FLAG}={path!r}: no parameter matches this {family_of(set(own))} model by "
                f"name and shape (read as {m.format}, {m.family}; source keys e.g. "
                f"{sorted(m.state)[:3]}, model keys e.g. {sorted(own)[:3]})"
            )
    scope = set(own) if any(m.scope is None for m in mapped) else set()
    for m in mapped:
        scope.update(m.scope or [])
    loaded = set().union(*fits) & scope
    fraction = _values(loaded, own) / max(1, _values(scope, own))
    if fraction < MIN_LOADED_FRACTION:
        message = (
            f"{FLAG}={list(paths)}: only {fraction:.0%} of the weights it can fill would load "
            f"({len(loaded)} of {len(scope)} tensors): the checkpoint holds a "
            f"{' + '.join(dict.fromkeys(m.family for m in mapped))} model, this is a "
            f"{family_of(set(own))} model. Check the path; to load the matching part anyway "
            f"set {STRICT_FLAG}: false"
        )
        if strict:
            raise InitFromError(message)
        log.warning(message)
    reports = []
    for path, m, fit in zip(paths, mapped, fits, strict=True):
        model.load_state_dict(fit, strict=False)
        unused = [k for k in m.state if k not in fit]
        report = InitFromReport(
            path,
            m.format,
            m.family,
            loaded=list(fit),
            missing=sorted(scope - loaded),
            unexpected=m.unexpected + unused,
            adapted=m.adapted,
        )
        level = logging.WARNING if report.missing or report.unexpected else logging.INFO
        log.log(level, "%s", report.summary())
        reports.append(report)
    return reports


def load_matching(model: nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Load the weights of one source that match ``model`` (no minimum fraction).

    Returns:
        (missing, unexpected): model keys not set, source keys not used.
    """
    (report,) = load_init_from(model, [path], strict=False)
    return report.missing, report.unexpected
