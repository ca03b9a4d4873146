"""Audio clips from shard samples: decode, downmix, resample, crop, pad, normalise, bucket."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import torch

from mmpt.datamodules.decode import first_key
from mmpt.preprocess import AudioPreprocess

#: Audio extensions looked for in a sample, in order of preference.
AUDIO_EXTENSIONS = "flac;wav;mp3;ogg;opus;m4a"

_SOUNDFILE_EXTENSIONS = frozenset({"wav", "flac", "ogg"})

#: Integer PCM subtypes: libsndfile scales them into [-1, 1] (x / 2^(bits-1)), so clamping
#: their float samples changes nothing and is skipped (0.1 ms per 5 s at 44.1 kHz).
_PCM_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32"})


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int, bool]:
    """(C, N) float32, the rate, and whether samples may lie outside [-1, 1] (not int PCM)."""
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:  # what sf.read does, keeping the subtype
        array = f.read(dtype="float32", always_2d=True)
        return array.T, int(f.samplerate), f.subtype not in _PCM_SUBTYPES


def _frame_samples(frame: Any) -> np.ndarray:
    """One PyAV audio frame as float32 (C, n), planar or packed, integer or float."""
    array = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: (1, n * C), channels interleaved
        array = array.reshape(-1, frame.layout.nb_channels).T
    if np.issubdtype(array.dtype, np.unsignedinteger):  # u8: silence at 128
        half = (np.iinfo(array.dtype).max + 1) / 2
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float64) / -np.iinfo(array.dtype).min).astype(np.float32)
    return array.astype(np.float32, copy=False)


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream in the file")
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = []
        for frame in container.decode(stream):
            rate = frame.sample_rate
            chunks.append(_frame_samples(frame))
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), int(rate or 0)
    return np.concatenate(chunks, axis=1), int(rate)


class EmptyAudio(ValueError):
    """An audio file that decodes to no samples (a ``ValueError``)."""


def decode_audio(data: bytes, ext: str, *, fallback: bool = True) -> tuple[torch.Tensor, int]:
    """Decode an audio file's bytes.

    soundfile reads ``wav``/``flac``/``ogg``; PyAV reads ``mp3``/``m4a``/``opus`` and anything
    soundfile fails on (e.g. a wav holding a compressed codec).

    Args:
        data: Encoded file bytes.
        ext: The file's extension without the dot (``flac``, ``mp3`` ...), which picks the
            decoder.
        fallback: Let PyAV try a ``wav``/``flac``/``ogg`` that soundfile fails on; False
            raises soundfile's error instead (a broken file is reported, never guessed at).

    Returns:
        The waveform (C, N) float32 in [-1, 1] (zeros are ``+0.0``) and the file's sample
        rate in Hz.

    Raises:
        EmptyAudio: The file holds no samples. Decoder errors propagate (a counted skip).
    """
    unbounded = True
    if ext.lower() in _SOUNDFILE_EXTENSIONS:
        try:
            array, rate, unbounded = _decode_soundfile(data)
        except Exception:  # noqa: BLE001 - let PyAV try; its error is the one raised
            if not fallback:
                raise
            array, rate = _decode_av(data)
    else:
        array, rate = _decode_av(data)
    if array.shape[1] == 0:
        raise EmptyAudio(f"empty audio ({ext}, 0 samples)")
    wave = torch.from_numpy(np.ascontiguousarray(array))
    if unbounded:  # integer PCM is in [-1, 1] and has no -0.0 already
        wave.clamp_(-1.0, 1.0).add_(0.0)  # -0.0 + 0.0 == +0.0: see downmix
    return wave, rate


def downmix(wave: torch.Tensor) -> torch.Tensor:
    """``wave.mean(dim=0)``, bit for bit on :func:`decode_audio`'s output, but cheaper.

    A mean over a dim of size 1 still runs torch's reduction kernel into a new tensor (about
    0.3 ms for 5 s at 44.1 kHz on one thread, most of it allocating); mono is returned as a
    view instead. Stereo is ``(left + right) * 0.5``: the same rounded sum, halved exactly.
    The mean sums from +0, so it turns ``-0.0`` into ``+0.0``; ``decode_audio`` gives no
    ``-0.0``, so the two agree there (not on a wave holding ``-0.0``).

    Args:
        wave: (C, N) waveform from :func:`decode_audio`.

    Returns:
        (N,) mono waveform (a view of ``wave`` when C == 1).
    """
    if wave.shape[0] == 1:
        return wave[0]
    if wave.shape[0] == 2:
        return (wave[0] + wave[1]).mul_(0.5)
    return wave.mean(dim=0)


def resampled_length(n: int, orig_sr: int, new_sr: int) -> int:
    """Samples out of resampling ``n`` samples from ``orig_sr`` to ``new_sr`` (torchaudio's)."""
    return n if orig_sr == new_sr else math.ceil(new_sr * n / orig_sr)


class Resampler:
    """Band-limited resampling with one cached ``torchaudio`` kernel per rate pair. Picklable.

    The cache is rebuilt lazily in each worker (it is not pickled).
    """

    #: Extra input blocks read on each side of a window: more than the sinc kernel's reach.
    MARGIN_BLOCKS = 8

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], torch.nn.Module] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def __call__(self, wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
        """Resample (C, N) or (N,) ``wave`` from ``orig_sr`` to ``new_sr`` Hz (last dim)."""
        if orig_sr == new_sr:
            return wave
        module = self._cache.get((orig_sr, new_sr))
        if module is None:
            import torchaudio

            module = torchaudio.transforms.Resample(orig_sr, new_sr)
            self._cache[(orig_sr, new_sr)] = module
        return module(wave)

    def window(
        self, wave: torch.Tensor, orig_sr: int, new_sr: int, start: int, length: int
    ) -> torch.Tensor:
        """``self(wave, orig_sr, new_sr)[..., start:start + length]``, resampling only that.

        The polyphase kernel maps every block of ``orig/g`` input samples to ``new/g`` output
        samples (g = gcd), so resampling an input slice cut on block boundaries, with a margin
        wider than the kernel, gives exactly the matching output slice: long files cost only
        their crop.
        """
        if orig_sr == new_sr:
            return wave[..., start : start + length]
        g = math.gcd(orig_sr, new_sr)
        step_in, step_out = orig_sr // g, new_sr // g
        first = max(0, start // step_out - self.MARGIN_BLOCKS)
        last = -(-(start + length) // step_out) + self.MARGIN_BLOCKS
        out = self(wave[..., first * step_in : last * step_in], orig_sr, new_sr)
        offset = start - first * step_out
        return out[..., offset : offset + length]


class AudioReader:
    """Sample (or raw bytes) -> mono float32 clip (N,) at the model's rate, cropped. Picklable.

    A file at another sample rate is resampled (only the cropped window is computed).

    Args:
        pre: The model's audio preprocessing (rate, crop length, minimum length).
        train: Random crop window (True) or the first ``pre.max_samples`` (evaluation).
        audio_key: Audio extensions to look for, ``;``-separated; None: ``AUDIO_EXTENSIONS``.
        crop: Crop clips longer than ``pre.max_seconds``; False refuses them (a ``ValueError``,
            so a counted skip): a clip with a transcript cannot be cut.
    """

    def __init__(
        self, pre: AudioPreprocess, train: bool, audio_key: str | None = None, crop: bool = True
    ) -> None:
        self.pre, self.train, self.crop = pre, train, crop
        self.audio_key = audio_key or AUDIO_EXTENSIONS
        self.resample = Resampler()

    def __call__(self, sample: dict[str, Any]) -> torch.Tensor:
        """The clip (N,) of the sample's first present audio extension.

        Raises:
            MissingField: No audio extension of ``audio_key`` in the sample.
            ValueError: Empty, undecodable or shorter than ``pre.min_samples``.
        """
        ext = first_key(sample, self.audio_key)
        return self.read(sample[ext], ext)

    def read(self, data: bytes, ext: str) -> torch.Tensor:
        """Decode ``data`` (a file of type ``ext``) into the clip (N,), N <= ``pre.max_samples``.

        Raises:
            ValueError: Empty, undecodable or shorter than ``pre.min_samples``.
        """
        wave, rate = decode_audio(data, ext)
        mono = downmix(wave)
        n = resampled_length(mono.shape[0], rate, self.pre.sample_rate)
        if n < self.pre.min_samples:
            raise ValueError(
                f"audio too short: {n} samples at {self.pre.sample_rate} Hz, "
                f"min {self.pre.min_samples}"
            )
        if n > self.pre.max_samples and not self.crop:
            raise ValueError(
                f"audio longer than max_seconds {self.pre.max_seconds} (its transcript cannot be "
                "cropped; raise the tower's max_seconds)"
            )
        length = min(n, self.pre.max_samples)
        start = random.randrange(n - length + 1) if self.train else 0
        return self.resample.window(mono, rate, self.pre.sample_rate, start, length)


def pad_audio(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad clips to the longest.

    Args:
        clips: B mono clips, each (N_b,).

    Returns:
        ``audio`` (B, max N_b) float32, zero after each clip, and ``lengths`` (B,) long.
    """
    lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.long)
    audio = torch.zeros(len(clips), int(lengths.max()) if clips else 0, dtype=torch.float32)
    for row, clip in zip(audio, clips, strict=True):
        row[: clip.shape[0]] = clip
    return audio, lengths


def normalize_audio(audio: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Standardise each clip over its true length; padding becomes exactly 0.

    ``(x - mean) / sqrt(var + eps)`` with the population variance of ``x[:length]``, as
    Hugging Face's ``Wav2Vec2FeatureExtractor`` does with ``do_normalize``. Statistics are
    computed in float32 at least; the result has ``audio``'s dtype and device.

    Args:
        audio: (B, N) zero-padded clips.
        lengths: (B,) long, true length of each clip.
        eps: Added to the variance.

    Returns:
        (B, N) standardised clips.
    """
    work = audio if audio.dtype == torch.float64 else audio.float()
    steps = torch.arange(audio.shape[1], device=audio.device)
    mask = steps[None, :] < lengths.to(audio.device)[:, None]
    count = lengths.to(audio.device, work.dtype).clamp(min=1)[:, None]
    mean = torch.where(mask, work, 0).sum(dim=1, keepdim=True) / count
    centred = torch.where(mask, work - mean, 0)
    var = centred.square().sum(dim=1, keepdim=True) / count
    return (centred / torch.sqrt(var + eps)).to(audio.dtype)


class LengthBucketBatcher:
    """Batches of similar lengths, to cut padding. Picklable (a ``ShardStream`` batcher).

    Buffers ``batch_size * bucket_batches`` items, sorts them by length, cuts them into
    batches and yields those in a shuffled order (seeded by the buffer's lengths, so a run
    is reproducible). Every ``batch_size`` items make one batch, as plain batching does.

    A training stream that holds less than a buffer comes round again (it repeats passes to
    fill its quota); sorting would then put copies of a clip in one batch. With ``key``, an
    item whose key is already buffered is held back until its namesake has left in a batch,
    and ``batch_size`` held items cut the buffer early, so a batch never holds one sample
    twice (unless the stream has fewer distinct samples than ``batch_size``).

    Args:
        batch_size: Items per batch.
        length: Item -> its length (e.g. :func:`clip_length`); must be picklable.
        bucket_batches: Batches per sorted buffer.
        partial: Yield a last short batch at the end of the stream.
        key: Item -> its sample key (picklable), or None for no duplicate check.
    """

    #: Its last batches come from what it holds when the input ends (a partial buffer), so
    #: a ``ShardStream`` stops its input at the epoch's quota instead of decoding past it.
    reads_ahead = False

    def __init__(
        self,
        batch_size: int,
        length: Callable[[Any], int],
        bucket_batches: int = 16,
        partial: bool = True,
        key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        self.batch_size, self.length, self.key = batch_size, length, key
        self.bucket_batches, self.partial = max(1, bucket_batches), partial

    def _cut(self, buffer: list[Any], held: list[Any]) -> tuple[list[list[Any]], list[Any]]:
        """Shuffled full batches of the length-sorted buffer, and the rest (< batch_size).

        The rest is the newest items whose copies are not held, so held copies can follow.
        """
        waited = {self.key(x) for x in held} if self.key is not None and held else set()
        newest = range(len(buffer) - 1, -1, -1)
        rest = sorted(newest, key=lambda i: self.key(buffer[i]) in waited if waited else False)
        rest = rest[: len(buffer) % self.batch_size]
        lengths = [self.length(item) for item in buffer]
        order = sorted(set(range(len(buffer))) - set(rest), key=lengths.__getitem__)
        bs = self.batch_size
        batches = [[buffer[i] for i in order[s : s + bs]] for s in range(0, len(order), bs)]
        random.Random(hash(tuple(lengths))).shuffle(batches)
        return batches, [buffer[i] for i in sorted(rest, key=lengths.__getitem__)]

    def __call__(self, items: Iterator[Any]) -> Iterator[list[Any]]:
        """Batch ``items`` (lists of ``batch_size``; a last short one only if ``partial``)."""
        size = self.batch_size * self.bucket_batches
        buffer: list[Any] = []
        held: list[Any] = []  # copies of buffered samples, waiting for their original to leave
        keys: set[Hashable] = set()

        def admit(item: Any) -> None:
            k = None if self.key is None else self.key(item)
            if k is None:
                buffer.append(item)
            else:
                (held if k in keys else buffer).append(item)
                keys.add(k)

        def cut() -> Iterator[list[Any]]:
            nonlocal buffer, held, keys
            batches, buffer = self._cut(buffer, held)
            yield from batches
            if not batches:  # fewer distinct samples than a batch: repeats are unavoidable
                buffer, held = buffer + held, []
            keys = set() if self.key is None else {self.key(x) for x in buffer}
            pending, held = held, []
            for x in pending:
                admit(x)

        for item in items:
            admit(item)
            if len(buffer) >= size or len(held) >= self.batch_size:
                yield from cut()
        while held:  # the input ended (e.g. at the epoch's quota) with copies waiting
            yield from cut()
        batches, rest = self._cut(buffer, [])
        yield from batches
        if rest and self.partial:
            yield rest


def clip_length(item: tuple[torch.Tensor, ...]) -> int:
    """Samples in the clip of a decoded item whose first element is a (N,) waveform."""
    return int(item[0].shape[0])


__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioReader",
    "EmptyAudio",
    "LengthBucketBatcher",
    "Resampler",
    "clip_length",
    "decode_audio",
    "downmix",
    "normalize_audio",
    "pad_audio",
    "resampled_length",
]
