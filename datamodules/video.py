"""Video clips from encoded bytes: probe, segment frame sampling, decord/PyAV decoding, crop.

Both backends index frames the same way, in presentation order, and use the container's own
frame rate (``avg_frame_rate``), so the same time window and rng give the same frame indices
and (up to colour-conversion rounding) the same pixels. Decoding problems raise
:class:`CorruptVideo`, which the pipeline's ``map_skipping`` counts as a skipped sample.
The backends themselves live in :mod:`mmpt.datamodules.video_decode` (re-exported here).
"""

from __future__ import annotations

import importlib
import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from mmpt.datamodules.video_decode import (
    VIDEO_BACKENDS,
    CorruptVideo,
    VideoInfo,
    _check_backend,
    _open,
    _read,
    probe,
    read_frames,
)

__all__ = [
    "VIDEO_BACKENDS",
    "CorruptVideo",
    "VideoClipDecoder",
    "VideoInfo",
    "clip_frames",
    "probe",
    "read_frames",
    "resize_crop",
    "segment_indices",
]


def segment_indices(
    start_frame: int,
    end_frame: int,
    num_samples: int,
    train: bool,
    rng: random.Random | None = None,
) -> list[int]:
    """One frame per equal segment of ``[start_frame, end_frame)`` (EgoVLP-style sampling).

    Segment ``k`` is ``[b_k, b_{k+1})`` with ``b_k = start + floor(k * n / num_samples)``,
    ``n = end - start``. Training takes a uniformly random frame of each segment; evaluation
    the frame holding the segment's temporal centre, ``(b_k + b_{k+1}) // 2``. With fewer
    frames than samples some segments are empty; an empty segment takes the single frame
    ``b_k``, so every frame is repeated about ``num_samples / n`` times, in order (e.g.
    3 frames, 8 samples -> ``[0, 0, 0, 1, 1, 1, 2, 2]``). Indices are non-decreasing and
    always inside ``[start_frame, end_frame)``.

    Args:
        start_frame: First frame of the window.
        end_frame: One past the last frame of the window.
        num_samples: Frames to return.
        train: Random frame per segment (True) or the middle frame (False).
        rng: Random source for training; None uses the ``random`` module (seeded per worker
            by the DataLoader).

    Raises:
        ValueError: Empty window or ``num_samples < 1``.
    """
    n = end_frame - start_frame
    if n < 1 or num_samples < 1:
        raise ValueError(
            f"need end > start and num_samples >= 1, got [{start_frame}, "
            f"{end_frame}) and {num_samples}"
        )
    randrange = rng.randrange if rng is not None else random.randrange
    bounds = [start_frame + k * n // num_samples for k in range(num_samples + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        hi = max(hi, lo + 1)
        out.append(randrange(lo, hi) if train else (lo + hi) // 2)
    return out


def clip_frames(
    info: VideoInfo, start_s: float | None = None, end_s: float | None = None
) -> tuple[int, int, bool]:
    """Frame range ``[start, end)`` of the time window ``[start_s, end_s)`` at the real fps.

    The range holds every frame overlapping the window: ``floor(start_s * fps)`` to
    ``ceil(end_s * fps)`` (None: the video's start or end). Clamping, flagged by the third
    value:

    - a window reaching past either end of the video is cut at that end;
    - a window entirely past the end keeps its length (capped at the video's) and is moved
      back to end at the last frame; one entirely before the start is moved to begin at
      frame 0. Annotations past the end usually mean a video shorter than its metadata, and
      the nearest frames are the best stand-in.

    Args:
        info: The video's frame count and fps (:func:`probe`).
        start_s: Window start in seconds, or None.
        end_s: Window end in seconds, or None.

    Returns:
        ``(start_frame, end_frame, clamped)`` with ``0 <= start_frame < end_frame <=
        info.num_frames``.

    Raises:
        ValueError: A non-finite time, or an empty or inverted window (``end_s <= start_s``).
    """
    n, eps = info.num_frames, 1e-6  # eps: 2.0 s * 10 fps is frame 20, not 19.999999
    for t in (start_s, end_s):
        if t is not None and not math.isfinite(t):
            raise ValueError(f"window times must be finite, got [{start_s}, {end_s})")
    if end_s is not None and end_s <= (0.0 if start_s is None else start_s):
        raise ValueError(f"empty or inverted time window [{start_s}, {end_s})")
    start = 0 if start_s is None else math.floor(start_s * info.fps + eps)
    end = n if end_s is None else math.ceil(end_s * info.fps - eps)
    end = max(end, start + 1)  # a window within one frame interval still holds that frame
    length = min(end - start, n)
    if start >= n:
        return n - length, n, True
    if end <= 0:
        return 0, length, True
    return max(start, 0), min(end, n), start < 0 or end > n


def resize_crop(
    frames: torch.Tensor,
    short: int,
    size: int,
    train: bool,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the short side to ``short`` (bicubic, antialiased) and crop ``size`` x ``size``.

    One crop position for the whole clip: random in training, centred in evaluation.

    Args:
        frames: uint8 (T, 3, H, W).
        short: Short side after resizing (no resize when it already is that).
        size: Crop side, at most ``short``.
        train: Random crop (True) or centre crop (False).
        rng: Random source for the crop; None uses the ``random`` module.

    Returns:
        uint8 (T, 3, size, size).

    Raises:
        ValueError: ``size > short``.
    """
    if size > short:
        raise ValueError(f"crop size {size} exceeds the resized short side {short}")
    h, w = frames.shape[-2:]
    if min(h, w) != short:
        nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        x = F.interpolate(frames.float(), size=(nh, nw), mode="bicubic", antialias=True)
        frames = x.round_().clamp_(0, 255).to(torch.uint8)
    h, w = frames.shape[-2:]
    if train:
        randint = rng.randint if rng is not None else random.randint
        top, left = randint(0, h - size), randint(0, w - size)
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top : top + size, left : left + size].contiguous()


class VideoClipDecoder:
    """Encoded video bytes (+ optional time window) -> ``num_frames`` cropped frames.

    Picklable (plain settings only), so it runs in DataLoader workers. Each call: probe the
    video, map the window to frames at the real fps (clamping windows past the ends),
    sample one frame per segment, decode, resize the short side and crop.

    Args:
        num_frames: Frames per clip (4 in EgoVLP pretraining, 16 at evaluation).
        train: Random frame per segment and random crop (True), or middle frames and centre
            crop (False).
        backend: ``"decord"`` or ``"pyav"``; both give the same frames.
        size: Output side in pixels.
        resize_short: Short side before cropping (e.g. 256 for a 224 crop); None: ``size``.
    """

    def __init__(
        self,
        num_frames: int = 4,
        train: bool = True,
        backend: str = "decord",
        size: int = 224,
        resize_short: int | None = None,
    ) -> None:
        _check_backend(backend)
        importlib.import_module("decord" if backend == "decord" else "av")  # fail early
        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames and size must be >= 1, got {num_frames}, {size}")
        if resize_short is not None and resize_short < size:
            raise ValueError(f"resize_short ({resize_short}) must be >= size ({size})")
        self.num_frames, self.train, self.backend = num_frames, train, backend
        self.size, self.resize_short = size, resize_short

    def __call__(
        self,
        data: bytes,
        start_s: float | None = None,
        end_s: float | None = None,
        rng: random.Random | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Decode one clip.

        Args:
            data: Encoded video bytes.
            start_s: Window start in seconds (None: start of the video).
            end_s: Window end in seconds (None: end of the video).
            rng: Random source for frame sampling and cropping; None uses ``random``.

        Returns:
            uint8 frames (num_frames, 3, size, size), and meta: ``indices`` (list of frame
            indices), ``fps`` (float), ``clamped`` (bool: the window was moved or cut),
            ``window`` (``(start_frame, end_frame)``).

        Raises:
            CorruptVideo: Undecodable or empty video (a counted skip in the pipeline).
            ValueError: An invalid time window.
        """
        reader = _open(data, self.backend)
        try:
            start, end, clamped = clip_frames(reader.info, start_s, end_s)
            indices = segment_indices(start, end, self.num_frames, self.train, rng)
            frames = _read(reader, indices)
        finally:
            reader.close()
        short = self.resize_short or self.size
        frames = resize_crop(frames, short, self.size, self.train, rng)
        meta = {
            "indices": indices,
            "fps": reader.info.fps,
            "clamped": clamped,
            "window": (start, end),
        }
        return frames, meta
