"""The medium a retrieval model embeds against text (image, video, audio) and the names it gives."""

from __future__ import annotations

from typing import Any, Literal

Media = Literal["image", "video", "audio"]

#: One-letter code of each medium in metric names (``t2i``, ``t2v``, ``t2a``).
LETTER: dict[str, str] = {"image": "i", "video": "v", "audio": "a"}
#: How reports count the items of each medium (``num_images``, ``num_videos``, ``num_audio``).
PLURAL: dict[str, str] = {"image": "images", "video": "videos", "audio": "audio"}


def media_of(model: Any) -> Media:
    """The medium ``model`` embeds against text, from its towers.

    Args:
        model: A retrieval model: ``ContrastiveModule`` (``vision`` or ``audio`` tower),
            ``VideoTextModule`` (``encode_video``) or another module with ``encode_image``.

    Returns:
        ``"audio"`` for a model with an audio tower, ``"video"`` for one that encodes video,
        else ``"image"``.
    """
    if getattr(model, "audio", None) is not None:
        return "audio"
    if callable(getattr(model, "encode_video", None)):
        return "video"
    return "image"


def directions(media: str) -> tuple[str, str]:
    """Metric-name codes of text->media and media->text retrieval, e.g. ``("t2a", "a2t")``.

    Raises:
        ValueError: ``media`` is not image, video or audio.
    """
    if media not in LETTER:
        raise ValueError(f"unknown retrieval medium {media!r}: use one of {sorted(LETTER)}")
    code = LETTER[media]
    return f"t2{code}", f"{code}2t"


def direction_labels(media: str) -> tuple[str, str]:
    """Readable text->media and media->text labels for plots, e.g. ``text->audio``."""
    directions(media)  # checks the name
    return f"text->{media}", f"{media}->text"


def rename_retrieval(metrics: dict[str, float], media: str) -> dict[str, float]:
    """Rename image-text retrieval keys (``t2i/...``, ``i2t/...``) to ``media``'s codes.

    The retrieval code computes with "images" whatever they are; only the names change.

    Args:
        metrics: Keys such as ``t2i/R@1`` or ``i2t/median_rank`` (others kept as they are).
        media: ``image``, ``video`` or ``audio``.

    Returns:
        The same values, keys e.g. ``t2a/R@1`` and ``a2t/median_rank`` for audio.
    """
    t2m, m2t = directions(media)
    rename = {"t2i": t2m, "i2t": m2t}
    out = {}
    for key, value in metrics.items():
        head, sep, tail = key.partition("/")
        out[rename.get(head, head) + sep + tail if sep else key] = value
    return out


def item_counts(media: str, num_items: int, num_texts: int) -> dict[str, Any]:
    """A report's medium and counts: ``{"modality": "audio", "num_audio": N, "num_texts": M}``.

    Image reports keep ``num_images``; videos give ``num_videos``, audio clips ``num_audio``.
    """
    directions(media)  # checks the name
    return {"modality": media, f"num_{PLURAL[media]}": num_items, "num_texts": num_texts}
