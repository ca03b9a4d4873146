"""Per-sample decoding: pick fields by key, decode images fast, read captions and labels."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

Image.MAX_IMAGE_PIXELS = 300_000_000  # large web images are normal; decompression bombs are not


class MissingField(KeyError):
    """A sample lacks a field the pipeline needs (counted as a skip)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing field"


def first_key(sample: dict[str, Any], keys: str) -> str:
    """The first of ``keys`` (``;``-separated extensions, e.g. ``jpg;png``) present in sample.

    Raises:
        MissingField: None of them is present.
    """
    for k in keys.split(";"):
        if k in sample:
            return k
    raise MissingField(
        f"none of {keys!r} in sample (has {sorted(k for k in sample if k[0] != '_')})"
    )


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    For JPEGs, ``draft`` lets libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that is still
    at least ``min_size`` on the short side: the same result after resizing, at a fraction of
    the decode cost for large web images.

    Args:
        data: Encoded image bytes.
        min_size: Smallest short side the caller needs; None decodes at full size.
    """
    img = Image.open(io.BytesIO(data))
    if min_size is not None and img.format == "JPEG":
        w, h = img.size
        scale = min(w, h) / float(min_size)
        if scale >= 2:
            img.draft("RGB", (max(1, int(w / scale) + 1), max(1, int(h / scale) + 1)))
    return img.convert("RGB")


def read_field(sample: dict[str, Any], spec: str) -> Any:
    """Read a field: ``txt`` (UTF-8 text) or ``json:caption`` (a field of the json part).

    ``spec`` may list alternatives separated by ``;`` (``txt;json:caption``); the first present
    wins. Nested json fields use dots (``json:meta.caption``).

    Raises:
        MissingField: None of the alternatives is present.
    """
    for alt in spec.split(";"):
        ext, _, path = alt.partition(":")
        if ext not in sample:
            continue
        raw = sample[ext]
        if not path:
            return raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value: Any = json.loads(raw) if isinstance(raw, bytes) else raw
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            return value
    raise MissingField(f"no {spec!r} in sample")


def read_captions(sample: dict[str, Any], spec: str) -> list[str]:
    """One or more non-empty captions from ``spec`` (a string field or a list field).

    Raises:
        MissingField: No caption, or only empty ones.
    """
    value = read_field(sample, spec)
    captions = [value] if isinstance(value, str) else [str(c) for c in value]
    captions = [c.strip() for c in captions if c and str(c).strip()]
    if not captions:
        raise MissingField(f"empty caption in {spec!r}")
    return captions


def read_label(sample: dict[str, Any], spec: str | None) -> int:
    """A class id from ``spec`` (e.g. ``json:label``); -1 when ``spec`` is None or absent.

    Raises:
        ValueError: The field is there but not an integer (a bad sample).
    """
    if not spec:
        return -1
    try:
        return int(read_field(sample, spec))
    except KeyError:
        return -1


def read_class(sample: dict[str, Any], spec: str | None) -> int | str:
    """A class id or class name from ``spec`` (``json:label``, ``json:class``); -1 when absent.

    An integer (or a string of one) is a class id; any other string is a class name, which
    the caller maps to an id (``ImageTextSample``) or collects (zero-shot classes from labels).

    Raises:
        ValueError: The field is there but neither an integer nor a non-empty string.
    """
    if not spec:
        return -1
    try:
        value = read_field(sample, spec)
    except KeyError:
        return -1
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{spec!r} is {value!r}: a label is a class id or a class name")
    if isinstance(value, int):
        return value
    name = value.strip()
    if not name:
        raise ValueError(f"{spec!r} is an empty class name")
    try:
        return int(name)
    except ValueError:
        return name
