"""scripts/bench_packing.py at a tiny size: all four batchings run and compute the same loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = ["--samples", "200", "--cpu-samples", "16", "--cpu-max-len", "256", "--repeats", "1"]
TINY += ["--hidden", "64", "--layers", "2", "--vocab", "64", "--threads", "1"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_packing", SCRIPTS / "bench_packing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_packing_tiny(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["bench_packing.py", *TINY, "--dense-mask"])
    bench.main()
    out = capsys.readouterr().out
    names = (
        "padded, stream order",
        "padded, HF group_by_length",
        "HF DataCollatorWithFlattening",
        "mmpt pack_stream",
        "mmpt pack_stream, dense block mask (before)",
    )
    for name in names:
        assert f"check: {name}" in out
        assert sum(line.startswith(f"| {name}") for line in out.splitlines()) >= 2  # slots, time
    assert "HF DataCollatorWithFlattening, B=8 | 100.0%" in out
    assert "mmpt speedup" in out


def test_a_leaking_batching_fails_the_loss_check(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    flattened = bench.flattened_steps

    def leaking(*args, **kwargs):  # no position_ids: HF attends across the flattened samples
        return [{k: v for k, v in s.items() if k != "position_ids"} for s in flattened(*args)]

    monkeypatch.setattr(bench, "flattened_steps", leaking)
    monkeypatch.setattr(sys, "argv", ["bench_packing.py", *TINY])
    with pytest.raises(SystemExit, match="check failed: HF DataCollatorWithFlattening"):
        bench.main()
