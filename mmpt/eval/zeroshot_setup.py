"""Where zero-shot classes come from, checked on the first samples before any embedding.

Class names: ``--classnames FILE``, else the shards' ``index.json`` ``meta.zeroshot``, else the
names the labels themselves hold (``--label-key json:class`` on web shards or class folders).
Templates: ``--templates FILE``, else the index's, else :data:`DEFAULT_TEMPLATES`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmpt.datamodules.decode import read_class
from mmpt.datamodules.key_check import require_fields
from mmpt.datamodules.stages import DataError

#: CLIP's single prompt, used when neither ``--templates`` nor the index gives templates
#: (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def read_lines(path: str, flag: str) -> list[str]:
    """The non-empty lines of ``path`` (a ``flag`` file).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file has no non-empty line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{flag} {path} is empty: write one entry a line")
    return lines


def zeroshot_setup(
    args: argparse.Namespace,
    meta: dict,
    samples: Sequence[dict[str, Any]],
    label_key: str | None,
    where: str,
) -> dict[str, Any]:
    """Class names and templates, after checking the first samples' labels against them.

    Args:
        args: ``classnames`` and ``templates`` file paths (or None).
        meta: The set's ``index.json`` meta.
        samples: Its first raw samples.
        label_key: The label field (``json:label``, ``json:class`` ...).
        where: The set, for errors.

    Returns:
        ``{"classnames": list or None, "templates": list}``; None class names: take them from
        the labels' names after the pass (:func:`classes_from_names`).

    Raises:
        DataError: No sample has the label field, labels are ids with no class names, or a
            label name is not among the given class names.
    """
    index = meta.get("zeroshot") or {}
    names = read_lines(args.classnames, "--classnames") if args.classnames else None
    names = names or list(index.get("classnames") or []) or None
    if args.templates:
        templates = read_lines(args.templates, "--templates")
    else:
        templates = list(index.get("templates") or DEFAULT_TEMPLATES)
    if not label_key:
        raise DataError("zero-shot classification needs labels: set --label-key (e.g. json:class)")
    require_fields(samples, {"--label-key": label_key}, where)
    labels = [read_class(s, label_key) for s in samples]
    ids = [x for x in labels if isinstance(x, int) and x >= 0]
    given = [x for x in labels if isinstance(x, str)]
    if ids and names is None:
        raise DataError(
            f"{where}: the labels of {label_key!r} are class ids, but no class names are known: "
            "pass --classnames FILE (line i names class i) or add meta.zeroshot to index.json"
        )
    if names is not None:
        if bad := sorted({n for n in given if n not in names}):
            raise DataError(
                f"{where}: labels {bad[:5]} of {label_key!r} are not among the "
                f"{len(names)} class names (--classnames or index.json)"
            )
        if bad_ids := sorted({i for i in ids if i >= len(names)}):
            raise DataError(
                f"{where}: class ids {bad_ids[:5]} of {label_key!r} but only {len(names)} names"
            )
    return {"classnames": names, "templates": templates}


def classes_from_names(
    names: Sequence[str], labels: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    """Sorted class names from per-sample label names, and the labels as their ids.

    Args:
        names: (N,) label name per sample, "" where none.
        labels: (N,) ids already known (-1 where the label was a name).

    Returns:
        ``(classnames, labels)``: labels (N,) long with each name's index in classnames.

    Raises:
        ValueError: No sample had a name.
    """
    classes = sorted({n for n in names if n})
    if not classes:
        raise ValueError("no sample had a class name: check --label-key")
    ids = {c: i for i, c in enumerate(classes)}
    named = torch.tensor([ids.get(n, -1) for n in names], dtype=torch.long)
    return classes, torch.where(named >= 0, named, labels)
