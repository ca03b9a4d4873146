"""Shared benchmark harness: numerical checks, synchronized timing, JSON written as it grows.

A benchmark script builds its methods (zero-argument callables), checks them against a
baseline, times them side by side with :func:`time_methods` and adds rows to a
:class:`ResultLog`, which rewrites its JSON file after every addition, so a run that dies
later keeps what it measured. Every exception of a method is recorded with the method (OOM
flagged as such); it never stops the other methods.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def short(x: torch.dtype | torch.device) -> str:
    """``bfloat16`` for ``torch.bfloat16``; ``cuda:0`` for a device."""
    return str(x).replace("torch.", "")


def describe(err: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


@dataclass
class Check:
    """One numerical comparison on real tokens."""

    level: str
    name: str
    max_abs_diff: float
    bound: float
    ref_max_abs: float
    dtype: str

    @property
    def passed(self) -> bool:
        """Finite and within the bound."""
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.bound

    def row(self) -> dict[str, Any]:
        """The JSON form."""
        return {**self.__dict__, "passed": self.passed}


def compare(
    level: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]
) -> Check:
    """max |got - ref| against ``atol + rtol * max |ref|``."""
    diff = (got.float() - ref.float()).abs().max().item()
    ref_max = ref.float().abs().max().item()
    return Check(level, name, diff, tol[0] + tol[1] * ref_max, ref_max, short(got.dtype))


class ResultLog:
    """The benchmark's JSON document, rewritten to ``path`` after every change."""

    def __init__(self, path: str | None, **header: Any) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {**header, "checks": [], "results": [], "errors": []}
        self.data["skipped"] = []
        self.write()

    def check(self, check: Check) -> bool:
        """Record a check; whether it passed."""
        self.data["checks"].append(check.row())
        self.write()
        return check.passed

    def error(self, where: str, err: BaseException) -> None:
        """Record an exception (type, message, traceback tail) and where it happened."""
        tb = traceback.format_exception(type(err), err, err.__traceback__)
        self.data["errors"].append(
            {"where": where, "error": describe(err), "traceback": "".join(tb)[-2000:]}
        )
        self.write()

    def skip(self, level: str, method: str, reason: str) -> None:
        """Record a method that was not run, and why."""
        self.data["skipped"].append({"level": level, "method": method, "reason": reason})
        self.write()

    def results(self, rows: list[dict[str, Any]]) -> None:
        """Record timing rows."""
        self.data["results"] += rows
        self.write()

    def write(self) -> None:
        """Rewrite the JSON file atomically (a reader never sees half a file)."""
        self.data["checks_passed"] = all(c["passed"] for c in self.data["checks"])
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Timing:
    """Per-step wall times (s), peak extra CUDA memory (bytes) and the error, of one method."""

    times: list[float] = field(default_factory=list)
    peak: int = 0
    error: str | None = None
    oom: bool = False


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(
    fn: Callable[[], Any], device: torch.device, timing: Timing, setup: Callable[[], Any] | None
) -> float | None:
    """One synchronized step (``setup`` first, untimed); seconds, or None on any exception."""
    cuda = device.type == "cuda"
    try:
        if setup is not None:
            setup()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 (recorded with the method; the others go on)
        timing.error, timing.oom = describe(err), isinstance(err, torch.OutOfMemoryError)
        if cuda:
            torch.cuda.empty_cache()
        return None
    if cuda:
        timing.peak = max(timing.peak, torch.cuda.max_memory_allocated(device) - base)
    return dt


def time_methods(
    fns: dict[str, Callable[[], Any]],
    steps: int,
    warmup: int,
    device: torch.device,
    setup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Timing]:
    """Warm each method up, then time ``steps`` steps of each, interleaved, order alternating.

    ``setup[name]`` runs untimed before each step of ``name`` (e.g. switching attention). A
    method stops at its first exception, which its :class:`Timing` keeps.
    """
    res = {name: Timing() for name in fns}
    setup = setup or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if run_step(fn, device, res[name], setup.get(name)) is None:
                break
    names = list(fns)
    for step in range(steps):
        for name in names if step % 2 == 0 else reversed(names):
            if res[name].error is None:
                dt = run_step(fns[name], device, res[name], setup.get(name))
                if dt is not None:
                    res[name].times.append(dt)
    return res


def result_rows(
    level: str,
    pass_: str,
    timings: dict[str, Timing],
    backends: dict[str, str],
    tokens: int,
    baseline: str,
    cuda: bool,
) -> list[dict[str, Any]]:
    """One JSON/table row per method; speedup = baseline ms / method ms."""
    base = timings.get(baseline)
    base_ms = 1e3 * statistics.median(base.times) if base and base.times else None
    rows = []
    for name, t in timings.items():
        ms = 1e3 * statistics.median(t.times) if t.times else None
        rows.append(
            {
                "level": level,
                "pass": pass_,
                "method": name,
                "backend": backends[name],
                "ms": ms,
                "ms_min": 1e3 * min(t.times) if t.times else None,
                "ms_max": 1e3 * max(t.times) if t.times else None,
                "steps_timed": len(t.times),
                "real_tokens": tokens,
                "tokens_per_s": tokens / (ms / 1e3) if ms else None,
                "peak_mib": t.peak / 2**20 if cuda and t.error is None else None,
                "speedup": base_ms / ms if base_ms and ms else None,
                "oom": t.oom,
                "error": t.error,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """The timing rows as a Markdown table."""
    out = [
        "| level | pass | method | backend | ms/step median (min-max) | real tok/s "
        f"| peak MiB | speedup vs {baseline} |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["ms"] is None:
            timing, rate, speed = ("OOM" if r["oom"] else f"error: {r['error']}"), "-", "-"
        else:
            timing = f"{r['ms']:.3f} ({r['ms_min']:.3f}-{r['ms_max']:.3f})"
            rate = f"{r['tokens_per_s']:,.0f}"
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        out.append(
            f"| {r['level']} | {r['pass']} | {r['method']} | {r['backend']} | {timing} | "
            f"{rate} | {peak} | {speed} |"
        )
    return "\n".join(out)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, CPU/GPU and load: what a benchmark row needs to be read later."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xformers": None,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        pass
    return info
