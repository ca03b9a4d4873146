"""mmpt: multimodal pretraining workbench. ``mmpt.load`` is imported on first use (light import)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# pyarrow's default jemalloc pool runs a background thread; a process that forks after it
# started (shard-building pools, DataLoader workers) can deadlock in the child's first malloc.
# The system allocator has no such thread. Set before pyarrow is first imported; a user's own
# ARROW_DEFAULT_MEMORY_POOL wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

if TYPE_CHECKING:
    from mmpt.load import load as load

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from mmpt.load import load

        # importing the submodule bound the name ``mmpt.load`` to it: bind the function instead
        globals()["load"] = load
        return load
    raise AttributeError(f"module 'mmpt' has no attribute {name!r}")
