"""Video clips from encoded bytes: probe, segment frame sampling, decord/PyAV decoding, crop.

Both backends index frames the same way, in presentation order, and use the container's own
frame rate (``avg_frame_rate``), so the same time window and rng give the same frame indices
and (up to colour-conversion rounding) the same pixels. Decoding problems raise
:class:`CorruptVideo`, which the pipeline's ``map_skipping`` counts as a skipped sample.
"""

from __future__ import annotations

import importlib
import io
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_BACKENDS = ("decord", "pyav")


class CorruptVideo(ValueError):
    """Bytes that are not a decodable video with at least one frame (counted as a skip)."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream.

    Attributes:
        num_frames: Frames in presentation order (the valid indices are ``0..num_frames-1``).
        fps: Average frame rate of the stream, frames per second.
        duration: ``num_frames / fps`` in seconds (the span the frame indices cover).
    """

    num_frames: int
    fps: float
    duration: float


def _short(e: BaseException) -> str:
    """First line of an exception message, at most 200 characters (decord adds stack dumps)."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _make_info(backend: str, num_frames: int, fps: float) -> VideoInfo:
    if num_frames < 1:
        raise CorruptVideo(f"{backend}: video has no frames")
    if not math.isfinite(fps) or fps <= 0:
        raise CorruptVideo(f"{backend}: video has no usable frame rate ({fps})")
    return VideoInfo(num_frames=num_frames, fps=fps, duration=num_frames / fps)


class _Reader(Protocol):
    info: VideoInfo

    def read(self, indices: list[int]) -> np.ndarray: ...

    def close(self) -> None: ...


class _DecordReader:
    """decord ``VideoReader`` on the bytes; one decoding thread (DataLoader workers are many)."""

    def __init__(self, data: bytes) -> None:
        import decord

        try:
            self._vr: Any = decord.VideoReader(io.BytesIO(data), num_threads=1)
            num_frames, fps = len(self._vr), float(self._vr.get_avg_fps())
        except Exception as e:  # noqa: BLE001 - decord raises RuntimeError or DECORDError
            raise CorruptVideo(f"decord cannot open video: {_short(e)}") from e
        self.info = _make_info("decord", num_frames, fps)

    def read(self, indices: list[int]) -> np.ndarray:
        """Frames at sorted unique ``indices``: uint8 (T, H, W, 3)."""
        try:
            batch = self._vr.get_batch(indices)
        except Exception as e:  # noqa: BLE001
            raise CorruptVideo(f"decord cannot decode frames {indices}: {_short(e)}") from e
        # asnumpy() with decord's native bridge; a globally set torch bridge returns a tensor.
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)

    def close(self) -> None:
        self._vr = None


class _PyAVReader:
    """PyAV: index every packet once (no decoding), then decode from the right keyframe.

    Frame ``i`` is the packet with the ``i``-th smallest pts, as in decord, so the frame count
    is the number of packets actually present, not the ``nb_frames`` header field (absent in
    Matroska, wrong in some muxers). Reading starts at the last keyframe whose pts is at most
    the first wanted frame's: the equivalent of a backward keyframe seek, without trusting fps
    arithmetic. If a frame still fails to appear, decoding restarts from the first packet.
    """

    def __init__(self, data: bytes) -> None:
        import av
        from av.video.reformatter import VideoReformatter

        self._av = av
        self._to_rgb = VideoReformatter()  # reused: a fresh one per frame costs ~1 ms/frame
        try:
            self._container: Any = av.open(io.BytesIO(data), metadata_errors="ignore")
        except av.FFmpegError as e:
            raise CorruptVideo(f"pyav cannot open video: {_short(e)}") from e
        try:
            if not self._container.streams.video:
                raise CorruptVideo("pyav: no video stream in container")
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = 1
            self._packets = self._index_packets()
            # avg_frame_rate, as decord's get_avg_fps(); guessed only where the muxer left it 0
            rate = self._stream.average_rate or self._stream.guessed_rate
            self.info = _make_info("pyav", len(self._packets), float(rate) if rate else 0.0)
            self._pts = sorted(p.pts for p in self._packets)
            if len(set(self._pts)) != len(self._pts):
                raise CorruptVideo("pyav: duplicate frame timestamps")
        except BaseException:
            self.close()
            raise

    def _index_packets(self) -> list[Any]:
        packets = []
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:  # the demuxer's final flush packet
                    continue
                if packet.is_corrupt:
                    raise CorruptVideo(f"pyav: corrupt or truncated packet {len(packets)}")
                if packet.pts is None:
                    raise CorruptVideo(f"pyav: packet {len(packets)} has no timestamp")
                packets.append(packet)
        except self._av.FFmpegError as e:
            raise CorruptVideo(f"pyav cannot read packets: {_short(e)}") from e
        return packets

    def _decode_from(self, start: int, wanted: set[int]) -> dict[int, np.ndarray]:
        ctx = self._stream.codec_context
        ctx.flush_buffers()
        found: dict[int, np.ndarray] = {}
        for packet in [*self._packets[start:], None]:  # None drains the decoder
            for frame in ctx.decode(packet):
                if frame.pts in wanted and frame.pts not in found:
                    found[frame.pts] = self._to_rgb.reformat(frame, format="rgb24").to_ndarray()
            if len(found) == len(wanted):
                break
        return found

    def read(self, indices: list[int]) -> np.ndarray:
        """Frames at sorted unique ``indices``: uint8 (T, H, W, 3)."""
        wanted = [self._pts[i] for i in indices]
        start = max(
            (k for k, p in enumerate(self._packets) if p.is_keyframe and p.pts <= wanted[0]),
            default=0,
        )
        try:
            found = self._decode_from(start, set(wanted))
            if len(found) < len(wanted) and start > 0:
                found = self._decode_from(0, set(wanted))
        except self._av.FFmpegError as e:
            raise CorruptVideo(f"pyav cannot decode frames {indices}: {_short(e)}") from e
        missing = [i for i, p in zip(indices, wanted, strict=True) if p not in found]
        if missing:
            raise CorruptVideo(f"pyav: frames {missing} could not be decoded")
        return np.stack([found[p] for p in wanted])

    def close(self) -> None:
        self._container.close()


def _check_backend(backend: str) -> None:
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {VIDEO_BACKENDS}")


def _open(data: bytes, backend: str) -> _Reader:
    _check_backend(backend)
    return _DecordReader(data) if backend == "decord" else _PyAVReader(data)


def _read(reader: _Reader, indices: list[int]) -> torch.Tensor:
    n = reader.info.num_frames
    if not indices or min(indices) < 0 or max(indices) >= n:
        raise ValueError(f"frame indices {indices} empty or outside [0, {n})")
    unique = sorted(set(indices))
    frames = reader.read(unique)  # (U, H, W, 3)
    pos = {i: k for k, i in enumerate(unique)}
    order = torch.tensor([pos[i] for i in indices])
    return torch.from_numpy(np.ascontiguousarray(frames))[order].permute(0, 3, 1, 2).contiguous()


def probe(data: bytes, backend: str = "decord") -> VideoInfo:
    """Frame count and real frame rate of an encoded video.

    Args:
        data: Encoded video bytes (e.g. an mp4 from a WebDataset sample).
        backend: One of :data:`VIDEO_BACKENDS`.

    Raises:
        CorruptVideo: Undecodable bytes, no video stream, no frames, or no frame rate; the
            message names the backend and the reason.
    """
    reader = _open(data, backend)
    reader.close()
    return reader.info


def read_frames(data: bytes, indices: list[int], backend: str = "decord") -> torch.Tensor:
    """Decode the frames at ``indices`` (any order, repeats allowed).

    Args:
        data: Encoded video bytes.
        indices: Frame indices in presentation order, each in ``[0, num_frames)``.
        backend: One of :data:`VIDEO_BACKENDS`.

    Returns:
        uint8 RGB frames (T, 3, H, W), T = ``len(indices)``, in the order of ``indices``.

    Raises:
        CorruptVideo: The video or one of the frames cannot be decoded.
        ValueError: ``indices`` is empty or has an index outside the video.
    """
    reader = _open(data, backend)
    try:
        return _read(reader, indices)
    finally:
        reader.close()


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
