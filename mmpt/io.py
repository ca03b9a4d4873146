"""Small file utilities shared across mmpt."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write ``path`` so readers see the old file or the whole new one, never a part.

    ``write`` fills a temporary file in the same folder, which is fsynced and renamed over
    ``path`` (a crash mid-write leaves the old file). The file gets the usual permissions (0666
    minus the umask), not mkstemp's private 0600. The folder is created if needed.

    Args:
        path: Destination file.
        write: Writes the content to the open temporary file.
        binary: Open the temporary file in binary mode (else UTF-8 text).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def read_yaml(path: str | Path, flag: str) -> Any:
    """Parse a user's YAML file; errors name the flag it came from and the file.

    Args:
        path: The file.
        flag: The option or argument that named it (``-c``, ``--prompt``), for messages.

    Returns:
        The document (``None`` for an empty file).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not valid YAML (the parser's message, with line and column).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {path}: not valid YAML ({e})") from None
