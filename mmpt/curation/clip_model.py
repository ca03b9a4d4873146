"""``mmpt data score --model DIR``: an open_clip model folder as an mmpt contrastive model.

DataComp's and DFN's CLIP filtering score with a public OpenCLIP checkpoint: a folder holding
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and the weights, as the Hugging
Face hub's OpenCLIP repos ship it (``hf download ORG/REPO --local-dir DIR``) and as
``mmpt export --format open_clip`` writes it. The folder becomes a ``ContrastiveModule`` of
``OpenCLIPVisionTower`` + ``OpenCLIPTextTower`` (``model_name="local-dir:DIR"``), so the score
job is the same Lightning predict as for ``-c CONFIG --ckpt CKPT``. Preprocessing is the
folder's: image size from ``vision_cfg``, mean/std from ``preprocess_cfg``, open_clip's BPE
tokenizer at ``text_cfg.context_length``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mmpt.models.contrastive import ContrastiveModule

if TYPE_CHECKING:
    from mmpt.datamodules.image_text import ImageTextDataModule

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
#: open_clip's ``preprocess_cfg`` defaults that mmpt's evaluation transform reproduces.
_SAME_TRANSFORM = {"resize_mode": "shortest", "interpolation": "bicubic"}
#: Weight files open_clip's ``local-dir:`` / hub loading looks for, in its order.
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def open_clip_folder(folder: str) -> tuple[Path, Path]:
    """The folder's config and weight files, checked.

    Args:
        folder: ``--model`` value.

    Returns:
        (``open_clip_config.json``, weight file), the weights the first of :data:`WEIGHT_FILES`
        present.

    Raises:
        FileNotFoundError: No such folder, no ``open_clip_config.json`` or no weight file.
        ValueError: A config without ``model_cfg``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--model: no folder {folder!r}")
    config = root / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"--model {folder}: no {CONFIG_FILE}; --kind clip --model takes an open_clip model "
            f"folder ({CONFIG_FILE} + {WEIGHT_FILES[0]} or {WEIGHT_FILES[2]}), as `hf download` "
            "of an OpenCLIP repo or `mmpt export --format open_clip` writes it"
        )
    cfg = json.loads(config.read_text(encoding="utf-8"))
    if "model_cfg" not in cfg:
        raise ValueError(f"--model {folder}: {CONFIG_FILE} has no model_cfg (not open_clip's)")
    pre = cfg.get("preprocess_cfg") or {}
    if other := {k: pre[k] for k, v in _SAME_TRANSFORM.items() if pre.get(k, v) != v}:
        log.warning(
            "%s: preprocess_cfg %s; mmpt crops the centre square and resizes it bicubic "
            "(open_clip's shortest/bicubic), so scores differ slightly from open_clip's",
            folder,
            other,
        )
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return config, root / name
    raise FileNotFoundError(
        f"--model {folder}: no weights; put one of {', '.join(WEIGHT_FILES)} next to {CONFIG_FILE}"
    )


def load_open_clip_folder(folder: str) -> ContrastiveModule:
    """A ``ContrastiveModule`` with the folder's open_clip towers and weights, in eval mode.

    Weights are read as tensors only (safetensors, or torch ``weights_only``). The loss (and
    so ``logit_scale``) is the default one: scoring uses the normalised embeddings only.

    Args:
        folder: An open_clip model folder (see :func:`open_clip_folder`).

    Returns:
        The model; ``model.preprocess`` is the folder's image size, mean/std and tokenizer.

    Raises:
        FileNotFoundError: See :func:`open_clip_folder`.
        ValueError: A config the towers cannot build (e.g. a Hugging Face text model) or
            weights that do not fit it.
    """
    from mmpt.models.encoders import OpenCLIPTextTower, OpenCLIPVisionTower

    _, weights = open_clip_folder(folder)
    name = f"local-dir:{Path(folder).resolve()}"
    vision = OpenCLIPVisionTower(name, pretrained=str(weights))
    text = OpenCLIPTextTower(name, pretrained=str(weights))
    return ContrastiveModule(vision=vision, text=text).eval()


def open_clip_datamodule(model: ContrastiveModule, text_key: str | None) -> ImageTextDataModule:
    """An ``ImageTextDataModule`` that reads shards with ``model``'s preprocessing.

    Args:
        model: From :func:`load_open_clip_folder`.
        text_key: Caption field (``txt``, ``json:caption``); None: ``txt;json:caption``.
    """
    from mmpt.datamodules.image_text import ImageTextDataModule

    key = text_key or "txt;json:caption"
    return ImageTextDataModule(
        batch_size=256, num_workers=4, text_key=key, preprocess=model.preprocess
    )
