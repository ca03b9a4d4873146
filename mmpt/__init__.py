"""mmpt: multimodal pretraining workbench. ``mmpt.load`` is imported on first use (light import)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
