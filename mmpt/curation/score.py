"""``mmpt data score``: per-sample CLIP scores as a Lightning predict job over shards.

The score of a sample is the cosine similarity of its image embedding and its (first)
caption's embedding under a trained contrastive model, as DataComp's and DFN's CLIP
filtering. The job is a ``Trainer.predict`` over the shards: Lightning and the shard stream
split the shards by node, rank and worker (each shard is read by exactly one worker), so the
same command runs on one CPU, on the GPUs of one machine, or under ``torchrun`` / SLURM on
many nodes.

Output: one parquet file per shard, ``<out>/<shard>.parquet`` (columns ``shard``, ``key``,
``<name>``), written by the rank that read the shard as soon as its last sample is scored
(the count from the shards' ``index.json``; without one, at the end). A killed job started
again skips the shards already written, so it resumes where it stopped, and the output is the
same for any number of ranks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mmpt.curation.tables import shard_name, write_table

log = logging.getLogger(__name__)


class ShardKeyed:
    """Wraps a sample function so each item's key becomes ``<shard file>/<__key__>``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, sample: dict[str, Any]) -> tuple:
        """The inner item, its last element (the key) prefixed with the shard's file name."""
        *item, key = self.inner(sample)
        return (*item, f"{shard_name(sample['__url__'])}/{key}")


def pair_scores(prediction: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) cosine of each item's embedding with its first caption's (unit vectors).

    Args:
        prediction: ``predict_step`` output: ``image_emb`` (or ``audio_emb``) (N, D),
            ``text_emb`` (M, D), ``text_to_image`` (or ``text_to_audio``) (M,).
    """
    from mmpt.models.contrastive import first_text_per_item

    media = prediction.get("image_emb", prediction.get("audio_emb"))
    owner = prediction.get("text_to_image", prediction.get("text_to_audio"))
    first = first_text_per_item(owner, media.shape[0])
    return (media.float() * prediction["text_emb"][first].float()).sum(-1)


class ScoreWriter(BasePredictionWriter):
    """Collects scores per shard and writes each shard's table once it is complete.

    Args:
        out: Output folder.
        columns: ``predict_step`` output -> {score column: (N,) tensor}, N its ``keys``.
        expected: Samples per shard file name (from the index); shards absent are written at
            the end of the epoch.
    """

    def __init__(
        self,
        out: str | Path,
        columns: Callable[[Any], dict[str, torch.Tensor]],
        expected: dict[str, int],
    ) -> None:
        super().__init__(write_interval="batch")
        self.out, self.columns, self.expected = Path(out), columns, expected
        self.rows: dict[str, dict[str, list]] = {}
        self.samples = 0
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, samples) after the first batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Rows are named by keys: Lightning's batch indices are not needed."""
        import warnings

        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        scores = {name: v.float().cpu().tolist() for name, v in self.columns(prediction).items()}
        for i, composite in enumerate(prediction["keys"]):
            shard, key = composite.split("/", 1)
            rows = self.rows.setdefault(shard, {"shard": [], "key": [], **{n: [] for n in scores}})
            rows["shard"].append(shard)
            rows["key"].append(key)
            for name, values in scores.items():
                rows[name].append(values[i])
            if len(rows["key"]) == self.expected.get(shard, -1):
                self._flush(shard)
        self.samples += len(prediction["keys"])
        if self.first is None:
            self.first = (time.perf_counter(), self.samples)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the shards still open (no index count, or samples skipped as corrupt)."""
        for shard in list(self.rows):
            have, want = len(self.rows[shard]["key"]), self.expected.get(shard)
            if want is not None:
                log.warning(
                    "%s: %d of its %d samples scored (the rest unreadable)", shard, have, want
                )
            self._flush(shard)
        now = time.perf_counter()
        seconds = now - self.start
        log.info("rank %d: %d samples in %.1f s", trainer.global_rank, self.samples, seconds)
        steady = ""
        if self.first is not None and self.samples > self.first[1]:
            rate = (self.samples - self.first[1]) / max(now - self.first[0], 1e-9)
            steady = f", {rate:.1f} after the first batch"
        print(
            f"mmpt data score: rank {trainer.global_rank} scored {self.samples} samples "
            f"({self.samples / max(seconds, 1e-9):.1f} samples/s{steady})"
        )

    def _flush(self, shard: str) -> None:
        write_table(self.rows.pop(shard), self.out / f"{Path(shard).stem}.parquet")


def remaining_shards(urls: list[str], out: str | Path) -> list[str]:
    """The shards of ``urls`` whose table is not in ``out`` yet (resume after a kill)."""
    done = {p.stem for p in Path(out).glob("*.parquet")} if Path(out).is_dir() else set()
    return [u for u in urls if Path(shard_name(u)).stem not in done]


def launch_world() -> tuple[int, int]:
    """(devices per node, nodes) from torchrun's / SLURM's environment, else (1, 1)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", local)))
    return local, max(1, world // max(local, 1))


def plan(source: str, out: str | Path) -> tuple[list[str], dict[str, int]]:
    """(shards of ``source`` not scored in ``out`` yet, their sample counts by file name).

    Raises:
        FileNotFoundError: ``--from`` has no shards.
    """
    from mmpt.datamodules.urls import resolve_source

    resolved = resolve_source(source, "--from")
    todo = remaining_shards(resolved.urls, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    counts = dict(zip(resolved.urls, resolved.counts or [], strict=False))
    return todo, {shard_name(u): counts[u] for u in todo if u in counts}


def run_predict(
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    writer: ScoreWriter,
    accelerator: str = "auto",
) -> None:
    """``Trainer.predict`` on every rank torchrun / SLURM started (DDP when several)."""
    devices, nodes = launch_world()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy="ddp" if devices * nodes > 1 else "auto",
        logger=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)


def score_shards(
    model: L.LightningModule,
    datamodule: Any,
    source: str,
    out: str | Path,
    name: str = "clip",
    accelerator: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> int:
    """Score every sample of ``source`` not scored yet into ``out``; returns shards scored.

    Args:
        model: A contrastive model (its ``predict_step`` gives unit embeddings and owners).
        datamodule: Its training datamodule (preprocessing, caption field); its test split
            is pointed at ``source`` here.
        source: Shards to score (folder, file, pattern).
        out: Output folder of per-shard parquet files.
        name: Score column name.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        batch_size: Per-rank batch size (default: the datamodule's validation batch size).
        num_workers: Loader workers per rank (default: the datamodule's).
    """
    from mmpt.datamodules.streams import StreamConfig

    todo, expected = plan(source, out)
    if not todo:
        print(f"mmpt data score: every shard of {source} is already scored in {out}")
        return 0
    datamodule.test_cfg = StreamConfig(urls="::".join(todo), shuffle_buffer=0, shuffle_shards=False)
    if batch_size is not None:
        datamodule.val_batch_size = batch_size
    if num_workers is not None:
        datamodule.num_workers = num_workers
    original = datamodule.predict_dataloader

    def predict_dataloader() -> Any:  # keys carry their shard from the worker on
        datamodule.test_stream.sample_fn = ShardKeyed(datamodule.test_stream.sample_fn)
        return original()

    datamodule.predict_dataloader = predict_dataloader
    writer = ScoreWriter(out, lambda p: {name: pair_scores(p)}, expected)
    run_predict(model, datamodule, writer, accelerator)
    return len(todo)
