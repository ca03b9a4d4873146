"""Throughput accounting: samples/s, non-pad tokens/s, data-wait fraction, TFLOP/s and MFU."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import lightning as L
import torch

log = logging.getLogger("mmpt.throughput")

#: Dense (no sparsity) peak TFLOP/s per GPU: (bf16/fp16 tensor, tf32 tensor, fp32), from the
#: NVIDIA datasheets (H100/H200 Tensor Core GPU, A100 80GB, L4, L40S, A10, V100). Sparsity
#: figures in the datasheets are twice these. Matched by substring of the device name, in order.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], tuple[float, float, float]], ...] = (
    (("H100", "PCIE"), (756.0, 378.0, 51.0)),
    (("H100", "NVL"), (835.0, 418.0, 60.0)),
    (("H100",), (989.0, 495.0, 67.0)),  # SXM5
    (("H200", "NVL"), (835.0, 418.0, 60.0)),
    (("H200",), (989.0, 495.0, 67.0)),  # SXM5
    (("GH200",), (989.0, 495.0, 67.0)),
    (("A100",), (312.0, 156.0, 19.5)),  # SXM4 and PCIe
    (("L40S",), (362.0, 183.0, 91.6)),
    (("L4",), (121.0, 60.0, 30.3)),
    (("A10",), (125.0, 62.5, 31.2)),
    (("V100",), (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 or tf32
)


def _precision_column(precision: str | None) -> int:
    """0 for 16-bit precisions, 1 for tf32, 2 for full fp32 matmuls."""
    p = str(precision or "").lower()
    if "16" in p:
        return 0
    if "tf32" in p:
        return 1
    if "fp32" in p or "32" in p or not p:
        return 1 if torch.get_float32_matmul_precision() != "highest" else 2
    return 0


def peak_flops(
    device: torch.device | str | None, precision: str | None = "bf16-mixed"
) -> float | None:
    """Peak dense FLOP/s of one device at a training precision, None when unknown (CPU).

    Args:
        device: Torch device (or its name, ``"cuda:0"``); a CUDA device is looked up by
            ``torch.cuda.get_device_name``, any other string as a device name.
        precision: Lightning precision (``bf16-mixed``, ``16-mixed``, ``32-true``) or ``bf16``,
            ``tf32``, ``fp32``. fp32 counts as tf32 unless ``float32_matmul_precision`` is
            ``highest``.

    Returns:
        FLOP/s (not TFLOP/s), or None for CPUs and unlisted GPUs.
    """
    dev = str(device) if device is not None else ""
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(torch.device(dev))
    elif dev == "cpu" or dev.startswith(("cpu", "mps")):
        return None
    else:
        name = dev
    upper = name.upper().replace("-", " ")
    for keys, peaks in PEAK_TFLOPS:
        if all(k in upper.split() or (k != "L4" and k in upper) for k in keys):
            return peaks[_precision_column(precision)] * 1e12
    return None


def batch_samples(batch: Any) -> int | None:
    """Samples of a batch: ``num_samples`` (packed rows) or ``len(batch)``; None if unknown."""
    n = getattr(batch, "num_samples", None)
    if n:
        return int(n)
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else None
    try:
        return len(batch)
    except TypeError:
        return None


def batch_tokens(batch: Any, pad_id: int | None = 0) -> int | None:
    """Non-pad text tokens: ``num_real_tokens`` of packed rows, else ``text_tokens != pad_id``.

    None when the batch has no text (images, speech) or ``pad_id`` is None.
    """
    real = getattr(batch, "num_real_tokens", None)
    if real:
        return int(real)
    tokens = getattr(batch, "text_tokens", None)
    if not torch.is_tensor(tokens) or tokens.numel() == 0 or pad_id is None:
        return None
    return int((tokens != pad_id).sum())


def _pad_id(pl_module: L.LightningModule) -> int | None:
    """The text tower's pad id (HF tokenizers); 0 for open_clip (pads with 0), else None."""
    text = getattr(pl_module, "text", None)
    if text is None:
        return None
    pad = getattr(text, "pad_id", None)
    return int(pad) if pad is not None else 0


class ThroughputMonitor(L.Callback):
    """Logs training throughput and model FLOPs utilisation, averaged over a sliding window.

    Per training batch, ``wait`` is the time from the previous batch's ``on_train_batch_end``
    (or the end of validation) to ``on_train_batch_start`` (the data loader), ``step`` from
    there to ``on_train_batch_end`` (forward, backward, optimizer; CUDA synchronised). Over the
    last ``window`` batches (the first batch of an epoch is not counted: it includes loader
    start-up), with ``time = sum(wait + step)``:

    - ``perf/samples_per_s`` = samples / time, ``perf/tokens_per_s`` = non-pad text tokens /
      time (``num_real_tokens`` of VLM rows, ``text_tokens != pad`` of captions; not logged for
      text-free batches), ``perf/tflops_per_s`` = :func:`~mmpt.models.flops.train_flops` /
      time / 1e12: each summed over ranks;
    - ``perf/data_wait_fraction`` = sum(wait) / time, in [0, 1], mean over ranks;
    - ``perf/mfu`` = tflops_per_s / (world_size * peak), when a peak is known: ``peak_tflops``
      or :func:`peak_flops` of the device (CPU: not logged, said once).

    Batches of unknown types log what can be counted (time, samples if ``len`` works).

    Args:
        window: Batches averaged.
        peak_tflops: Peak TFLOP/s of one device (overrides the table).
        log_every_n_steps: Batches between logs (and the rank all-reduce); default the
            trainer's ``log_every_n_steps``.
    """

    def __init__(
        self,
        window: int = 20,
        peak_tflops: float | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.peak_tflops = peak_tflops
        self.log_every_n_steps = log_every_n_steps
        self._rows: deque[tuple[float, ...]] = deque(maxlen=window)
        self._prev_end: float | None = None
        self._start = 0.0
        self._batches = 0
        self._peak: float | None = None
        self._flops_ok = True
        self.last: dict[str, float] = {}

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the device peak (said once when MFU cannot be logged)."""
        if self.peak_tflops is not None:
            self._peak = self.peak_tflops * 1e12
        else:
            self._peak = peak_flops(pl_module.device, str(trainer.precision))
            if self._peak is None and trainer.is_global_zero:
                log.info(
                    "perf/mfu not logged: no peak FLOP/s known for %s (CPU or unlisted GPU); "
                    "pass ThroughputMonitor(peak_tflops=...) to log it",
                    pl_module.device,
                )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The first batch's wait includes loader start-up: not measured."""
        self._prev_end = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation time is not data wait: restart the clock."""
        self._prev_end = self._now(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the data wait since the previous batch ended."""
        self._start = self._now(pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Add the batch to the window; log the window's averages every n batches."""
        end = self._now(pl_module)
        prev, self._prev_end = self._prev_end, end
        if prev is None:
            return
        wait, step = max(0.0, self._start - prev), end - self._start
        samples, tokens = batch_samples(batch), batch_tokens(batch, _pad_id(pl_module))
        flops = None
        if self._flops_ok:
            try:
                from mmpt.models.flops import train_flops

                flops = train_flops(pl_module, batch)
            except Exception as err:  # unknown family or batch: log the rest
                self._flops_ok = False
                log.info("perf/tflops_per_s not logged: %s", err)
        nan = float("nan")
        row = (wait, step, *(nan if v is None else float(v) for v in (samples, tokens, flops)))
        self._rows.append(row)
        self._batches += 1
        every = self.log_every_n_steps or max(1, trainer.log_every_n_steps)
        if self._batches % every == 0 or not self.last:
            self.last = self._reduce(trainer)
        for key, value in self.last.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    def _reduce(self, trainer: L.Trainer) -> dict[str, float]:
        """Window sums over ranks -> the logged values."""
        cols = torch.tensor(list(zip(*self._rows, strict=True)), dtype=torch.float64)
        sums = cols.sum(dim=1)
        valid = ~cols.isnan().any(dim=1)  # a column with one unknown batch is not logged
        local_time = float(sums[0] + sums[1])
        rates = torch.where(valid[2:], sums[2:] / max(local_time, 1e-12), 0.0)
        stats = torch.cat([rates, (sums[0] / max(local_time, 1e-12)).view(1)])
        world = max(1, trainer.world_size)
        if world > 1:
            stats = trainer.strategy.reduce(stats.float(), reduce_op="sum").double().cpu()
        out = {"perf/data_wait_fraction": float(stats[3]) / world}
        names = ("perf/samples_per_s", "perf/tokens_per_s", "perf/tflops_per_s")
        for i, name in enumerate(names):
            if valid[2 + i]:
                out[name] = float(stats[i]) / (1e12 if i == 2 else 1.0)
        if "perf/tflops_per_s" in out and self._peak:
            out["perf/mfu"] = out["perf/tflops_per_s"] * 1e12 / (world * self._peak)
        return out
