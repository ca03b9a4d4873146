"""Images for shards: a full decode check, then the bytes as they are or a re-encoded JPEG."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert to RGB, compositing transparent images onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def encode_image(
    data: bytes, resize_short_side: int | None, jpeg_quality: int
) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Check an encoded image fully and return it as a JPEG fit for shards.

    An upright RGB/greyscale JPEG that needs no resize is returned byte for byte; anything
    else is converted to RGB (transparency onto white, EXIF orientation applied), downscaled
    to ``resize_short_side`` when larger, and re-encoded at ``jpeg_quality``.

    Returns:
        (JPEG bytes, (width, height) written, (width, height) of the source).

    Raises:
        Exception: Any decode failure (the image is corrupt).
    """
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # structure check; load() below decodes the pixels
    im = Image.open(io.BytesIO(data))
    original = im.size
    resize = resize_short_side is not None and min(im.size) > resize_short_side
    upright = im.getexif().get(_EXIF_ORIENTATION, 1) == 1
    if im.format == "JPEG" and not resize and upright and im.mode in ("RGB", "L"):
        im.load()
        return data, im.size, original
    if resize:  # let the JPEG decoder skip detail the resize would throw away
        scale = resize_short_side / min(im.size)
        im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
    im = _to_rgb(ImageOps.exif_transpose(im))
    if resize:
        scale = resize_short_side / min(im.size)
        target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue(), im.size, original
