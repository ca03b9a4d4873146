"""Checkpoint reading that never runs code: ``weights_only`` with an allow-list, safetensors.

Every checkpoint mmpt reads (``model.init_from``, ``mmpt eval``/``export``/``merge``, the
re-warm schedule's ``from_checkpoint``, a tower's ``init_from``, ``--ckpt_path`` resumes)
goes through :func:`load_torch_file` or :func:`load_tensors`. A pickle may only rebuild
tensors, plain containers and the few plain-data types mmpt and Lightning themselves write
(:func:`allowed_globals`); anything else (a pickled module, an arbitrary callable) is refused
with :class:`UnsafeCheckpointError`, before any of it runs. There is no escape hatch: a trusted
legacy file that needs more is converted once, in the user's own code, to a state dict or a
``.safetensors`` file (the refusal says how).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from functools import cache
from typing import Any

import torch

#: How a trusted legacy file is converted, named in the refusal.
CONVERT = (
    "If you trust this file, convert it once, in code of your own: torch.load it there and "
    "torch.save its state_dict (or write it as .safetensors), then pass the converted file."
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs a type outside the allow-list to be unpickled (it was not loaded)."""


@cache
def allowed_globals() -> tuple[type, ...]:
    """The types a checkpoint may hold besides tensors and plain containers.

    What mmpt and Lightning write beyond torch's own list: checkpoints of every quickstart
    family (CLIP, VLM, MAE, audio-text, BLSP, EgoVLP) and EMA runs hold tensors, plain
    containers and numbers only; Lightning stores ``hyper_parameters`` as a plain dict, whose
    values are a module's ``__init__`` arguments, which may be ``pathlib`` paths. Plain data
    only: no function or other callable is ever on this list. (Lightning's ``AttributeDict``
    cannot be on it: torch's weights-only unpickler fills no dict subclass.)
    """
    paths = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath)
    return (*paths, pathlib.PureWindowsPath)


def _refused(path: str, err: Exception) -> UnsafeCheckpointError:
    """The refusal: the file, the refused global(s) and the escape hatch."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: fall back to the message
        names = []
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in allowed_globals()}
    names = [n for n in names if n not in allowed]
    if not names:
        found = re.search(r"GLOBAL (\S+)", str(err))
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        names = [found.group(1) if found else why.group(1) if why else str(err)[:200]]
    return UnsafeCheckpointError(
        f"{path}: refused to load: unpickling it needs {', '.join(names)}, which could run "
        "arbitrary code (mmpt loads checkpoints with torch.load(weights_only=True) and an "
        f"allow-list of plain data types, and never without it). {CONVERT}"
    )


def load_torch_file(path: str | os.PathLike, mmap: bool = True) -> Any:
    """``torch.load`` a file on the CPU without running code from it.

    Args:
        path: A torch/Lightning checkpoint (zip or legacy format).
        mmap: Memory-map the tensors (only those used are read); legacy files that cannot be
            memory-mapped are read whole.

    Returns:
        The unpickled object.

    Raises:
        UnsafeCheckpointError: The file needs a global outside :func:`allowed_globals`.
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None


def check_pickle(path: str | os.PathLike) -> None:
    """Refuse a checkpoint file that needs a global outside the allow-list, running nothing.

    For loaders mmpt does not call itself (Lightning's FSDP full-checkpoint resume unpickles
    with a plain ``pickle.Unpickler``): the file is read once with :func:`load_torch_file`
    (``weights_only=True``, memory-mapped), whose unpickler refuses any other global whatever
    the pickle protocol. Folders (sharded checkpoints) are left to the loader.

    Raises:
        UnsafeCheckpointError: A global outside :func:`allowed_globals`.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        load_torch_file(path)


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's top-level dict: safetensors files by ``safetensors``, else torch.

    Args:
        path: ``.safetensors`` (memory-mapped by safetensors) or a torch file.

    Returns:
        The file's dict (a Lightning checkpoint keeps its ``state_dict`` entry).

    Raises:
        UnsafeCheckpointError: A torch file that needs a global outside the allow-list.
        ValueError: The file does not hold a dict.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint"
        )
    return obj
