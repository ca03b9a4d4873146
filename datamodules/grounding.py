"""Phrase-grounding shards (image + caption + ``json:boxes`` + ``json:phrases``) as GroundingBatch.

A sample's ``json`` holds ``caption``, ``boxes`` (normalised ``[x0, y0, x1, y1]`` in [0, 1])
and ``phrases``: ``[{"spans": [[start, end], ...], "boxes": [i, ...]}]``, character spans of
the caption naming boxes by index (``mmpt data build --kind grounding``, ``mmpt data synth
--kind grounding``). Images are resized to the model's square size without cropping (boxes are
normalised, so they stay right); there are no flips (captions say left and right).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmpt.batch import GroundingBatch
from mmpt.datamodules.decode import decode_image, first_key
from mmpt.datamodules.shard_datamodule import ShardDataModule
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.synthetic import SyntheticData
from mmpt.datamodules.transforms import normalize_for
from mmpt.preprocess import ImagePreprocess, Preprocess

RGB_KEYS = "jpg;jpeg;png;webp"


def span_tokens(offsets: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """(L,) bool: tokens overlapping any character span ``[start, end)``.

    Args:
        offsets: (L, 2) character offsets of the tokens; special and pad tokens are (0, 0).
        spans: ``[[start, end], ...]``.

    """
    start, end = offsets[:, 0], offsets[:, 1]
    real = end > start
    hit = torch.zeros(len(offsets), dtype=torch.bool)
    for s, e in spans:
        hit |= real & (start < e) & (end > s)
    return hit


def read_boxes(info: dict[str, Any]) -> torch.Tensor:
    """(G, 4) boxes of a sample's json, checked.

    Raises:
        ValueError: A box is not 4 numbers with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1.

    """
    boxes = torch.as_tensor(info["boxes"], dtype=torch.float32).reshape(-1, 4)
    ok = (
        (boxes[:, :2] >= 0).all(1)
        & (boxes[:, 2:] <= 1).all(1)
        & (boxes[:, 2:] > boxes[:, :2]).all(1)
    )
    if not bool(ok.all()):
        raise ValueError(f"json:boxes must be normalised [x0, y0, x1, y1] in [0, 1]: {boxes[~ok]}")
    return boxes


class GroundingSample:
    """Raw sample -> image, token ids, boxes and phrases. Picklable for workers.

    Returns (from a call) the image (3, S, S) uint8, ids (L,), boxes (G, 4), phrase tokens
    (P, L) bool, phrase boxes (P, G) bool and the key; the tokenizer loads on first use.

    Args:
        size: Square image side S.
        tokenizer_path: Folder of the text tower's Hugging Face (fast) tokenizer.
        context_length: Token row length L.
        image_key: Image extensions, ``;``-separated.

    """

    def __init__(
        self, size: int, tokenizer_path: str, context_length: int, image_key: str = RGB_KEYS
    ) -> None:
        self.size, self.path, self.length, self.image_key = (
            size,
            tokenizer_path,
            context_length,
            image_key,
        )
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def tokenize(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) ids and (L, 2) character offsets of a caption."""
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        out = self._tok(
            caption,
            padding="max_length",
            truncation=True,
            max_length=self.length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        return out["input_ids"][0].long(), out["offset_mapping"][0].long()

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, ...]:
        """Decode one sample; raises (so it is skipped and counted) on a bad field."""
        raw = sample["json"]
        info = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        caption = str(info["caption"])
        image = decode_image(sample[first_key(sample, self.image_key)], self.size)
        image = image.resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        ids, offsets = self.tokenize(caption)
        boxes = read_boxes(info)
        tokens, named = [], []
        for phrase in info["phrases"]:
            mask = span_tokens(offsets, phrase["spans"])
            which = [int(i) for i in phrase["boxes"] if 0 <= int(i) < len(boxes)]
            if mask.any() and which:  # a phrase cut off by truncation names nothing
                tokens.append(mask)
                named.append(
                    torch.zeros(len(boxes), dtype=torch.bool).index_fill_(
                        0, torch.tensor(which), True
                    )
                )
        if not tokens:
            raise ValueError("no phrase of the caption names a box")
        return pixels, ids, boxes, torch.stack(tokens), torch.stack(named), sample["__key__"]


def _pad(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros((len(parts), *shape), dtype=dtype)
    for i, p in enumerate(parts):
        out[(i, *(slice(0, n) for n in p.shape))] = p
    return out


def collate_grounding(items: list[tuple[Any, ...]]) -> GroundingBatch:
    """Stack images and ids; pad boxes to the batch's largest G and phrases to its largest P."""
    g = max(len(it[2]) for it in items)
    p = max(len(it[3]) for it in items)
    length = items[0][1].shape[0]
    boxes = [it[2] for it in items]
    return GroundingBatch(
        images=torch.stack([it[0] for it in items]),
        text_tokens=torch.stack([it[1] for it in items]),
        boxes=_pad(boxes, (g, 4), torch.float32),
        box_mask=_pad([torch.ones(len(b), dtype=torch.bool) for b in boxes], (g,), torch.bool),
        phrase_tokens=_pad([it[3] for it in items], (p, length), torch.bool),
        phrase_boxes=_pad([it[4] for it in items], (p, g), torch.bool),
        phrase_mask=_pad(
            [torch.ones(len(it[3]), dtype=torch.bool) for it in items], (p,), torch.bool
        ),
        keys=[it[5] for it in items],
    )


class GroundingDataModule(ShardDataModule):
    """Grounding shards -> :class:`~mmpt.batch.GroundingBatch` (FIBER fine-grained stage).

    Args:
        train: Training stream.
        val: Validation stream.
        test: Test stream (``mmpt test``).
        batch_size: Samples per batch per rank.
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        image_key: Image extensions, ``;``-separated.
        seed: Base seed of shard order and shuffles.
        synthetic: Synthetic set(s) to generate first when missing.
        preprocess: Filled by the CLI from the model (image size, tokenizer).
        max_skipped_fraction: Unreadable shards an epoch may lose before the run stops.

    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        image_key: str = RGB_KEYS,
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: Preprocess | None = None,
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    ) -> None:
        super().__init__(
            train,
            val,
            test,
            batch_size,
            val_batch_size,
            num_workers,
            seed,
            synthetic,
            preprocess,
            max_skipped_fraction=max_skipped_fraction,
        )
        self.image_key = image_key

    def required_fields(self, meta: dict) -> dict[str, str]:
        """The caption, boxes and phrases of the json part (grounding shards)."""
        return {name: name for name in ("json:caption", "json:boxes", "json:phrases")}

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split."""
        pre = self.preprocess or Preprocess()
        path = getattr(pre.tokenizer, "path", None)
        if pre.image is None or path is None:
            raise ValueError(
                "GroundingDataModule needs a model with an image tower and a Hugging Face text "
                "tower (HFTextTower: character offsets come from its fast tokenizer)"
            )
        sample_fn = GroundingSample(
            pre.image.size, path, pre.tokenizer.context_length, self.image_key
        )
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
            config,
            sample_fn,
            collate_grounding,
            batch_size=self.batch_size if train else self.val_batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def normalize(self, batch: GroundingBatch) -> GroundingBatch:
        """uint8 pixels -> ``(x / 255 - mean) / std`` float32 on the device."""
        pre = (self.preprocess or Preprocess()).image or ImagePreprocess()
        batch.images = normalize_for(batch.images, pre)
        return batch
