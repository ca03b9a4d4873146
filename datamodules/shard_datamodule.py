"""The split/stream/loader plumbing shared by the shard datamodules: :class:`ShardDataModule`.

It resolves the splits at setup (checking that evaluation sets hold the fields they are read
by), renders the synthetic sets the urls read, advances epochs, logs skipped samples and builds
the loaders; a subclass says how to read one split.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

import lightning as L
import torch

from mmpt.datamodules.key_check import peek_samples, require_fields
from mmpt.datamodules.loader import make_loader, training_batches
from mmpt.datamodules.resume import StreamPosition, batch_in_flight, epoch_done
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION, SkipBudget, startup_faults
from mmpt.datamodules.skip_log import SkipLog
from mmpt.datamodules.stages import DataError
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.synthetic import SyntheticData, config_urls, synthetic_to_render

log = logging.getLogger("mmpt.data")


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
        max_skipped_fraction: Stop the run (an error listing the bad files) when the shards
            that cannot be read in an epoch lose more than this fraction of the samples a rank
            expects (of its shards when there is no ``index.json``). 1.0 never stops. Each bad
            shard is logged and counted once an epoch (``data/skipped_shards``,
            ``data/lost_samples``; its lost samples are in ``data/skipped`` too).
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
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(
                f"data.max_skipped_fraction={max_skipped_fraction} must be in [0, 1] "
                "(1.0 never stops a run for unreadable shards)"
            )
        self.max_skipped_fraction = max_skipped_fraction
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
        urls = self.url_specs()
        for spec in synthetic_to_render(self.synthetic, urls):
            spec.ensure(urls)

    def url_specs(self) -> list[str]:
        """Every shard source of every split, eval set and replay, as written."""
        return config_urls([self.train_cfg, self.val_cfg, self.test_cfg, self.eval_sets])

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check every source (missing shards fail here, before training)."""
        if stage in (None, "fit") and self.train_cfg is not None:
            self.train_stream = self._stream(self.train_cfg, True, "data.train")
        if stage in (None, "fit", "validate"):
            self._setup_validation()
        if stage in (None, "test", "predict"):
            cfg, field = (
                (self.test_cfg, "data.test") if self.test_cfg else (self.val_cfg, "data.val")
            )
            if cfg is not None:
                self.test_stream = self._stream(cfg, False, field)
                self.val_meta = self.test_stream.sources[0].meta

    def _stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """:meth:`stream`, with the skip budget set and the shards' first blocks checked.

        A local shard that is empty, unreadable or not a tar is named with what is wrong
        with it now, before a run whose length it could leave unknown; too many stop here.

        Raises:
            DataError: The bad shards pass ``max_skipped_fraction`` of the whole split.
        """
        stream = self.stream(config, train=train, field=field)
        stream.max_skipped_fraction = self.max_skipped_fraction
        stream.where = stream.where or f"{field} ({config.urls})"
        if stream.counts is None:  # with an index, the readers count what each shard lost
            faults = startup_faults(stream.urls, stream.counts)
            for fault in faults:
                log.warning("%s: shard %s", field, fault.describe())
            budget = SkipBudget(self.max_skipped_fraction, None, len(stream.urls), stream.where)
            if message := budget.excess(faults):
                raise DataError(message)
        return stream

    def _setup_validation(self) -> None:
        """Build ``val`` and every eval set's stream; fill ``val_set_names`` and ``val_metas``."""
        if self.val_cfg is not None:
            self.val_stream = self._stream(self.val_cfg, False, "data.val")
        self.eval_streams = {
            name: self._stream(cfg, False, f"data.eval_sets.{name}")
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
        """Note a training batch's stream position and skips, then normalise it on the device.

        Sets ``batch.skipped_shards`` and ``batch.lost_samples``: the shards first found
        unreadable this epoch (each once, over every worker) and the samples they lost.

        Raises:
            DataError: This epoch's bad shards pass ``max_skipped_fraction``.
        """
        trainer = self.trainer
        if trainer is not None:
            if trainer.training:
                self.position.record(batch)
            stage = trainer.state.stage
            stream = self._stream_of(trainer, dataloader_idx)
            budget = stream.skip_budget() if stream is not None else None
            new = self.skip_log.record(
                stage.value if stage else "run", trainer.current_epoch, batch, budget
            )
            batch.skipped_shards = len(new)
            batch.lost_samples = sum(f.lost or 0 for f in new)
        return self.normalize(batch)

    def _on_report(self, stream: ShardStream, report: Any) -> None:
        """Log (and check the limit on) skips no batch was left to carry: an epoch's last."""
        trainer = self.trainer
        stage = trainer.state.stage if trainer is not None else None
        epoch = trainer.current_epoch if trainer is not None else 0
        self.skip_log.record(stage.value if stage else "run", epoch, report, stream.skip_budget())

    def _stream_of(self, trainer: L.Trainer, dataloader_idx: int) -> ShardStream | None:
        """The stream a batch came from (training, the ``dataloader_idx``-th validation, test)."""
        if trainer.training:
            return self.train_stream
        if trainer.validating or trainer.sanity_checking:
            named = self._val_streams()
            return named[dataloader_idx][1] if dataloader_idx < len(named) else None
        return self.test_stream

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
            self.train_stream, self.num_workers, self._pin(), before_iter=self._before_train_iter,
            on_report=self._on_report,
        )  # fmt: skip

    def _before_train_iter(self) -> None:
        """Take up a loaded checkpoint's stream position (just before the workers start)."""
        self.position.apply(self.train_stream, *self._world())

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        """Validation batches: one loader (``val`` alone), a list (eval sets), or none.

        With ``eval_sets`` the list is ``[val (if set), *eval sets]``, named by
        ``val_set_names``.
        """
        loaders = [
            make_loader(s, self.num_workers, self._pin(), on_report=self._on_report)
            for _, s in self._val_streams()
        ]
        if not self.eval_sets:
            return loaders[0] if loaders else []
        return loaders

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        """Test batches: ``data.test``, else ``data.val``."""
        if self.test_stream is None:
            raise ValueError("no test data: set data.test.urls (or data.val.urls)")
        return make_loader(
            self.test_stream, self.num_workers, self._pin(), on_report=self._on_report
        )

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """Prediction batches: the test stream (``data.test``, else ``data.val``)."""
        return self.test_dataloader()
