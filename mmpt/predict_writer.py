"""``mmpt predict`` writes what a model embeds: ``.npy`` per embedding + sample keys, per rank.

Every module family that embeds returns from ``predict_step`` a dict with ``keys`` (the
``__key__`` of each item), one or more ``<name>_emb`` tensors (L2-normalised) and, for paired
models, ``text_to_<media>`` (the item index of each caption within the batch). The writer
concatenates them over the epoch, re-bases the caption->item indices onto the rank's whole set,
and writes::

    <out>/rank000/keys.json            # ["000000001", ...], one per item, in row order
    <out>/rank000/image_emb.npy        # (N, D) float32 (video_emb / audio_emb for those models)
    <out>/rank000/text_emb.npy         # (M, D) float32, M captions
    <out>/rank000/text_to_image.npy    # (M,) int64 row of each caption's item in image_emb
    <out>/rank000/labels.npy           # (N,) class ids, -1 unknown (image towers, MAE)
    <out>/rank000/manifest.json        # fields, shapes, checkpoint

``<out>`` is ``<run version folder>/predictions`` unless ``--trainer.callbacks`` gives an
:class:`EmbeddingWriter` with another ``out_dir``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class EmbeddingWriter(BasePredictionWriter):
    """Write each rank's predicted embeddings and keys at the end of the predict epoch.

    Args:
        out_dir: Output folder; ``None`` is ``<trainer.log_dir>/predictions``.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self._parts: dict[str, list[np.ndarray]] = {}
        self._keys: list[str] = []
        self._items = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Rows are named by keys, so Lightning's batch indices are not needed (no warning)."""
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget any earlier epoch's rows."""
        self._parts, self._keys, self._items = {}, [], 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Keep one batch's embeddings (CPU, float32) and keys."""
        if not isinstance(prediction, dict) or "keys" not in prediction:
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step must return a dict with 'keys' and "
                "'<name>_emb' tensors for mmpt predict to write embeddings"
            )
        for name, value in prediction.items():
            if name.endswith("_emb"):
                self._parts.setdefault(name, []).append(value.detach().float().cpu().numpy())
        media = [n for n in prediction if n.endswith("_emb") and n != "text_emb"]
        items = prediction[media[0]].shape[0] if media else prediction["text_emb"].shape[0]
        for name, value in prediction.items():
            if name == "labels":
                self._parts.setdefault(name, []).append(value.detach().cpu().numpy())
            elif name.startswith("text_to_"):
                rows = value.detach().cpu().to(torch.int64).numpy() + self._items
                self._parts.setdefault(name, []).append(rows)
        keys = [str(k) for k in prediction["keys"]]
        if len(keys) != items:
            raise ValueError(
                f"mmpt predict: batch {batch_idx} has {items} items but {len(keys)} keys; "
                "predict on shards (each sample's __key__ names its row)"
            )
        self._keys.extend(keys)
        self._items += items

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write this rank's arrays, keys and manifest."""
        out = self.folder(trainer) / f"rank{trainer.global_rank:03d}"
        out.mkdir(parents=True, exist_ok=True)
        shapes = {}
        for name, parts in self._parts.items():
            array = np.concatenate(parts)
            np.save(out / f"{name}.npy", array)
            shapes[name] = list(array.shape)
        (out / "keys.json").write_text(json.dumps(self._keys))
        manifest = {
            "model": type(pl_module).__name__,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "items": self._items,
            "arrays": shapes,
            "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if trainer.is_global_zero:
            print(f"mmpt predict: {self._items} items per rank 0 -> {out.parent}")

    def folder(self, trainer: L.Trainer) -> Path:
        """The output folder: ``out_dir``, else ``<log_dir>/predictions``."""
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"


def load_predictions(folder: str | Path) -> dict[str, Any]:
    """Read every rank of an :class:`EmbeddingWriter` folder back, ranks in order.

    Returns:
        ``keys`` (list of str) and each array, concatenated over ranks; the ``text_to_*``
        indices are re-based onto the concatenated items.
    """
    ranks = sorted(Path(folder).glob("rank*/manifest.json"))
    if not ranks:
        raise FileNotFoundError(f"{folder}: no rank*/manifest.json (not an mmpt predict folder)")
    keys: list[str] = []
    arrays: dict[str, list[np.ndarray]] = {}
    for manifest in ranks:
        rank = manifest.parent
        for name in json.loads(manifest.read_text())["arrays"]:
            array = np.load(rank / f"{name}.npy")
            arrays.setdefault(name, []).append(array + len(keys) if "text_to_" in name else array)
        keys.extend(json.loads((rank / "keys.json").read_text()))
    return {"keys": keys, **{n: np.concatenate(a) for n, a in arrays.items()}}
