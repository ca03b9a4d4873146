"""Video decoding and frame sampling on tiny clips encoded in the test (mpeg4, 32x24)."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("decord")

from mmpt.datamodules.stages import SkipCounter, map_skipping  # noqa: E402
from mmpt.datamodules.video import (  # noqa: E402
    VIDEO_BACKENDS,
    CorruptVideo,
    VideoClipDecoder,
    VideoInfo,
    clip_frames,
    probe,
    read_frames,
    resize_crop,
    segment_indices,
)

W, H = 32, 24


def frame_rgb(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame ``i``: red = 3 * i (which frame), green/blue = x/y ramps (where in the frame)."""
    a = np.empty((height, width, 3), np.uint8)
    a[..., 0] = (3 * i) % 256
    a[..., 1] = (np.arange(width)[None, :] * 255 // width).astype(np.uint8)
    a[..., 2] = (np.arange(height)[:, None] * 255 // height).astype(np.uint8)
    return a


def encode(
    num_frames: int,
    fps: int = 10,
    fmt: str = "mp4",
    options: dict[str, str] | None = None,
    size: tuple[int, int] = (W, H),
    path: Path | None = None,
) -> bytes:
    """An mpeg4 clip of ``num_frames`` frames (to ``path`` when the muxer needs a real file).

    ``qmax=2`` keeps quantisation fine enough that the red channel still tells frames apart.
    """
    target = str(path) if path is not None else io.BytesIO()
    mux_options = {"movflags": "faststart"} if path is not None else None
    with av.open(target, "w", format=fmt, options=mux_options) as c:
        s = c.add_stream("mpeg4", rate=fps, options={"qmax": "2", **(options or {})})
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_rgb(i, *size), format="rgb24")
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path.read_bytes() if path is not None else target.getvalue()


def decode_all(data: bytes) -> np.ndarray:
    """Every frame by plain sequential PyAV decoding: uint8 (N, H, W, 3)."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def max_diff(a: torch.Tensor, b: torch.Tensor | np.ndarray) -> int:
    return int((a.int() - torch.as_tensor(b).int()).abs().max())


@pytest.fixture(scope="module")
def clip10() -> bytes:
    """30 frames at 10 fps (3 s)."""
    return encode(30, fps=10)


@pytest.fixture(scope="module")
def clip25() -> bytes:
    """75 frames at 25 fps (3 s)."""
    return encode(75, fps=25)


@pytest.fixture(scope="module")
def clip_gop() -> bytes:
    """40 frames at 25 fps with a keyframe every 8 frames (reads start mid-video)."""
    return encode(40, fps=25, options={"g": "8"})


# --- probing --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
@pytest.mark.parametrize("fps", [10, 25])
def test_frame_count_and_fps_agree(fmt: str, fps: int) -> None:
    data = encode(20, fps=fps, fmt=fmt)
    infos = [probe(data, b) for b in VIDEO_BACKENDS]
    assert infos[0] == infos[1] == VideoInfo(20, float(fps), 20 / fps)
    assert len(decode_all(data)) == 20
    if fmt == "matroska":  # no frame count in the header: PyAV's count comes from the packets
        with av.open(io.BytesIO(data)) as c:
            assert c.streams.video[0].frames == 0


def test_frame_count_with_b_frames() -> None:
    data = encode(30, fps=25, options={"g": "8", "bf": "2"})
    assert probe(data, "decord").num_frames == probe(data, "pyav").num_frames == 30


# --- same frames from both backends ---------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_backends_same_indices_and_frames(clip_gop: bytes, train: bool) -> None:
    out = {}
    for backend in VIDEO_BACKENDS:
        dec = VideoClipDecoder(num_frames=4, train=train, backend=backend, size=16)
        out[backend] = dec(clip_gop, 0.2, 1.5, rng=random.Random(3))
    (fd, md), (fp, mp) = out["decord"], out["pyav"]
    assert md == mp
    assert max_diff(fd, fp) <= 2


def test_read_frames_matches_sequential_decode(clip_gop: bytes) -> None:
    full = decode_all(clip_gop)
    indices = [39, 3, 3, 17, 33, 8, 0]  # unsorted, repeated, across keyframes
    expected = torch.from_numpy(full[indices]).permute(0, 3, 1, 2)
    for backend in VIDEO_BACKENDS:
        got = read_frames(clip_gop, indices, backend)
        assert got.shape == (7, 3, H, W) and got.dtype == torch.uint8
        assert max_diff(got, expected) <= 2, backend


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "decord",
            marks=pytest.mark.xfail(
                reason="decord 0.6 seeks to the wrong frame on mpeg4 with B-frames (h264 is fine)",
                strict=False,
            ),
        ),
        "pyav",
    ],
)
def test_b_frames_single_frame_reads(backend: str) -> None:
    data = encode(24, fps=25, options={"g": "8", "bf": "2"})
    full = torch.from_numpy(decode_all(data)).permute(0, 3, 1, 2)
    for i in (2, 7, 9, 15, 23):
        assert max_diff(read_frames(data, [i], backend), full[i : i + 1]) <= 2, i


def test_read_frames_rejects_bad_indices(clip10: bytes) -> None:
    for backend in VIDEO_BACKENDS:
        for bad in ([], [30], [-1]):
            with pytest.raises(ValueError, match="outside"):
                read_frames(clip10, bad, backend)
    with pytest.raises(ValueError, match="backend"):
        read_frames(clip10, [0], "cv2")


# --- real fps and time windows --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "fps", "window", "indices"),
    [("clip10", 10, (0, 20), [2, 7, 12, 17]), ("clip25", 25, (0, 50), [6, 18, 31, 43])],
)
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_real_fps_maps_seconds_to_frames(
    request: pytest.FixtureRequest,
    fixture: str,
    fps: int,
    window: tuple[int, int],
    indices: list[int],
    backend: str,
) -> None:
    data = request.getfixturevalue(fixture)
    info = probe(data, backend)
    assert info.fps == fps and info.duration == pytest.approx(3.0)
    assert clip_frames(info, 0.0, 2.0) == (*window, False)  # 2 s = 20 vs 50 frames
    assert clip_frames(info, 1.0, 3.0) == (fps, 3 * fps, False)
    dec = VideoClipDecoder(num_frames=4, train=False, backend=backend, size=24, resize_short=24)
    frames, meta = dec(data, 0.0, 2.0)
    assert meta == {"indices": indices, "fps": fps, "clamped": False, "window": window}
    red = frames[:, 0].float().mean(dim=(1, 2))  # red encodes 3 * frame index
    assert torch.allclose(red, 3 * torch.tensor(indices, dtype=torch.float), atol=3)


def test_clip_frames_clamping() -> None:
    info = VideoInfo(num_frames=30, fps=10.0, duration=3.0)
    assert clip_frames(info) == (0, 30, False)
    assert clip_frames(info, 1.0, 2.0) == (10, 20, False)
    assert clip_frames(info, 2.0, None) == (20, 30, False)
    assert clip_frames(info, None, 1.0) == (0, 10, False)
    assert clip_frames(info, 0.05, 0.15) == (0, 2, False)  # every frame the window touches
    assert clip_frames(info, 2.5, 4.0) == (25, 30, True)  # cut at the end
    assert clip_frames(info, -0.5, 1.0) == (0, 10, True)  # cut at the start
    assert clip_frames(info, 5.0, 6.0) == (20, 30, True)  # past the end: last 10 frames
    assert clip_frames(info, 5.0, 10.0) == (0, 30, True)  # ... at most the whole video
    assert clip_frames(info, 4.0, None) == (29, 30, True)  # open window past the end
    assert clip_frames(info, -3.0, -1.0) == (0, 20, True)  # before the start: first frames
    for bad in [(2.0, 1.0), (1.0, 1.0), (None, -1.0), (float("nan"), 1.0), (0.0, float("inf"))]:
        with pytest.raises(ValueError):
            clip_frames(info, *bad)


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_decoder_flags_clamped_windows(clip10: bytes, backend: str) -> None:
    dec = VideoClipDecoder(num_frames=4, train=True, backend=backend, size=16)
    _, meta = dec(clip10, 2.5, 4.0, rng=random.Random(0))
    assert meta["clamped"] and meta["window"] == (25, 30)
    assert all(25 <= i < 30 for i in meta["indices"])
    _, meta = dec(clip10, 9.0, 10.0, rng=random.Random(0))
    assert meta["clamped"] and meta["window"] == (20, 30)
    _, meta = dec(clip10, 0.5, 1.5, rng=random.Random(0))
    assert not meta["clamped"]


# --- segment sampling -----------------------------------------------------------------------


def test_eval_sampling_picks_middle_frames() -> None:
    # segments [0,2) [2,5) [5,7) [7,10) -> centres 1, 3, 6, 8
    assert segment_indices(0, 10, 4, train=False) == [1, 3, 6, 8]
    assert segment_indices(5, 25, 4, train=False) == [7, 12, 17, 22]
    assert segment_indices(0, 16, 4, train=False) == [2, 6, 10, 14]
    assert segment_indices(3, 4, 1, train=False) == [3]


def test_train_sampling_stays_in_segments_and_varies() -> None:
    draws = set()
    for seed in range(30):
        idx = segment_indices(10, 50, 4, train=True, rng=random.Random(seed))
        assert all(10 + 10 * k <= i < 20 + 10 * k for k, i in enumerate(idx))
        assert idx == segment_indices(10, 50, 4, train=True, rng=random.Random(seed))
        draws.add(tuple(idx))
    assert len(draws) > 20
    firsts = {segment_indices(10, 50, 4, True, random.Random(s))[0] for s in range(200)}
    assert firsts == set(range(10, 20))  # every frame of a segment can be drawn


@pytest.mark.parametrize("train", [False, True])
def test_fewer_frames_than_samples_repeats_in_order(train: bool) -> None:
    rng = random.Random(0)
    assert segment_indices(10, 13, 8, train, rng) == [10, 10, 10, 11, 11, 11, 12, 12]
    assert segment_indices(5, 6, 4, train, rng) == [5, 5, 5, 5]
    with pytest.raises(ValueError):
        segment_indices(5, 5, 4, train, rng)


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_clip_shorter_than_num_frames(backend: str) -> None:
    data = encode(3, fps=10)
    dec = VideoClipDecoder(num_frames=8, train=False, backend=backend, size=16)
    frames, meta = dec(data)
    assert frames.shape == (8, 3, 16, 16)
    assert meta["indices"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert torch.equal(frames[0], frames[2]) and not torch.equal(frames[2], frames[3])


# --- resize and crop ------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_output_shape_and_dtype(clip25: bytes, backend: str, train: bool) -> None:
    dec = VideoClipDecoder(num_frames=4, train=train, backend=backend, size=16, resize_short=20)
    frames, meta = dec(clip25, 0.5, 2.5, rng=random.Random(1))
    assert frames.shape == (4, 3, 16, 16) and frames.dtype == torch.uint8
    assert frames.is_contiguous()
    assert len(meta["indices"]) == 4 and meta["fps"] == 25.0


def _crop_offset(crop: torch.Tensor, full: torch.Tensor) -> list[tuple[int, int]]:
    """All (top, left) where ``crop`` (3, s, s) equals a window of ``full`` (3, H, W)."""
    s = crop.shape[-1]
    return [
        (t, left)
        for t in range(full.shape[-2] - s + 1)
        for left in range(full.shape[-1] - s + 1)
        if torch.equal(full[:, t : t + s, left : left + s], crop)
    ]


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_same_crop_for_all_frames(clip_gop: bytes, backend: str) -> None:
    offsets = set()
    for seed in range(6):
        dec = VideoClipDecoder(num_frames=4, train=True, backend=backend, size=16, resize_short=H)
        frames, meta = dec(clip_gop, rng=random.Random(seed))  # 24 px short side: no resize
        full = read_frames(clip_gop, meta["indices"], backend)
        found = _crop_offset(frames[0], full[0])
        assert len(found) == 1
        top, left = found[0]
        assert torch.equal(frames, full[..., top : top + 16, left : left + 16])
        offsets.add((top, left))
    assert len(offsets) > 1  # the crop is random, just shared by the frames of a clip
    dec = VideoClipDecoder(num_frames=4, train=False, backend=backend, size=16, resize_short=H)
    frames, meta = dec(clip_gop)
    full = read_frames(clip_gop, meta["indices"], backend)
    assert torch.equal(frames, full[..., 4:20, 8:24])  # centre crop


@pytest.mark.parametrize("train", [False, True])
def test_resize_crop_shared_across_frames(train: bool) -> None:
    y, x = torch.meshgrid(torch.arange(30), torch.arange(40), indexing="ij")
    ramp = (20 + 2 * x + 3 * y).to(torch.uint8)  # 20..185, smooth: no bicubic overshoot
    frames = torch.stack([(ramp + 10 * t).expand(3, 30, 40) for t in range(4)])
    out = resize_crop(frames, short=20, size=16, train=train, rng=random.Random(5))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.uint8
    for t in range(4):  # a per-frame crop position would move the ramp
        assert max_diff(out[t], out[0].int() + 10 * t) <= 1


def test_decoder_pickles_and_validates(clip10: bytes) -> None:
    dec = VideoClipDecoder(num_frames=4, train=True, backend="pyav", size=16)
    copy = pickle.loads(pickle.dumps(dec))
    a, ma = dec(clip10, rng=random.Random(7))
    b, mb = copy(clip10, rng=random.Random(7))
    assert torch.equal(a, b) and ma == mb
    with pytest.raises(ValueError, match="backend"):
        VideoClipDecoder(backend="opencv")
    with pytest.raises(ValueError, match="resize_short"):
        VideoClipDecoder(size=224, resize_short=200)


# --- corrupt input --------------------------------------------------------------------------


def _no_frames_mp4() -> bytes:
    buf = io.BytesIO()
    c = av.open(buf, "w", format="mp4")
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    c.start_encoding()
    c.close()
    return buf.getvalue()


@pytest.fixture(scope="module")
def corrupt_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    good = encode(20, fps=10)
    faststart = encode(20, fps=10, path=tmp_path_factory.mktemp("video") / "fs.mp4")
    return {
        "garbage": b"definitely not a video" * 20,
        "empty": b"",
        "no_frames": _no_frames_mp4(),
        "truncated": good[: len(good) // 2],  # moov index at the end: lost
        "header_only": good[:200],
        "truncated_faststart": faststart[: len(faststart) * 6 // 10],  # index kept, data cut
    }


@pytest.mark.parametrize(
    "kind",
    ["garbage", "empty", "no_frames", "truncated", "header_only", "truncated_faststart"],
)
@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_corrupt_video_raises(corrupt_inputs: dict[str, bytes], kind: str, backend: str) -> None:
    data = corrupt_inputs[kind]
    if kind == "no_frames":
        assert len(data) > 0  # a real mp4 container, just without frames
    with pytest.raises(CorruptVideo, match=backend):
        probe(data, backend)
    with pytest.raises(CorruptVideo, match=backend):
        VideoClipDecoder(num_frames=2, backend=backend, size=16)(data)


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_corrupt_video_is_a_counted_skip(clip10: bytes, backend: str) -> None:
    dec = VideoClipDecoder(num_frames=2, train=False, backend=backend, size=16)
    samples = [
        {"__key__": "a", "mp4": clip10},
        {"__key__": "b", "mp4": b"\x00" * 64},
        {"__key__": "c", "mp4": clip10},
    ]
    handler = SkipCounter()
    out = list(map_skipping(samples, lambda s: dec(s["mp4"])[0], handler))
    assert len(out) == 2 and handler.total == 1
