"""mmpt: multimodal pretraining workbench. ``mmpt.load`` is imported on first use (light import)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# pyarrow's default jemalloc pool keeps a background thread, and a fork taken while it holds a
# lock deadlocks the child. mmpt's own worker pools start from a fork server
# (mmpt.shards.build.pool_context); this keeps pyarrow's allocations on the system allocator
# as well. Set before pyarrow is first imported; a user's own ARROW_DEFAULT_MEMORY_POOL wins.
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
