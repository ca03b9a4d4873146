"""Image-text pairs from WebDataset shards (img2dataset / open_clip layout) as ImageTextBatch.

Images are RGB (``jpg``, ``png`` ...) or multispectral tiles (``npy``, ``tif``, see
:mod:`mmpt.datamodules.tiles`), whichever the model's preprocessing takes. The split/stream/
loader plumbing shared with the other shard datamodules is
:class:`~mmpt.datamodules.shard_datamodule.ShardDataModule` (re-exported here).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch

from mmpt.batch import ImageTextBatch
from mmpt.datamodules.decode import read_captions, read_class
from mmpt.datamodules.shard_datamodule import ShardDataModule
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.synthetic import SyntheticData
from mmpt.datamodules.transforms import ImageReader, normalize_for
from mmpt.preprocess import ImagePreprocess, Preprocess, Tokenizer

log = logging.getLogger("mmpt.data")

__all__ = ["ImageTextCollate", "ImageTextDataModule", "ImageTextSample", "ShardDataModule"]


class ImageTextSample:
    """Raw sample dict -> (image (C,H,W), captions, label, key). Picklable for workers.

    Args:
        read_image: Sample -> image tensor (:class:`~mmpt.datamodules.transforms.ImageReader`:
            uint8 RGB or float32 tile).
        text_key: Caption field(s), see :func:`~mmpt.datamodules.decode.read_field`.
        label_key: Class field (an id, or a name), None for none.
        all_captions: Keep every caption (evaluation) instead of one at random (training).
        classnames: Class names in id order: a label that is a name becomes its id (a name not
            in the list skips the sample). None: names stay names (see ``label_names``).
    """

    def __init__(
        self,
        read_image: Callable[[dict[str, Any]], torch.Tensor],
        text_key: str,
        label_key: str | None,
        all_captions: bool,
        classnames: list[str] | None = None,
    ) -> None:
        self.read_image, self.text_key = read_image, text_key
        self.label_key, self.all_captions = label_key, all_captions
        self.class_ids = None if classnames is None else {c: i for i, c in enumerate(classnames)}

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[str], int | str, str]:
        """Decode one sample; raises (and so is skipped and counted) when a field is bad."""
        captions = read_captions(sample, self.text_key)
        if not self.all_captions:
            captions = [random.choice(captions)]
        label = read_class(sample, self.label_key)
        if isinstance(label, str) and self.class_ids is not None:
            if label not in self.class_ids:
                raise ValueError(f"class {label!r} is not one of the {len(self.class_ids)} names")
            label = self.class_ids[label]
        image = self.read_image(sample)
        return image, captions, label, sample["__key__"]


class ImageTextCollate:
    """Stack images and tokenize all captions of a batch in one call."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self, items: list[tuple[torch.Tensor, list[str], int | str, str]]
    ) -> ImageTextBatch:
        """Collate decoded samples into one batch (captions flattened, see ImageTextBatch)."""
        texts = [c for _, caps, _, _ in items for c in caps]
        owner = [i for i, (_, caps, _, _) in enumerate(items) for _ in caps]
        labels = [it[2] for it in items]
        named = any(isinstance(label, str) for label in labels)
        return ImageTextBatch(
            images=torch.stack([it[0] for it in items]),
            text_tokens=self.tokenizer(texts),
            text_to_image=torch.tensor(owner, dtype=torch.long),
            keys=[it[3] for it in items],
            labels=torch.tensor(
                [-1 if isinstance(x, str) else x for x in labels], dtype=torch.long
            ),
            label_names=[x if isinstance(x, str) else "" for x in labels] if named else None,
        )


class ImageTextDataModule(ShardDataModule):
    """Image-text shards -> :class:`~mmpt.batch.ImageTextBatch`.

    RGB images (uint8 in the batch) or, for a model whose preprocessing names ``bands``,
    multispectral tiles (float32 raw values, bands matched by name; remote-sensing image-text
    pairs with json ``caption``).

    Args:
        train: Training stream (sources, mixing, epoch size).
        val: Validation stream; every caption of an image is kept when ``val_text_key`` lists
            several (retrieval with several captions per image).
        test: Test stream for ``mmpt test`` and ``mmpt predict`` (read like ``val``; predict
            falls back to ``val`` when no test stream is set).
        batch_size: Samples per batch per rank (the global batch is this x world size).
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes (decode happens there).
        image_key: Image extensions to look for, ``;``-separated; None: ``jpg;jpeg;png;webp``
            for RGB models, ``npy;tif;tiff`` for multispectral ones.
        text_key: Caption field: ``txt`` or ``json:<field>``; alternatives ``;``-separated.
        val_text_key: Caption field for validation (e.g. ``json:captions``); default text_key.
        label_key: Class id field for zero-shot classification, None for none.
        seed: Base seed of shard order, shuffles and resampling.
        synthetic: Synthetic set(s) to generate first when missing (one, or a list for mixes).
        preprocess: Filled by the CLI from the model (image size, normalisation, tokenizer).
        eval_sets: More validation streams by name, read like ``val`` (e.g. old and new domain
            of a continued pretraining); metrics are logged per set as ``val/<name>/...``.
        max_skipped_fraction: Unreadable shards an epoch may lose before the run stops
            (see :class:`~mmpt.datamodules.shard_datamodule.ShardDataModule`).
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        image_key: str | None = None,
        text_key: str = "txt;json:caption",
        val_text_key: str | None = None,
        label_key: str | None = "json:label",
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: Preprocess | None = None,
        eval_sets: dict[str, StreamConfig] | None = None,
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
            eval_sets=eval_sets,
            max_skipped_fraction=max_skipped_fraction,
        )
        self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
        self.val_text_key = val_text_key or text_key
        self.classnames: list[str] | None = None  # set by `mmpt eval zeroshot --classnames`

    def classnames_for(self, meta: dict) -> list[str] | None:
        """Class names that labels given as names map onto.

        ``classnames`` (``mmpt eval zeroshot``), else the set's ``index.json``
        ``meta.zeroshot.classnames`` (``meta``: the first source's), else None (names stay
        names).
        """
        if self.classnames is not None:
            return self.classnames
        return list((meta.get("zeroshot") or {}).get("classnames") or []) or None

    def required_fields(self, meta: dict) -> dict[str, str]:
        """The caption field, and the label field when the set names classes (zero-shot)."""
        fields = {"data.val_text_key": self.val_text_key}
        if self.label_key and meta.get("zeroshot"):
            fields["data.label_key"] = self.label_key
        return fields

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (also used by ``mmpt eval`` on arbitrary shards)."""
        pre = self.preprocess or Preprocess()
        if pre.tokenizer is None or pre.image is None:
            raise ValueError(
                "the model gives no tokenizer/image preprocessing: ImageTextDataModule needs a "
                "model with an image and a text tower (data.preprocess is linked from the model)"
            )
        sources = config.sources(field)  # resolved once: a folder of many shards is stat'ed once
        sample_fn = ImageTextSample(
            # no flips: captions say left and right (tiles too: "river in the north")
            read_image=ImageReader(pre.image, train, self.image_key, pre.image.size, flip=False),
            text_key=self.text_key if train else self.val_text_key,
            label_key=self.label_key,
            all_captions=not train,
            classnames=self.classnames_for(sources[0].meta),
        )
        rank, world = self._world()
        return ShardStream(
            sources,
            config,
            sample_fn,
            ImageTextCollate(pre.tokenizer),
            batch_size=self.batch_size if train else self.val_batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def normalize(self, batch: ImageTextBatch) -> ImageTextBatch:
        """Worker pixels -> normalised float32, with the model's scale, mean and std.

        uint8 RGB images become ``(x / 255 - mean) / std`` (float passes through); raw tiles
        become ``(x * scale - mean) / std`` (see :func:`.transforms.normalize_for`).
        """
        pre = (self.preprocess or Preprocess()).image or ImagePreprocess()
        batch.images = normalize_for(batch.images, pre)
        return batch
