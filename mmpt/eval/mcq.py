"""EgoMCQ evaluation: read multiple-choice shards, score 5 clips per query, accuracy + plot.

Differences from EgoVLP's reference metric (``egomcq_accuracy_metrics`` in EgoVLP's
``model/metric.py``), on purpose and tested:

- **Tie rule.** EgoVLP predicts ``torch.argmax(scores)``, which on tied scores picks the
  first (lowest-index) candidate, so a model with constant scores scores the share of answers
  at index 0. mmpt counts a query as correct only when its answer scores strictly higher than
  every other candidate (:func:`~mmpt.eval.video_metrics.egomcq_accuracy`): ties and NaN are
  misses. Without ties both rules give the same accuracy.
- **Type names.** EgoVLP zips ``torch.unique(types)`` (sorted ids) with
  ``["Intra-video", "Inter-video"]``, so there the smaller type id is named "Intra-video",
  whatever the annotation meant. mmpt takes the id -> name mapping explicitly
  (``--type-names`` or the index's ``meta.mcq_types``); :func:`egovlp_type_names` builds
  EgoVLP's mapping, to reproduce its published inter/intra numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mmpt.datamodules.decode import MissingField, read_field
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.video import VideoClipDecoder
from mmpt.eval.report import new_figure, save_figure
from mmpt.eval.video_metrics import EGOMCQ_GROUPS, egomcq_accuracy
from mmpt.preprocess import ImagePreprocess, Tokenizer

NUM_CANDIDATES = 5


class VideoTextModel(Protocol):
    """What EgoMCQ needs of a model (e.g. :class:`~mmpt.models.video_text.VideoTextModule`)."""

    def encode_video(self, videos: Tensor) -> Tensor:
        """(N, T, C, H, W) normalised frames -> (N, D) L2-normalised embeddings."""
        ...

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(M, L) token ids -> (M, D) L2-normalised embeddings."""
        ...


@dataclass
class MCQBatch:
    """A collated batch of multiple-choice questions.

    Attributes:
        videos: uint8 (Q, C, T, 3, H, W), the C candidate clips of every query.
        text_tokens: Long (Q, L), the tokenized query narrations.
        answers: Long (Q,), index of the correct candidate.
        types: Long (Q,), question type id (mapped to inter/intra by the caller).
        keys: ``__key__`` of every question.
        skipped: Questions dropped (corrupt or incomplete) since the previous batch.
    """

    videos: Tensor
    text_tokens: Tensor
    answers: Tensor
    types: Tensor
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.videos.shape[0]


class MCQSampleDecoder:
    """Raw MCQ sample -> ``(clips, query, answer, type, key)``; picklable for workers.

    A sample holds ``0.mp4`` ... ``{C-1}.mp4``, the query in ``txt`` (or ``json`` ``query``)
    and ``json`` ``answer`` and ``type``. An undecodable clip or a missing field raises,
    which the stream counts as a skipped question.

    Args:
        decoder: Clip decoder (evaluation mode: middle frames, centre crop).
        num_candidates: Clips per question C.
        text_key: Where the query is (see :func:`mmpt.datamodules.decode.read_field`).
    """

    def __init__(
        self,
        decoder: VideoClipDecoder,
        num_candidates: int = NUM_CANDIDATES,
        text_key: str = "txt;json:query",
    ) -> None:
        self.decoder, self.num_candidates, self.text_key = decoder, num_candidates, text_key

    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, str, int, int, str]:
        """Decode one question: clips uint8 (C, T, 3, H, W), query, answer, type, key."""
        clips = []
        for j in range(self.num_candidates):
            if f"{j}.mp4" not in sample:
                raise MissingField(f"no candidate clip {j}.mp4 in sample")
            clips.append(self.decoder(sample[f"{j}.mp4"])[0])
        query = read_field(sample, self.text_key)
        answer, qtype = read_field(sample, "json:answer"), read_field(sample, "json:type")
        if not 0 <= int(answer) < self.num_candidates:
            raise ValueError(f"answer {answer} outside [0, {self.num_candidates})")
        return torch.stack(clips), str(query), int(answer), int(qtype), sample["__key__"]


class MCQCollate:
    """Stack decoded questions into an :class:`MCQBatch`, tokenizing the queries."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Tensor, str, int, int, str]]) -> MCQBatch:
        """Collate ``(clips, query, answer, type, key)`` items."""
        clips, queries, answers, types, keys = zip(*items, strict=True)
        return MCQBatch(
            videos=torch.stack(clips),
            text_tokens=self.tokenizer(list(queries)),
            answers=torch.tensor(answers, dtype=torch.long),
            types=torch.tensor(types, dtype=torch.long),
            keys=list(keys),
        )


def mcq_stream(
    data: str,
    tokenizer: Tokenizer,
    image: ImagePreprocess,
    num_frames: int = 16,
    backend: str = "decord",
    batch_size: int = 8,
) -> ShardStream:
    """One ordered pass over EgoMCQ shards, in batches of questions.

    Args:
        data: Shard source (folder, file, pattern or URL).
        tokenizer: The model's tokenizer.
        image: The model's frame size (and normalisation, applied later on the device).
        num_frames: Frames per clip (16 at EgoVLP evaluation).
        backend: ``"decord"`` or ``"pyav"``.
        batch_size: Questions per batch (each holds C clips of ``num_frames`` frames).

    Returns:
        The stream; ``stream.sources[0].meta`` is the index meta (``mcq_types``).
    """
    config = StreamConfig(urls=data, shuffle_buffer=0, shuffle_shards=False)
    decoder = VideoClipDecoder(num_frames, train=False, backend=backend, size=image.size)
    return ShardStream(
        config.sources("--data"),
        config,
        MCQSampleDecoder(decoder),
        MCQCollate(tokenizer),
        batch_size=batch_size,
        partial=True,
    )


def parse_type_names(type_names: str | Mapping[Any, str] | None, meta: dict) -> dict[int, str]:
    """The question type id -> ``"inter"``/``"intra"`` mapping, given or from the index meta.

    Args:
        type_names: JSON text or a mapping, e.g. ``{"1": "inter", "2": "intra"}``; None to
            use ``meta["mcq_types"]``.
        meta: The shards' index meta.

    Raises:
        ValueError: Neither is given, or the mapping is malformed.
    """
    if isinstance(type_names, str):
        try:
            type_names = json.loads(type_names)
        except json.JSONDecodeError as e:
            raise ValueError(f"--type-names is not JSON: {e}") from e
    mapping = type_names if type_names is not None else meta.get("mcq_types")
    if not mapping:
        raise ValueError(
            "no EgoMCQ type mapping: the shards' index.json has no meta.mcq_types; pass "
            """--type-names '{"1": "inter", "2": "intra"}' (check it against your annotations)"""
        )
    if not isinstance(mapping, Mapping):
        raise ValueError(f"the type mapping must be a JSON object, got {mapping!r}")
    try:
        out = {int(k): str(v) for k, v in mapping.items()}
    except ValueError as e:
        raise ValueError(f"type ids must be integers, got {list(mapping)}") from e
    if not set(out.values()) <= set(EGOMCQ_GROUPS):
        raise ValueError(f"type names must be among {EGOMCQ_GROUPS}, got {out}")
    return out


def egovlp_type_names(type_ids: Iterable[int]) -> dict[int, str]:
    """EgoVLP's id -> name assignment: the smaller of the two type ids is "intra".

    Args:
        type_ids: The question type ids present in the data (two distinct values).

    Returns:
        ``{smaller: "intra", larger: "inter"}``, as EgoVLP's reference metric names them.

    Raises:
        ValueError: The data does not have exactly two distinct type ids.
    """
    ids = sorted({int(i) for i in type_ids})
    if len(ids) != 2:
        raise ValueError(f"EgoMCQ has two question types, got type ids {ids}")
    return {ids[0]: "intra", ids[1]: "inter"}


@torch.no_grad()
def mcq_scores(model: VideoTextModel, videos: Tensor, text_tokens: Tensor) -> Tensor:
    """Cosine similarity of every query with each of its candidate clips.

    Args:
        model: Has ``encode_video`` and ``encode_text`` (normalised embeddings).
        videos: Normalised float (Q, C, T, 3, H, W) candidate clips.
        text_tokens: Long (Q, L) query tokens.

    Returns:
        Float (Q, C) scores.
    """
    q, c = videos.shape[:2]
    vid = model.encode_video(videos.flatten(0, 1)).float().view(q, c, -1)  # (Q, C, D)
    txt = model.encode_text(text_tokens).float()  # (Q, D)
    return torch.einsum("qd,qcd->qc", txt, vid)


@dataclass
class MCQResult:
    """Accuracy metrics and the raw per-question results.

    Attributes:
        metrics: :func:`~mmpt.eval.video_metrics.egomcq_accuracy` output plus ``skipped``.
        scores: Float (Q, C) scores of the questions evaluated.
        answers: Long (Q,).
        types: Long (Q,).
        keys: ``__key__`` of every question evaluated.
    """

    metrics: dict[str, float | int]
    scores: Tensor
    answers: Tensor
    types: Tensor
    keys: list[str]


def evaluate_mcq(
    model: VideoTextModel,
    batches: Iterable[MCQBatch],
    type_names: Mapping[int, str],
    image: ImagePreprocess,
    device: torch.device | str = "cpu",
    on_batch: Callable[[], None] | None = None,
) -> MCQResult:
    """Score every question and compute EgoMCQ accuracy.

    Args:
        model: Has ``encode_video`` and ``encode_text``; already on ``device`` in eval mode.
        batches: :class:`MCQBatch` items with uint8 (or normalised float) videos.
        type_names: Type id -> ``"inter"`` / ``"intra"``.
        image: Normalisation (mean, std) of the model's frames.
        device: Where to run the model.
        on_batch: Optional callable run after every batch (progress bars).

    Returns:
        The metrics (accuracies in [0, 1], counts, ``skipped`` questions) and the scores.

    Raises:
        ValueError: No question could be evaluated, or a type id is not mapped.
    """
    scores, answers, types, keys, skipped = [], [], [], [], 0
    for batch in batches:
        skipped += batch.skipped
        frames = batch.videos.to(device)
        q, c, t = frames.shape[:3]
        frames = normalize_images(frames.flatten(0, 2), image.mean, image.std)
        frames = frames.view(q, c, t, *frames.shape[1:])  # (Q, C, T, 3, H, W)
        scores.append(mcq_scores(model, frames, batch.text_tokens.to(device)).cpu())
        answers.append(batch.answers)
        types.append(batch.types)
        keys += batch.keys
        if on_batch is not None:
            on_batch()
    if not scores:
        raise ValueError(f"no EgoMCQ question could be evaluated ({skipped} skipped)")
    result = MCQResult({}, torch.cat(scores), torch.cat(answers), torch.cat(types), keys)
    result.metrics = egomcq_accuracy(result.scores, result.answers, result.types, type_names)
    result.metrics["skipped"] = skipped
    return result


def plot_mcq_accuracy(
    metrics: Mapping[str, float | int], path: str | Path, chance: float = 1 / NUM_CANDIDATES
) -> Path:
    """Bar plot of inter-video, intra-video and overall accuracy with the chance line.

    Args:
        metrics: :func:`~mmpt.eval.video_metrics.egomcq_accuracy` output.
        path: Output PNG.
        chance: Accuracy of a random guess (1/5 in EgoMCQ).

    Returns:
        The path written.
    """
    bars = [
        ("inter-video", "inter_video_acc", "inter_video_count"),
        ("intra-video", "intra_video_acc", "intra_video_count"),
        ("overall", "overall_acc", "count"),
    ]
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    values = [float(metrics[k]) * 100 for _, k, _ in bars]
    shown = [0.0 if v != v else v for v in values]  # a type without questions: NaN -> 0
    rects = ax.bar([b[0] for b in bars], shown, color=["tab:blue", "tab:orange", "tab:green"])
    for rect, value, (_, _, count) in zip(rects, values, bars, strict=True):
        label = "n/a" if value != value else f"{value:.1f}%"
        ax.annotate(
            f"{label}\n(n={metrics[count]})",
            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
            ha="center",
            va="bottom",
        )
    ax.axhline(chance * 100, color="grey", linestyle="--", label=f"chance {chance * 100:.0f}%")
    ax.set(ylabel="accuracy (%)", ylim=(0, 115), title="EgoMCQ accuracy")
    ax.legend(loc="upper right")
    return save_figure(fig, path)
