"""Find the image or speech tower of any mmpt model family, for the exports of one tower."""

from __future__ import annotations

from torch import nn

#: ``--part`` values and the attributes (in order) where a model family keeps that tower.
PART_ATTRIBUTES = {"vision": ("vision", "encoder"), "audio": ("audio", "encoder")}
_PREPROCESS = {"vision": "image_preprocess", "audio": "audio_preprocess"}


def find_part(model: nn.Module, part: str) -> nn.Module:
    """The ``part`` tower of ``model``: ``vision`` (image) or ``audio`` (speech).

    Contrastive models and VLMs keep them as ``vision``/``audio``, an MAE its image tower and a
    continued wav2vec 2.0 its speech tower as ``encoder``; a tower is recognised by its
    ``image_preprocess`` or ``audio_preprocess``.

    Args:
        model: A LightningModule of any family, or a tower itself.
        part: ``vision`` or ``audio``.

    Returns:
        The tower module.

    Raises:
        ValueError: Unknown part, or the model has no such tower.
    """
    if part not in PART_ATTRIBUTES:
        raise ValueError(f"--part must be one of {sorted(PART_ATTRIBUTES)}, got {part!r}")
    if hasattr(model, _PREPROCESS[part]):
        return model
    for attr in PART_ATTRIBUTES[part]:
        tower = getattr(model, attr, None)
        if isinstance(tower, nn.Module) and hasattr(tower, _PREPROCESS[part]):
            return tower
    kind = "image" if part == "vision" else "speech"
    raise ValueError(f"{type(model).__name__} has no {kind} tower (--part {part})")
