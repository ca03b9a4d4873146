"""Video decoding backends: probe and read frames from encoded bytes with decord or PyAV.

Both backends index frames the same way, in presentation order, and use the container's own
frame rate (``avg_frame_rate``), so the same frame indices give (up to colour-conversion
rounding) the same pixels. Decoding problems raise :class:`CorruptVideo`, which the
pipeline's ``map_skipping`` counts as a skipped sample. Frame sampling, cropping and
:class:`~mmpt.datamodules.video.VideoClipDecoder` live in :mod:`mmpt.datamodules.video`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

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
