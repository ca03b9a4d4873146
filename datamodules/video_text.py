"""Video-text clips (EgoClip layout) from WebDataset shards as VideoTextBatch, with partners."""

from __future__ import annotations

import itertools
import json
import random
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from mmpt.batch import VideoTextBatch
from mmpt.datamodules.decode import MissingField, first_key, read_captions
from mmpt.datamodules.image_text import ImageTextDataModule, SyntheticData
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.video import VideoClipDecoder
from mmpt.preprocess import ImagePreprocess, Preprocess, Tokenizer


@dataclass
class VideoClip:
    """One decoded clip as it travels from the sample function to the collate.

    Attributes:
        video: uint8 frames (T, 3, S, S).
        captions: One narration (training) or all of them (evaluation).
        nouns: (num_nouns,) float multi-hot noun tags.
        verbs: (num_verbs,) float multi-hot verb tags.
        key: The sample's ``__key__``.
        video_uid: Source video (``json:video_uid``, else the key).
        start: Window start in seconds of the source video (``json:clip_start``), or None.
        end: Window end in seconds (``json:clip_end``), or None.
        clamped: The decoded window ran past the video and was clamped.
        role: ``anchor``, or for a partner row ``neighbour`` (same video) / ``fallback``.
    """

    video: torch.Tensor
    captions: list[str]
    nouns: torch.Tensor
    verbs: torch.Tensor
    key: str
    video_uid: str
    start: float | None = None
    end: float | None = None
    clamped: bool = False
    role: str = "anchor"


def multi_hot(ids: Any, size: int, name: str) -> torch.Tensor:
    """Tag ids -> float multi-hot (size,); a vocabulary of size 0 ignores the ids (no tags).

    Raises:
        ValueError: An id that is not an int in ``[0, size)`` (a counted skip upstream).
    """
    out = torch.zeros(size)
    if size == 0 or ids is None:
        return out
    for i in ids if isinstance(ids, list) else [ids]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(f"{name} id {i!r} outside the vocabulary of {size} {name}s")
        out[i] = 1.0
    return out


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


class VideoTextSample:
    """Raw sample dict -> :class:`VideoClip`. Picklable for workers; raising skips the sample.

    Args:
        decoder: Frame sampling, decoding and crop (train or eval settings).
        video_key: Video extensions, ``;``-separated.
        text_key: Narration field(s), e.g. ``txt;json:narration`` or ``json:narrations``.
        all_captions: Keep every narration (evaluation); else one at random.
        window: Decode only ``json:clip_start``..``json:clip_end`` (seconds) of the file.
        num_nouns: Noun vocabulary size for ``json:noun_ids``.
        num_verbs: Verb vocabulary size for ``json:verb_ids``.
    """

    def __init__(
        self,
        decoder: VideoClipDecoder,
        video_key: str,
        text_key: str,
        all_captions: bool,
        window: bool,
        num_nouns: int,
        num_verbs: int,
    ) -> None:
        self.decoder, self.video_key, self.text_key = decoder, video_key, text_key
        self.all_captions, self.window = all_captions, window
        self.num_nouns, self.num_verbs = num_nouns, num_verbs

    def __call__(self, sample: dict[str, Any]) -> VideoClip:
        """Decode one clip (CorruptVideo, bad tags or a missing field raise)."""
        meta = json.loads(sample["json"]) if "json" in sample else {}
        captions = read_captions(sample, self.text_key)
        if not self.all_captions:
            captions = [random.choice(captions)]
        start, end = _seconds(meta.get("clip_start")), _seconds(meta.get("clip_end"))
        if self.window and start is None and end is None:
            raise MissingField("window: true needs json:clip_start / json:clip_end")
        data = sample[first_key(sample, self.video_key)]
        video, info = self.decoder(data, *((start, end) if self.window else (None, None)))
        return VideoClip(
            video=video,
            captions=captions,
            nouns=multi_hot(meta.get("noun_ids"), self.num_nouns, "noun"),
            verbs=multi_hot(meta.get("verb_ids"), self.num_verbs, "verb"),
            key=sample["__key__"],
            video_uid=str(meta.get("video_uid", sample["__key__"])),
            start=start,
            end=end,
            clamped=bool(info["clamped"]),
        )


class SceneBatcher:
    """Clips -> batches of B anchors + B partners (EgoVLP scene-aware negatives). Picklable.

    Every batch takes exactly B new clips from the stream as anchors, in stream order, so
    batch counts and quotas are those of plain batching. Partner ``i`` (row ``B + i``) is a
    real extra training pair, not only a negative: a recent clip of the anchor's video whose
    window start is within ``window`` seconds of the anchor's (either start unknown: any
    clip of the video), other than the anchor; clips outside the batch and not yet picked
    are preferred (an anchor of the same batch repeats that row; with tags, EgoNCE's
    noun-and-verb overlap makes the repeat a positive). Without one, it is a clip of another
    video (role ``fallback``, counted in ``no_neighbour``). Candidates come from a
    per-worker cache of the last ``cache_size`` clips read, which also holds the next B
    clips (read one batch ahead), so the first batch of an epoch already has neighbours.
    Memory: ``cache_size`` decoded clips per worker; the lookahead decodes B clips past an
    epoch's quota.

    Args:
        batch_size: Anchors per batch (B).
        window: Largest distance in seconds between anchor and neighbour window starts.
        cache_size: Clips kept per worker.
    """

    def __init__(self, batch_size: int, window: float = 60.0, cache_size: int = 512) -> None:
        if batch_size < 1 or cache_size < 1 or window < 0:
            raise ValueError(
                f"need batch_size >= 1, cache_size >= 1, window >= 0; got {batch_size}, "
                f"{cache_size}, {window}"
            )
        self.batch_size, self.window, self.cache_size = batch_size, window, cache_size

    def __call__(self, items: Iterator[VideoClip]) -> Iterator[list[VideoClip]]:
        """Yield lists of 2B clips (anchors, then partners); a last short group is dropped."""
        items, b = iter(items), self.batch_size
        cache: OrderedDict[str, VideoClip] = OrderedDict()  # read order, oldest first
        by_video: dict[str, dict[str, VideoClip]] = {}
        ahead: deque[VideoClip] = deque()
        while True:
            for clip in itertools.islice(items, 2 * b - len(ahead)):
                ahead.append(clip)
                self._remember(clip, cache, by_video)
            if len(ahead) < b:
                return
            anchors = [ahead.popleft() for _ in range(b)]
            yield anchors + self.partners(anchors, list(cache.values()), by_video)

    def taken_keys(self, clips: list[VideoClip]) -> list[str]:
        """Keys a batch uses up: its anchors (a partner may still come as an anchor later)."""
        return [c.key for c in clips if c.role == "anchor"]

    def _remember(
        self, clip: VideoClip, cache: OrderedDict, by_video: dict[str, dict[str, VideoClip]]
    ) -> None:
        if clip.key in cache:  # the same sample again (a topped-up pass): keep the newest
            del by_video[cache.pop(clip.key).video_uid][clip.key]
        cache[clip.key] = clip
        by_video.setdefault(clip.video_uid, {})[clip.key] = clip
        while len(cache) > self.cache_size:
            old = cache.popitem(last=False)[1]
            del by_video[old.video_uid][old.key]
            if not by_video[old.video_uid]:
                del by_video[old.video_uid]

    def _near(self, anchor: VideoClip, clip: VideoClip) -> bool:
        if clip.key == anchor.key:
            return False
        if anchor.start is None or clip.start is None:
            return True
        return abs(clip.start - anchor.start) <= self.window

    def partners(
        self,
        anchors: list[VideoClip],
        cached: list[VideoClip],
        by_video: dict[str, dict[str, VideoClip]],
    ) -> list[VideoClip]:
        """One partner per anchor (see the class docstring), with its ``role`` set."""
        taken = {a.key for a in anchors}
        out = []
        for a in anchors:
            near = [c for c in by_video.get(a.video_uid, {}).values() if self._near(a, c)]
            pick, role = _choose(near, taken), "neighbour"
            if pick is None:
                role = "fallback"
                others = [c for c in cached if c.video_uid != a.video_uid]
                pick = _choose(others or [c for c in cached if c.key != a.key], taken) or a
            taken.add(pick.key)
            out.append(replace(pick, role=role))
        return out


def _choose(candidates: list[VideoClip], taken: set[str]) -> VideoClip | None:
    """A random candidate, preferring those whose key is not in ``taken``; None if none."""
    fresh = [c for c in candidates if c.key not in taken]
    pool = fresh or candidates
    return random.choice(pool) if pool else None


class VideoTextCollate:
    """Stack clips and tokenize all their narrations in one call. Picklable."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, clips: list[VideoClip]) -> VideoTextBatch:
        """Clips (anchors, then any partners) -> :class:`VideoTextBatch` (N = len(clips))."""
        texts = [t for c in clips for t in c.captions]
        owner = [i for i, c in enumerate(clips) for _ in c.captions]
        return VideoTextBatch(
            videos=torch.stack([c.video for c in clips]),
            text_tokens=self.tokenizer(texts),
            text_to_video=torch.tensor(owner, dtype=torch.long),
            nouns=torch.stack([c.nouns for c in clips]),
            verbs=torch.stack([c.verbs for c in clips]),
            keys=[c.key for c in clips],
            video_uids=[c.video_uid for c in clips],
            clamped=sum(c.clamped for c in clips if c.role == "anchor"),
            no_neighbour=sum(c.role == "fallback" for c in clips),
        )


class VideoTextDataModule(ImageTextDataModule):
    """Video-text shards (``mp4`` + narration + EgoClip-like ``json``) -> VideoTextBatch.

    Streams, mixing, workers, synthetic data and the train/val/test splits work as in
    :class:`ImageTextDataModule`; frames are decoded in the workers and normalised per batch
    on the device. Training with ``scene_negatives`` yields exactly 2B rows a step (B =
    ``batch_size``): B anchors, then per anchor a partner clip of the same video (EgoVLP
    scene-aware negatives, see :class:`SceneBatcher`). A partner is a real extra training
    pair with its own narration and tags, not only a negative. Every DDP rank holds the same
    row count (the EgoNCE gather needs it); plain-mode epochs and quotas count anchors (each
    clip is an anchor exactly once an epoch), and resampled ``epoch_samples`` counts anchors
    too. Evaluation batches hold every narration of ``val_text_key`` per clip, no partners.

    Args:
        num_frames: Frames per training clip (one random frame per equal segment).
        eval_num_frames: Frames per evaluation clip (segment middles, centre crop).
        backend: ``decord`` or ``pyav``.
        video_key: Video extensions, ``;``-separated.
        text_key: Narration field for training (one picked at random from a list).
        val_text_key: Narration field for evaluation (e.g. ``json:narrations``); default
            ``text_key``.
        window: Decode ``json:clip_start``..``json:clip_end`` seconds of a longer video
            (clamped and counted past its end); False: the whole file is the clip.
        num_nouns: Noun vocabulary for ``json:noun_ids``; default the length of ``nouns`` in
            the train index meta (0 when absent: no tags). An id outside it skips the sample.
        num_verbs: Verb vocabulary for ``json:verb_ids`` (as ``num_nouns``, from ``verbs``).
        scene_negatives: Add a same-video partner per anchor in training.
        neighbour_window: Seconds between anchor and partner window starts.
        neighbour_cache: Recent clips each worker keeps as partner candidates.
        resize_short: Short side before cropping; None: the model's image size.

    The other arguments are :class:`ImageTextDataModule`'s (``train``, ``val``, ``test``,
    ``batch_size``, ``val_batch_size``, ``num_workers``, ``seed``, ``synthetic``,
    ``preprocess``, ``eval_sets``, ``max_skipped_fraction``).
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        num_frames: int = 4,
        eval_num_frames: int = 16,
        backend: str = "decord",
        video_key: str = "mp4;avi;mkv;webm",
        text_key: str = "txt;json:narration",
        val_text_key: str | None = None,
        window: bool = False,
        num_nouns: int | None = None,
        num_verbs: int | None = None,
        scene_negatives: bool = True,
        neighbour_window: float = 60.0,
        neighbour_cache: int = 512,
        resize_short: int | None = None,
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: Preprocess | None = None,
        eval_sets: dict[str, StreamConfig] | None = None,
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    ) -> None:
        super().__init__(
            train=train,
            val=val,
            test=test,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            image_key=video_key,
            text_key=text_key,
            val_text_key=val_text_key,
            label_key=None,
            seed=seed,
            synthetic=synthetic,
            preprocess=preprocess,
            eval_sets=eval_sets,
            max_skipped_fraction=max_skipped_fraction,
        )
        self.num_frames, self.eval_num_frames, self.backend = num_frames, eval_num_frames, backend
        self.video_key, self.window, self.resize_short = video_key, window, resize_short
        self.num_nouns, self.num_verbs = num_nouns, num_verbs
        self.scene_negatives, self.neighbour_window = scene_negatives, neighbour_window
        self.neighbour_cache = neighbour_cache
        self._tag_meta: dict | None = None  # the train index meta, once the train stream exists

    def tag_sizes(self, meta: dict) -> tuple[int, int]:
        """(num_nouns, num_verbs): the explicit values, else the lengths in ``meta``."""
        nouns = self.num_nouns if self.num_nouns is not None else len(meta.get("nouns") or [])
        verbs = self.num_verbs if self.num_verbs is not None else len(meta.get("verbs") or [])
        return nouns, verbs

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (also used by ``mmpt eval`` on arbitrary shards)."""
        pre = self.preprocess or Preprocess()
        if pre.tokenizer is None or pre.image is None:
            raise ValueError(
                "the model gives no tokenizer/image preprocessing: VideoTextDataModule needs a "
                "model with a video and a text tower (data.preprocess is linked from the model)"
            )
        sources = config.sources(field)
        if train:
            self._tag_meta = sources[0].meta
        meta = self._tag_meta if self._tag_meta is not None else sources[0].meta
        decoder = VideoClipDecoder(
            num_frames=self.num_frames if train else self.eval_num_frames,
            train=train,
            backend=self.backend,
            size=pre.image.size,
            resize_short=self.resize_short,
        )
        num_nouns, num_verbs = self.tag_sizes(meta)
        text_key = self.text_key if train else self.val_text_key
        sample_fn = VideoTextSample(
            decoder, self.video_key, text_key, not train, self.window, num_nouns, num_verbs
        )
        scene = train and self.scene_negatives
        batch_size = self.batch_size if train else self.val_batch_size
        rank, world = self._world()
        return ShardStream(
            sources,
            config,
            sample_fn,
            VideoTextCollate(pre.tokenizer),
            batch_size=batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            batcher=SceneBatcher(batch_size, self.neighbour_window, self.neighbour_cache)
            if scene
            else None,
            batcher_exact=scene,
        )

    def normalize(self, batch: VideoTextBatch) -> VideoTextBatch:  # type: ignore[override]
        """uint8 videos (N, T, 3, S, S) -> normalised float32, with the model's mean and std."""
        pre = (self.preprocess or Preprocess()).image or ImagePreprocess()
        shape = batch.videos.shape
        batch.videos = normalize_images(batch.videos.flatten(0, 1), pre.mean, pre.std).view(shape)
        return batch


__all__ = [
    "SceneBatcher",
    "VideoClip",
    "VideoTextCollate",
    "VideoTextDataModule",
    "VideoTextSample",
    "multi_hot",
]
