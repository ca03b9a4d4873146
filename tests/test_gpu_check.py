"""scripts/gpu_check.sh --smoke: every step runs tiny and leaves its JSON; failures are kept."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs every step of the GPU script on the CPU (~30 CPU-s, minutes of wall)
def test_gpu_check_smoke_writes_every_result(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    cmd = ["bash", "scripts/gpu_check.sh", "--smoke", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = ["pytest_gpu", "attention", "train_clip", "train_mae", "train_vlm"]
    assert list(summary["steps"]) == steps and all(s["ok"] for s in summary["steps"].values())
    assert len(list(out.iterdir())) <= 8  # what comes back from a device run
    attention = json.loads((out / "attention.json").read_text())["result"]
    assert attention["checks_passed"] and attention["results"] and not attention["errors"]
    for name in ("clip", "mae", "vlm"):
        (row,) = json.loads((out / f"train_{name}.json").read_text())["result"]
        assert row["perf/samples_per_s"] > 0 and row["perf/tflops_per_s"] > 0, row
    (vlm,) = json.loads((out / "train_vlm.json").read_text())["result"]
    assert vlm["perf/tokens_per_s"] > vlm["perf/samples_per_s"]  # tokens, not samples


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    fail = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    fine = [sys.executable, "-c", "print('fine')"]
    todo = [("first", fail, 60), ("second", slow, 1), ("third", fine, 60)]
    monkeypatch.setattr(gc, "steps", lambda out, smoke, data: todo)
    assert gc.main(["--out", str(tmp_path)]) == 1
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["returncode"] == 3 and not first["ok"] and "boom" in first["output_tail"]
    assert json.loads((tmp_path / "second.json").read_text())["timed_out"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [s["ok"] for s in summary.values()] == [False, False, True]
