"""Local timm weights: find the checkpoint file, read its shapes, build a timm model from it."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

FLAG = "--model.init_args.vision.init_args.pretrained"
# Same preference order timm uses for a folder (timm.models._hub.load_state_dict_from_path).
_PREFERRED_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
)
_EXTENSIONS = (".safetensors", ".pth", ".pth.tar", ".bin")


def resolve_checkpoint_file(path: str, flag: str = FLAG) -> str:
    """Turn a checkpoint file or a folder holding one into a file path.

    Args:
        path: A ``.safetensors``/``.pth``/``.bin`` file or a folder (e.g. ``hf download`` output).
        flag: The command-line flag that sets ``path``, quoted in the error.

    Returns:
        Path of the checkpoint file.

    Raises:
        FileNotFoundError: When the file, or any checkpoint inside the folder, does not exist.

    """
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in _PREFERRED_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        for ext in _EXTENSIONS:
            found = sorted(f for f in os.listdir(path) if f.endswith(ext))
            if found:
                return os.path.join(path, found[0])
        raise FileNotFoundError(f"No checkpoint ({', '.join(_EXTENSIONS)}) inside folder {path!r}.")
    raise FileNotFoundError(
        f"Pretrained weights {path!r} not found. Nothing is downloaded at run time: download the "
        f"weights (e.g. `hf download timm/<model> --local-dir DIR`) and set {flag} /path/to/file."
    )


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Read tensor names and shapes of a checkpoint without materialising it in memory."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    from mmpt.safe_load import load_tensors

    ckpt = load_tensors(path)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    strip = re.compile(r"^(_orig_mod\.|module\.)+")
    return {strip.sub("", k): tuple(v.shape) for k, v in ckpt.items() if torch.is_tensor(v)}


class _KeyReport(logging.Handler):
    """Collects the missing/unexpected key lists that timm's ``load_pretrained`` logs."""

    pattern = re.compile(r"^(Missing|Unexpected) keys \((.*?)\) (?:discovered|found)")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.keys: dict[str, list[str]] = {"Missing": [], "Unexpected": []}

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.match(record.getMessage())
        if match:
            self.keys[match.group(1)] += [k for k in match.group(2).split(", ") if k]


@contextmanager
def _capture_timm_key_report() -> Iterator[_KeyReport]:
    logger = logging.getLogger("timm.models._builder")
    handler, level = _KeyReport(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def create_pretrained_model(model_name: str, pretrained: str, kwargs: dict) -> nn.Module:
    """``timm.create_model`` with local weights through timm's pretrained path.

    The checkpoint's head is kept when its shape matches ``kwargs["num_classes"]`` and
    re-initialised otherwise.

    Args:
        model_name: timm architecture name, optionally with a tag.
        pretrained: Local checkpoint file or a folder holding one.
        kwargs: ``timm.create_model`` arguments, ``num_classes`` included.

    Returns:
        The model with the checkpoint loaded.

    Raises:
        FileNotFoundError: When ``pretrained`` does not exist.
        ValueError: When the checkpoint does not fit the model (outside its head).

    """
    file = resolve_checkpoint_file(pretrained)
    base_cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = (base_cfg.classifier if base_cfg else None) or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    shapes = _checkpoint_shapes(file)
    head_rows = {shapes.get(f"{h}.weight", (0,))[0] for h in heads}
    keep_head = head_rows == {kwargs["num_classes"]}
    # timm drops the classifier (and loads non-strictly) when num_classes differs from the
    # pretrained cfg's: tell it what the file holds so a matching head is kept, strictly.
    file_classes = kwargs["num_classes"] if keep_head else max(head_rows)
    overlay = dict(file=file, num_classes=file_classes, source=None)
    with _capture_timm_key_report() as report:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    missing = [k for k in report.keys["Missing"] if k not in head_keys]
    unexpected = [k for k in report.keys["Unexpected"] if k not in head_keys]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {file!r} does not fit timm model {model_name!r}: missing keys "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}. Check model_name / "
            f"model_kwargs against the checkpoint, or fix {FLAG}."
        )
    if not keep_head and kwargs["num_classes"]:
        log.info("%s: new head %s (embed_dim=%d)", file, heads, kwargs["num_classes"])
    return model
