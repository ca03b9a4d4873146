"""Tar member names that could point outside a folder (absolute, ``..``) are refused.

Every tar reader (training streams, ``mmpt data inspect``) and the shard writer every builder
uses check names here: a member such as ``../evil.txt`` or ``/etc/passwd`` is a counted skip
(readers) or a clear error (writer), never a path used as given.
"""

from __future__ import annotations

import re

_DRIVE = re.compile(r"^[A-Za-z]:")


def member_problem(name: str) -> str | None:
    """Why a tar member (or sample key) name is unsafe; None when it is a plain relative name.

    Args:
        name: The member name as stored in the tar (``key.ext``), or a sample key.

    Returns:
        ``"an absolute path"``, ``"a '..' component"`` or ``"a NUL byte"``; None when safe.
    """
    if "\x00" in name:
        return "a NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "a '..' component"
    return None


def refused_member(shard: str, name: str, problem: str) -> str:
    """The message for a refused member, naming the shard and the member."""
    return (
        f"shard {shard}: tar member {name!r} refused: {problem} (it could point outside a folder)"
    )
