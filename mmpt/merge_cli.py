"""``mmpt merge``: weighted average of checkpoints of one architecture (model soups, task sums)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmpt.cli_args import Parser
from mmpt.io import atomic_torch_save
from mmpt.safe_load import load_torch_file
from mmpt.user_errors import debug_enabled

#: Training state a merged model must not resume from: optimizer moments and LR schedule of
#: the first run, loop progress, callback state, and the live weights that ``WeightAveraging``
#: (EMA) keeps beside its averaged ``state_dict`` (they would overwrite the merge on resume).
DROPPED_KEYS = (
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "callbacks",
    "current_model_state",
    "averaging_state",
    "native_amp_scaling_state",
)

#: Checkpoint entry recording where a merged checkpoint came from.
MERGE_KEY = "mmpt_merge"

#: Integer buffers that count steps (BatchNorm): they differ between runs, so the first
#: checkpoint's value is kept instead of refusing the merge.
COUNTERS = ("num_batches_tracked",)

log = logging.getLogger("mmpt.merge")


def _load(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``path`` as (state dict, whole Lightning checkpoint or None for a plain state dict).

    Args:
        path: Lightning checkpoint or state dict file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file holds neither a Lightning checkpoint nor a dict of tensors, or
            needs more than plain data to unpickle.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {path!r}")
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(
        f"{path} is neither a Lightning checkpoint (a dict with 'state_dict') "
        "nor a state dict (a dict of tensors)"
    )


def resolve_weights(weights: Sequence[float] | None, n: int, normalize: bool = True) -> list[float]:
    """The weights to apply: equal by default, else checked and (by default) scaled to sum 1.

    Args:
        weights: One weight per checkpoint, or None for equal weights.
        n: Number of checkpoints.
        normalize: Scale the weights to sum to 1. Without it any real weights are allowed,
            negative ones included (task arithmetic: ``base + 1.0 * ft - 1.0 * base``).

    Raises:
        ValueError: Wrong count, negative weights while normalizing, or a zero sum.
    """
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"--weights: got {len(w)} weights for {n} checkpoints")
    if not normalize:
        return w
    if any(x < 0 for x in w):
        raise ValueError(f"--weights: negative weights {w} need --no-normalize")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"--weights: weights {w} sum to 0")
    return [x / total for x in w]


def _check_keys(states: list[dict[str, Any]], paths: Sequence[str]) -> None:
    """Raise ValueError naming the first key one checkpoint lacks or has in excess."""
    first = states[0]
    for path, state in zip(paths[1:], states[1:], strict=True):
        for key in first:
            if key not in state:
                raise ValueError(f"{path} lacks key {key!r} present in {paths[0]}")
        for key in state:
            if key not in first:
                raise ValueError(f"{path} has extra key {key!r} not in {paths[0]}")


def merge_state_dicts(
    states: list[dict[str, Any]], weights: Sequence[float], paths: Sequence[str]
) -> dict[str, Any]:
    """Weighted sum of floating-point tensors; other entries must agree and are copied.

    Sums run in float32 (float64 if any source is float64) and are cast to the dtype of the
    first state dict's tensor.

    Args:
        states: State dicts with the same keys.
        weights: One weight per state dict, applied as given (no normalization here).
        paths: Their file names, for error messages.

    Returns:
        The merged state dict, in the first state dict's key order.

    Raises:
        ValueError: Keys, shapes or non-float tensors differ; the message names the first
            offending key.
    """
    _check_keys(states, paths)
    merged: dict[str, Any] = {}
    for key, ref in states[0].items():
        if not isinstance(ref, torch.Tensor):
            merged[key] = ref
            continue
        tensors = [s[key] for s in states]
        for path, t in zip(paths[1:], tensors[1:], strict=True):
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"shape mismatch at key {key!r}: {tuple(ref.shape)} in {paths[0]} "
                    f"vs {got} in {path}"
                )
        if not ref.is_floating_point():
            for path, t in zip(paths[1:], tensors[1:], strict=True):
                if key.endswith(COUNTERS) and t.dtype == ref.dtype:
                    log.warning("%s differs between checkpoints: %s's value kept", key, paths[0])
                elif t.dtype != ref.dtype or not torch.equal(t, ref):
                    raise ValueError(
                        f"non-float tensor {key!r} ({ref.dtype}) differs between "
                        f"{paths[0]} and {path}: it cannot be averaged"
                    )
            merged[key] = ref.clone()
            continue
        if not all(t.is_floating_point() for t in tensors):
            raise ValueError(f"key {key!r} is floating-point in {paths[0]} but not everywhere")
        acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else None
        acc = torch.zeros(ref.shape, dtype=acc_dtype or torch.float32)
        for w, t in zip(weights, tensors, strict=True):
            acc.add_(t.to(acc.dtype), alpha=w)
        merged[key] = acc.to(ref.dtype)
    return merged


def merge_checkpoints(
    paths: list[str],
    weights: list[float] | None,
    normalize: bool = True,
) -> dict:
    """Average checkpoints of one architecture into a new, weights-only checkpoint.

    Args:
        paths: Lightning ``.ckpt`` files or plain state-dict files (all of one kind).
        weights: One weight per checkpoint; None for equal weights.
        normalize: Scale the weights to sum 1 (see :func:`resolve_weights`).

    Returns:
        For Lightning inputs, the first checkpoint's dict with the merged ``state_dict``,
        without training state (:data:`DROPPED_KEYS`) but with ``hyper_parameters`` and mmpt
        metadata; for state-dict inputs ``{"state_dict": ...}``. Both get
        ``{"mmpt_merge": {"sources": paths, "weights": applied weights, "normalized": bool}}``
        and load with ``model.init_from``, ``mmpt eval --ckpt`` and ``load_from_checkpoint``.

    Raises:
        FileNotFoundError: A checkpoint is missing.
        ValueError: Fewer than 2 checkpoints, mixed kinds, bad weights, or a key, shape or
            non-float tensor mismatch (the message names the first such key).
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"--ckpt: need at least 2 checkpoints to merge, got {len(paths)}")
    applied = resolve_weights(weights, len(paths), normalize)
    loaded = [_load(p) for p in paths]
    kinds = [full is not None for _, full in loaded]
    for path, kind in zip(paths[1:], kinds[1:], strict=True):
        if kind != kinds[0]:
            names = {True: "a Lightning checkpoint", False: "a plain state dict"}
            raise ValueError(f"{path} is {names[kind]} but {paths[0]} is {names[kinds[0]]}")
    merged = merge_state_dicts([s for s, _ in loaded], applied, paths)
    first = loaded[0][1]
    out: dict[str, Any] = {}
    if first is not None:
        out = {k: v for k, v in first.items() if k not in DROPPED_KEYS}
    out["state_dict"] = merged
    out[MERGE_KEY] = {"sources": paths, "weights": applied, "normalized": normalize}
    return out


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mmpt merge",
        description="Weighted average of checkpoints of the same architecture.",
    )
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints to merge (2 or more)")
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, help="one per --ckpt (default: equal)"
    )
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="apply the weights as given (negative allowed: task arithmetic)",
    )
    p.add_argument("--out", required=True, help="merged checkpoint to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mmpt merge --ckpt A B [...] [--weights wA wB ...] [--no-normalize] --out OUT``.

    Returns:
        0 on success, 2 on a usage or input error (one ``error:`` line on stderr).
    """
    args = _parser().parse_args(list(argv) if argv is not None else None)
    normalize = not args.no_normalize
    try:
        out = merge_checkpoints(args.ckpt, args.weights, normalize)
        atomic_torch_save(out, args.out)
    except (FileNotFoundError, ValueError) as e:
        if debug_enabled():  # MMPT_DEBUG=1: the traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    tensors = [v for v in out["state_dict"].values() if isinstance(v, torch.Tensor)]
    averaged = [t for t in tensors if t.is_floating_point()]
    applied = out[MERGE_KEY]["weights"]
    given = args.weights if args.weights is not None else "equal"
    how = "normalized to sum 1" if normalize else "applied as given (not normalized)"
    print(f"merged {len(args.ckpt)} checkpoints -> {args.out}")
    for path, w in zip(args.ckpt, applied, strict=True):
        print(f"  {w:+.6g}  {path}")
    print(f"weights: {given}, {how}")
    print(
        f"tensors: {len(averaged)} averaged, {len(tensors) - len(averaged)} copied; "
        f"{sum(t.numel() for t in averaged):,} averaged values"
    )
    print("optimizer, LR schedule and loop state dropped: use it with model.init_from")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
