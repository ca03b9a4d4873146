"""Rendering and encoding of synthetic video clips: shape tracks, frames, mp4 bytes.

Used by :mod:`mmpt.synth.video_text`, which plans the videos and writes the splits.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mmpt.synth.image_text import _NOISE_OFFSET, _SHAPE_SCALE, _SUPERSAMPLE, _place, _shape_points

# (dx, dy, size change, turn) signs per action; image y points down, so +turn is clockwise.
_MOTION = {
    "move right": (1, 0, 0, 0), "move left": (-1, 0, 0, 0),
    "move up": (0, -1, 0, 0), "move down": (0, 1, 0, 0),
    "grow": (0, 0, 1, 0), "shrink": (0, 0, -1, 0),
    "spin clockwise": (0, 0, 0, 1), "spin counterclockwise": (0, 0, 0, -1),
}  # fmt: skip
# Circumscribed radius (before the per-shape scale) and travel, as fractions of the side.
_SMALL, _LARGE, _STEADY = (0.08, 0.11), (0.20, 0.25), (0.10, 0.20)
_TRAVEL = (0.30, 0.40)
_TURN_DEG = (60.0, 90.0)  # < 45 deg a step from 4 frames up: no aliasing on 90-deg symmetry
_MARGIN = 1.0  # output pixels kept between the shape and the frame edge
_X264_OPTIONS = {"crf": "23", "preset": "veryfast"}


@dataclass(frozen=True)
class ClipSpec:
    """How every clip of a dataset is rendered and encoded.

    Args:
        image_size: Frame side in pixels (even).
        num_frames: Frames per clip.
        fps: Frame rate written into the mp4.
        codec: PyAV encoder name (``libx264`` or ``mpeg4``).
    """

    image_size: int
    num_frames: int
    fps: int
    codec: str

    @property
    def seconds(self) -> float:
        """Clip duration in seconds."""
        return self.num_frames / self.fps


def pick_codec() -> str:
    """``libx264`` when the installed PyAV can encode it, else ``mpeg4``."""
    import av

    try:
        av.codec.Codec("libx264", "w")
    except ValueError:  # av.codec.codec.UnknownCodecError: not in this FFmpeg build
        return "mpeg4"
    return "libx264"


def plan_track(
    shape: str, action: str, image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shape state at the first and the last frame; frames in between interpolate linearly.

    No single frame tells the direction: a move's midpoint, every size and the start angle
    are drawn the same way whichever way the shape goes, so over the clip's frames the
    positions (sizes, angles) of opposite actions have the same distribution.

    Returns:
        Two (4,) arrays ``(centre x, centre y, radius, angle)`` in output pixels and radians.

    """
    dx, dy, grow, turn = _MOTION[action]
    s = image_size
    if grow:
        r0, r1 = rng.uniform(*_SMALL) * s, rng.uniform(*_LARGE) * s
        r0, r1 = (r0, r1) if grow > 0 else (r1, r0)
    else:
        r0 = r1 = rng.uniform(*_STEADY) * s
    travel = rng.uniform(*_TRAVEL) * s if dx or dy else 0.0
    reach = max(r0, r1) * _SHAPE_SCALE[shape] + _MARGIN
    mx = _place(reach + abs(dx) * travel / 2, s - reach - abs(dx) * travel / 2, rng)
    my = _place(reach + abs(dy) * travel / 2, s - reach - abs(dy) * travel / 2, rng)
    a0 = rng.uniform(0, 2 * math.pi)
    a1 = a0 + turn * math.radians(rng.uniform(*_TURN_DEG))
    start = [mx - dx * travel / 2, my - dy * travel / 2, r0, a0]
    end = [mx + dx * travel / 2, my + dy * travel / 2, r1, a1]
    return np.array(start), np.array(end)


def render_clip(
    shape: str,
    fill: tuple[int, int, int],
    grey: int,
    track: tuple[np.ndarray, np.ndarray],
    spec: ClipSpec,
    rng: np.random.Generator,
    noise_bank: list[Image.Image],
) -> np.ndarray:
    """Draw the frames of one clip: the shape along ``track`` on a grey, noisy background.

    Args:
        shape: One of :data:`~mmpt.synth.image_text.SHAPES`.
        fill: Shape colour (RGB).
        grey: Background grey level.
        track: Output of :func:`plan_track`.
        spec: Frame size and count.
        rng: Picks a noise tile per frame.
        noise_bank: Tiles from :func:`~mmpt.synth.image_text.make_noise_bank`.

    Returns:
        (T, H, W, 3) uint8 RGB frames.

    """
    big = spec.image_size * _SUPERSAMPLE
    to_canvas = np.array([_SUPERSAMPLE, _SUPERSAMPLE, _SUPERSAMPLE, 1.0])  # angle unscaled
    states = np.linspace(track[0], track[1], spec.num_frames) * to_canvas
    frames = np.empty((spec.num_frames, spec.image_size, spec.image_size, 3), np.uint8)
    for t, (cx, cy, r, angle) in enumerate(states):
        canvas = Image.new("RGB", (big, big), (grey, grey, grey))
        draw = ImageDraw.Draw(canvas)
        r *= _SHAPE_SCALE[shape]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx + x, cy + y) for x, y in _shape_points(shape, r, angle)], fill=fill)
        noise = noise_bank[int(rng.integers(len(noise_bank)))]
        frame = ImageChops.add(canvas.reduce(_SUPERSAMPLE), noise, offset=-_NOISE_OFFSET)
        frames[t] = np.asarray(frame)
    return frames


def encode_mp4(frames: np.ndarray, fps: int, codec: str) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames as a yuv420p mp4 with PyAV; same input, same bytes."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one thread: deterministic and light
        if codec == "libx264":
            stream.options = dict(_X264_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
