"""Training guards: skip or stop on non-finite losses/gradients, explain out-of-memory errors."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

log = logging.getLogger("mmpt.guards")

OOM_HINT = (
    "To fit in memory: lower `data.batch_size` and raise `trainer.accumulate_grad_batches` "
    "to keep the global batch; enable activation checkpointing "
    "(`model.llm.init_args.gradient_checkpointing: true`); shard the model with "
    "`trainer.strategy: fsdp`; train in `trainer.precision: bf16-mixed`."
)


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient stopped training (``action="stop"`` or too many skips)."""


def batch_keys(batch: Any) -> list[str]:
    """The sample keys of ``batch`` (``batch.keys`` or ``batch["keys"]``), else ``[]``."""
    keys = batch.get("keys") if isinstance(batch, Mapping) else getattr(batch, "keys", None)
    return [str(k) for k in keys] if isinstance(keys, (list, tuple)) else []


def describe_batch(batch: Any, limit: int = 24) -> str:
    """One line per tensor of ``batch``, e.g. ``images (256, 3, 224, 224) uint8``.

    Args:
        batch: A batch dataclass, mapping, sequence or tensor.
        limit: Most tensors listed.
    """
    found: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if len(found) > limit:
            return
        if isinstance(obj, torch.Tensor):
            dtype = str(obj.dtype).removeprefix("torch.")
            found.append(f"{name or 'tensor'} {tuple(obj.shape)} {dtype}")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{name}.{f.name}" if name else f.name)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(batch, "")
    lines = found[:limit] + (["..."] if len(found) > limit else [])
    keys = batch_keys(batch)
    head = f"{type(batch).__name__}" + (f" with {len(keys)} keys" if keys else "")
    return "\n".join([head] + [f"  {line}" for line in lines])


def _show_keys(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def _grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """A 0-d bool tensor: all gradients of ``optimizer``'s parameters are finite (None: none)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                by_device.setdefault(g.device, []).append(g.detach())
    flags = []
    for grads in by_device.values():
        norms = torch._foreach_norm(grads, math.inf)  # max |g|: NaN/inf propagate, no overflow
        flags.append(torch.isfinite(torch.stack([n.float() for n in norms])).all())
    if not flags:
        return None
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _reduce_max(flag: torch.Tensor) -> None:
    """All-reduce ``flag`` in place with max over ranks, when ``torch.distributed`` runs."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)


class NonFiniteGuard(L.Callback):
    """Skips (or stops on) optimizer steps whose loss or gradients are NaN/inf.

    Checks, with one host sync per optimizer step: every micro-batch's loss
    (``on_before_backward``) and, with ``check_grads``, every gradient just before the step
    (``on_before_optimizer_step``, after backward of the last micro-batch). When one is
    non-finite:

    - ``"skip"``: every gradient of the optimizer is set to ``None``, so ``optimizer.step()``
      leaves the weights *and* the optimizer state untouched (torch optimizers skip parameters
      without a gradient: AdamW neither moves them, nor decays them, nor advances their
      ``exp_avg``/``exp_avg_sq``/``step``). Lightning still counts the step: ``global_step``
      and step-wise LR schedulers advance by one. A warning names the step, the loss and the
      first 10 keys of the bad micro-batch(es); ``guard/nonfinite_skipped`` logs the total.
      More than ``max_skips`` consecutive skipped steps raise :class:`NonFiniteLossError`.
    - ``"stop"``: raise :class:`NonFiniteLossError` naming the step, loss and keys, before
      the weights change.

    Gradient accumulation: backward of a NaN micro-batch poisons the accumulated gradients,
    so the whole accumulated step (all ``accumulate_grad_batches`` micro-batches) is skipped.
    DDP / FSDP: the verdict is all-reduced (max) when ``torch.distributed`` is initialised,
    so all ranks skip or stop together. ``precision: 16-mixed``: the GradScaler already
    skips steps with inf gradients (overflow, part of its normal working) and the loss it
    shows is scaled, so only NaN losses count there and gradients are not checked.

    Args:
        action: ``"skip"`` the step or ``"stop"`` training.
        max_skips: Consecutive skipped steps tolerated; one more stops training.
        check_grads: Also check gradients (catches a finite loss with NaN/inf gradients).
    """

    def __init__(self, action: str = "skip", max_skips: int = 10, check_grads: bool = True) -> None:
        if action not in ("skip", "stop"):
            raise ValueError(f"NonFiniteGuard action must be 'skip' or 'stop', got {action!r}")
        if max_skips < 0:
            raise ValueError(f"NonFiniteGuard max_skips must be >= 0, got {max_skips}")
        self.action = action
        self.max_skips = max_skips
        self.check_grads = check_grads
        self.skipped = 0
        self.consecutive = 0
        self._keys: list[str] = []
        self._batch_idx = -1
        self._window: list[tuple[int, list[str], torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch's keys (for messages)."""
        self._keys, self._batch_idx = batch_keys(batch), batch_idx

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Record the micro-batch's loss (no host sync here)."""
        self._window.append((self._batch_idx, self._keys, loss.detach()))

    def _scaler(self, trainer: L.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Decide (all ranks together) whether this step is finite; skip or stop if not."""
        window, self._window = self._window, []
        scaler = self._scaler(trainer)
        bad_fn = torch.isnan if scaler is not None else (lambda t: ~torch.isfinite(t))
        flags = [bad_fn(loss.float()).any() for _, _, loss in window]
        grads_ok = None if scaler is not None or not self.check_grads else _grads_finite(optimizer)
        if grads_ok is not None:
            flags.append(~grads_ok)
        if not flags:
            return
        flag = torch.stack([f.to(pl_module.device) for f in flags]).any().to(torch.int32)
        _reduce_max(flag)
        if not flag.item():
            self.consecutive = 0
            pl_module.log("guard/nonfinite_skipped", float(self.skipped), batch_size=1)
            return
        bad = [(i, k, loss) for i, k, loss in window if not torch.isfinite(loss).all()]
        if bad:
            what = "loss " + ", ".join(
                f"{loss.float().sum().item():g} (batch {i})" for i, _, loss in bad
            )
        elif grads_ok is not None and not grads_ok:
            what = "non-finite gradients (finite loss)"
        else:
            what = "non-finite loss or gradients on another rank"
        keys = [k for _, ks, _ in (bad or window) for k in ks]
        where = f"step {trainer.global_step}: {what}; keys: {_show_keys(keys) or '(none)'}"
        if self.action == "stop":
            raise NonFiniteLossError(f"Non-finite training {where}")
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_skips:
            raise NonFiniteLossError(
                f"Stopping after {self.consecutive} consecutive non-finite steps (max_skips="
                f"{self.max_skips}); last at {where}"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        rank_zero_warn(f"NonFiniteGuard skipped optimizer step at {where}")
        pl_module.log("guard/nonfinite_skipped", float(self.skipped), batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """Skip counters, saved in checkpoints."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the skip counters."""
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def is_oom(exception: BaseException) -> bool:
    """Whether ``exception`` is a (CUDA) out-of-memory error."""
    if isinstance(exception, torch.OutOfMemoryError):
        return True
    return isinstance(exception, RuntimeError) and "out of memory" in str(exception)


def memory_stats(device: torch.device | None = None) -> str:
    """CUDA allocated / reserved / max allocated / total memory, in GiB ('' without CUDA)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return ""
    gib = 1024**3
    allocated = torch.cuda.memory_allocated(device) / gib
    reserved = torch.cuda.memory_reserved(device) / gib
    peak = torch.cuda.max_memory_allocated(device) / gib
    total = torch.cuda.get_device_properties(device).total_memory / gib
    return (
        f"CUDA memory on {device or 'cuda'}: allocated {allocated:.2f} GiB, reserved "
        f"{reserved:.2f} GiB, max allocated {peak:.2f} GiB, total {total:.2f} GiB"
    )


class OOMReporter(L.Callback):
    """Explains an out-of-memory error in training: what was in memory and what to change.

    The report names the last training batch (class and tensor shapes, e.g.
    ``images (256, 3, 224, 224) uint8``), the step, the CUDA memory stats and what to change
    (:data:`OOM_HINT`). It is logged as an error and attached to the exception as a note, so it
    is printed with the traceback; Lightning's own exception handling then runs unchanged (no
    private Lightning API is used). Only the description of each batch is kept, not the batch.
    """

    def __init__(self) -> None:
        self.last_batch = "(no training batch yet)"
        self.last_batch_idx = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Describe the batch (shapes only) for a later report."""
        self.last_batch, self.last_batch_idx = describe_batch(batch), batch_idx

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> str:
        """The full out-of-memory message."""
        parts = [
            f"Out of memory at global step {trainer.global_step} (batch {self.last_batch_idx}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            f"Last training batch: {self.last_batch}",
            memory_stats(pl_module.device),
            OOM_HINT,
        ]
        return "\n".join(p for p in parts if p)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Log the report and attach it to the exception (printed with its traceback)."""
        if not is_oom(exception) or getattr(exception, "_mmpt_oom_reported", False):
            return
        message = self.report(trainer, pl_module, exception)
        log.error("%s", message)
        if hasattr(exception, "add_note"):  # Python 3.11+
            exception.add_note(message)
        exception._mmpt_oom_reported = True  # type: ignore[attr-defined]
