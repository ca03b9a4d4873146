"""MMC4 document shards (``docs_shard_*.jsonl``) -> interleaved image-text shards.

A document is ``{"url", "text_list": [sentence, ...], "image_info": [{"image_name",
"matched_text_index", "matched_sim", ...}, ...]}``. Each image goes right before the sentence
it was matched to, as OpenFlamingo's MMC4 loader places it; images whose ``matched_sim`` is
below ``min_sim`` are dropped (OpenFlamingo's ``--mmc4_textsim_threshold`` defaults to 0.24,
open_flamingo/train/train.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.documents import Doc, ImageRef, find_image, numbered_lines

DEFAULT_MIN_SIM = 0.24


def mmc4_docs(path: Path, roots: list[Path], min_sim: float) -> Iterator[Doc]:
    """The documents of one MMC4 ``.jsonl`` file (images resolved against ``roots``)."""
    for n, line in numbered_lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        yield mmc4_doc(f"{path}:{n}", rec, roots, min_sim)


def mmc4_doc(where: str, rec: Any, roots: list[Path], min_sim: float) -> Doc:
    """One MMC4 document -> a :class:`~.documents.Doc` laid out by ``interleaved_sample``."""
    sentences = rec.get("text_list") if isinstance(rec, dict) else None
    infos = rec.get("image_info") if isinstance(rec, dict) else None
    if not isinstance(sentences, list) or not isinstance(infos, list):
        return Doc(where, problem=("bad_row", "needs 'text_list' and 'image_info' lists"))
    texts = [str(s).strip() if s is not None else "" for s in sentences]
    if not any(texts):
        return Doc(where, problem=("empty_text", "every sentence is empty"))
    if not infos:
        return Doc(where, problem=("no_image", "'image_info' is empty"))
    before: dict[int, list[int]] = {}
    images: list[ImageRef] = []
    for info in infos:
        try:
            index, sim = int(info["matched_text_index"]), float(info["matched_sim"])
            name = info["image_name"]
        except (KeyError, TypeError, ValueError):
            images.append(("bad_image_info", "needs image_name, matched_text_index, matched_sim"))
            continue
        if not 0 <= index < len(texts):
            images.append(("bad_image_info", f"matched_text_index {index} out of range"))
        elif sim < min_sim:
            images.append(("below_min_sim", f"{name}: matched_sim {sim:.3f} < {min_sim}"))
        else:
            before.setdefault(index, []).append(len(images))
            images.append(find_image(name, roots))
    parts: list[tuple[str, Any]] = []
    for i, text in enumerate(texts):
        parts += [("image", k) for k in before.get(i, [])]
        if text:
            parts.append(("text", text))
    meta = {"url": rec.get("url")} if rec.get("url") else {}
    return Doc(where, {"parts": parts, "meta": meta}, images, optional=True)
