"""Evaluation: zero-shot, probes, EgoMCQ, EPIC-100 MIR and VLM benchmarks (``mmpt eval``).

``mmpt.eval.VLMEvalCallback`` (the benchmark suite during fit) is imported on first use, so
``import mmpt.eval`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VLMEvalCallback"]


def __getattr__(name: str) -> Any:
    if name == "VLMEvalCallback":
        from mmpt.eval.vlm_callback import VLMEvalCallback

        return VLMEvalCallback
    raise AttributeError(f"module 'mmpt.eval' has no attribute {name!r}")
