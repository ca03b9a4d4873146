"""Image-text pairs from WebDataset shards (img2dataset / open_clip layout) as ImageTextBatch.

Images are RGB (``jpg``, ``png`` ...) or multispectral tiles (``npy``, ``tif``, see
:mod:`mmpt.datamodules.tiles`), whichever the model's preprocessing takes. The split/stream/
loader plumbing shared with the other shard datamodules is :class:`ShardDataModule`.
"""

from __future__ import annotations

import abc
import logging
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from mmpt.batch import ImageTextBatch
from mmpt.datamodules.decode import read_captions, read_class
from mmpt.datamodules.key_check import peek_samples, require_fields
from mmpt.datamodules.loader import make_loader, training_batches
from mmpt.datamodules.resume import StreamPosition, batch_in_flight, epoch_done
from mmpt.datamodules.skip_log import SkipLog
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.synthetic import SyntheticData, config_urls, synthetic_to_render
from mmpt.datamodules.transforms import ImageReader, normalize_for
from mmpt.preprocess import ImagePreprocess, Preprocess, Tokenizer

log = logging.getLogger("mmpt.data")


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


class ShardDataModule(L.LightningDataModule, abc.ABC):
    """Train/val/test shard streams -> typed batches; subclasses say how to read a split.

    A subclass implements :meth:`stream` (one split's :class:`ShardStream`) and
    :meth:`normalize` (per batch, on the device); this class resolves the splits at setup,
    renders synthetic data, advances epochs and builds the loaders.

    Args:
        train: Training stream, or None.
        val: Validation stream, or None.
        test: Test stream (``mmpt test``/``predict``; falls back to ``val``), or None.
        batch_size: Samples per batch per rank.
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: Base seed of shard order, shuffles and resampling.
        synthetic: Synthetic set(s) to generate first when missing.
        preprocess: Filled by the CLI from the model.
        eval_sets: More validation streams, by name (read like ``val``; e.g. the old and the
            new domain of a continued pretraining): each is one more validation dataloader,
            after ``val``, and its metrics are logged as ``val/<name>/...``.
    """

    def __init__(
        self,
        train: StreamConfig | None,
        val: StreamConfig | None,
        test: StreamConfig | None,
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        seed: int,
        synthetic: SyntheticData | list[SyntheticData] | None,
        preprocess: Any,
        eval_sets: dict[str, StreamConfig] | None = None,
    ) -> None:
        super().__init__()
        self.train_cfg, self.val_cfg, self.test_cfg = train, val, test
        self.eval_sets = dict(eval_sets or {})
        reserved = {"val", "loss", "retrieval", "zeroshot", "data", "knn"}
        if clash := sorted(reserved & set(self.eval_sets)):
            raise ValueError(
                f"data.eval_sets: {clash} are reserved metric names (val/<set>/<metric>); "
                "give the sets other names"
            )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.synthetic = synthetic
        self.preprocess = preprocess
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self.test_stream: ShardStream | None = None
        self.eval_streams: dict[str, ShardStream] = {}
        self.val_meta: dict = {}
        self.val_set_names: list[str] = []
        self.val_metas: list[dict] = []
        self.position = StreamPosition()  # of the training stream, saved in checkpoints
        self.skip_log = SkipLog()

    @abc.abstractmethod
    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (``field`` names it in errors)."""

    @abc.abstractmethod
    def normalize(self, batch: Any) -> Any:
        """Turn a batch's worker-side pixels into model inputs (on the device)."""

    def required_preprocess(self, part: str, need: str) -> Any:
        """The model's ``preprocess.<part>`` (``image``, ``audio`` ...).

        Args:
            part: Attribute of the model's preprocessing.
            need: What the model must have, for the error (e.g. ``an audio tower``).

        Raises:
            ValueError: The model gives none.
        """
        pre = getattr(self.preprocess, part, None) if self.preprocess is not None else None
        if pre is None:
            raise ValueError(
                f"the model gives no {part} preprocessing: {type(self).__name__} needs a model "
                f"with {need} (data.preprocess is linked from the model's preprocess)"
            )
        return pre

    def prepare_data(self) -> None:
        """Render each synthetic set (rank 0 only) that the urls read and that is missing."""
        for spec in synthetic_to_render(self.synthetic, self.url_specs()):
            spec.ensure()

    def url_specs(self) -> list[str]:
        """Every shard source of every split, eval set and replay, as written."""
        return config_urls([self.train_cfg, self.val_cfg, self.test_cfg, self.eval_sets])

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check every source (missing shards fail here, before training)."""
        if stage in (None, "fit") and self.train_cfg is not None:
            self.train_stream = self.stream(self.train_cfg, train=True, field="data.train")
        if stage in (None, "fit", "validate"):
            self._setup_validation()
        if stage in (None, "test", "predict"):
            cfg, field = (
                (self.test_cfg, "data.test") if self.test_cfg else (self.val_cfg, "data.val")
            )
            if cfg is not None:
                self.test_stream = self.stream(cfg, train=False, field=field)
                self.val_meta = self.test_stream.sources[0].meta

    def _setup_validation(self) -> None:
        """Build ``val`` and every eval set's stream; fill ``val_set_names`` and ``val_metas``."""
        if self.val_cfg is not None:
            self.val_stream = self.stream(self.val_cfg, train=False, field="data.val")
        self.eval_streams = {
            name: self.stream(cfg, train=False, field=f"data.eval_sets.{name}")
            for name, cfg in self.eval_sets.items()
        }
        named = self._val_streams()
        self.val_set_names = [name for name, _ in named]
        self.val_metas = [stream.sources[0].meta for _, stream in named]
        for name, stream in named:
            field = "data.val" if name == "val" else f"data.eval_sets.{name}"
            self.check_fields(stream, field)
        if self.val_metas:  # the plain val set's, else the first eval set's
            self.val_meta = self.val_metas[0]

    def required_fields(self, meta: dict) -> dict[str, str]:
        """Fields every evaluation set must have: setting flag -> field spec (none here).

        Args:
            meta: The set's ``index.json`` meta (class names ...).
        """
        return {}

    def check_fields(self, stream: ShardStream, field: str) -> None:
        """Fail now if a required field is in none of the set's first samples.

        Raises:
            DataError: See :func:`~mmpt.datamodules.key_check.require_fields`.
        """
        stream.where = f"{field} ({stream.config.urls})"
        fields = self.required_fields(stream.sources[0].meta)
        if fields:
            samples = peek_samples(stream.urls)
            require_fields(samples, fields, f"{field} ({stream.config.urls})")

    def _val_streams(self) -> list[tuple[str, ShardStream]]:
        """(name, stream) of every validation set, in dataloader order."""
        head = [("val", self.val_stream)] if self.val_stream is not None else []
        return head + list(self.eval_streams.items())

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Called by the model at train start and each epoch start (shard order, shuffles).

        Args:
            epoch: The epoch about to run.
            offset: Its batches already done (mid-epoch resume; the mixture clock starts there).
        """
        if self.train_stream is not None:
            self.train_stream.set_epoch(epoch, offset)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note a training batch's stream position and skips, then normalise it on the device."""
        trainer = self.trainer
        if trainer is not None:
            if trainer.training:
                self.position.record(batch)
            stage = trainer.state.stage
            self.skip_log.record(stage.value if stage else "run", trainer.current_epoch, batch)
        return self.normalize(batch)

    def teardown(self, stage: str) -> None:
        """Log the last epoch's skipped and clamped samples."""
        self.skip_log.flush()

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position on every rank (exact mid-epoch resume)."""
        if self.train_stream is None:
            return {}
        trainer = self.trainer
        done = epoch_done(trainer) if trainer is not None else False
        flight = batch_in_flight(trainer) if trainer is not None else False
        return self.position.state_dict(
            self.train_stream, *self._world(), epoch_done=done, in_flight=flight
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's stream position for the training loader."""
        self.position.load_state_dict(state_dict)

    def _pin(self) -> bool:
        return torch.cuda.is_available()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Training batches; errors if no ``data.train`` is configured."""
        if self.train_stream is None:
            raise ValueError("no training data: set data.train.urls (or data.synthetic)")
        trainer = self.trainer
        if trainer is not None:  # mixture schedules given as fractions of the run need its length
            self.train_stream.set_total_batches(training_batches(trainer, self.train_stream))
        self.train_stream.track = True
        self.position.new_loader()
        return make_loader(
            self.train_stream, self.num_workers, self._pin(), before_iter=self._before_train_iter
        )

    def _before_train_iter(self) -> None:
        """Take up a loaded checkpoint's stream position (just before the workers start)."""
        self.position.apply(self.train_stream, *self._world())

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        """Validation batches: one loader (``val`` alone), a list (eval sets), or none.

        With ``eval_sets`` the list is ``[val (if set), *eval sets]``, named by
        ``val_set_names``.
        """
        loaders = [make_loader(s, self.num_workers, self._pin()) for _, s in self._val_streams()]
        if not self.eval_sets:
            return loaders[0] if loaders else []
        return loaders

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        """Test batches: ``data.test``, else ``data.val``."""
        if self.test_stream is None:
            raise ValueError("no test data: set data.test.urls (or data.val.urls)")
        return make_loader(self.test_stream, self.num_workers, self._pin())

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """Prediction batches: the test stream (``data.test``, else ``data.val``)."""
        return self.test_dataloader()


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
        )
        self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
        self.val_text_key = val_text_key or text_key
        self.classnames: list[str] | None = None  # set by `mmpt eval zeroshot --classnames`

    def classnames_for(self, config: StreamConfig, field: str) -> list[str] | None:
        """Class names that labels given as names map onto.

        ``classnames`` (``mmpt eval zeroshot``), else the set's ``index.json``
        ``meta.zeroshot.classnames``, else None (names stay names).
        """
        if self.classnames is not None:
            return self.classnames
        meta = config.sources(field)[0].meta
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
        sample_fn = ImageTextSample(
            # no flips: captions say left and right (tiles too: "river in the north")
            read_image=ImageReader(pre.image, train, self.image_key, pre.image.size, flip=False),
            text_key=self.text_key if train else self.val_text_key,
            label_key=self.label_key,
            all_captions=not train,
            classnames=self.classnames_for(config, field),
        )
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
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
