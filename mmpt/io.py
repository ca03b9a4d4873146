"""Small file utilities shared across mmpt."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part.

    Writes a temporary file in the same folder, fsyncs it and renames it over ``path``. The
    file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600.

    Args:
        path: Destination file.
        text: Content, written as UTF-8.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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
