"""scripts/bench_memory.py on the CPU at tiny batches: settings, one in-process measurement,
the Markdown table, and (slow) the whole run with one subprocess per setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_TEXT, TINY_VISION

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path: Path) -> str:
    """A recipe with the tests' tiny towers (the quickstart's text tower takes long to build)."""
    towers = {"vision": TINY_VISION, "text": TINY_TEXT}
    model = {"class_path": "mmpt.models.contrastive.ContrastiveModule", "init_args": towers}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return str(path)


def test_grad_cache_comparison_and_one_measurement(tmp_path: Path) -> None:
    bench = load_bench()
    argv = ["--batches", "8", "16", "--chunk", "4", "--steps", "1", "--warmup", "0"]
    args = bench.parse([*argv, "--config", tiny_config(tmp_path)])
    settings = bench.COMPARISONS["grad_cache"](args)
    assert [s["batch"] for s in settings] == [8, 8, 16, 16]
    assert [s["model"].get("grad_cache") for s in settings] == [None, {"chunk_size": 4}] * 2
    row = bench.measure(settings[1], args)
    assert row["setting"] == "batch 8, grad cache 4" and row["ms_median"] > 0
    assert row["peak_mib"] > row["step_peak_mib"] >= 0 and row["memory"] == "cpu ru_maxrss"
    assert row["trainable"] == row["params"] > 0
    table = bench.markdown(
        [row, {"setting": "batch 9", "batch": 9, "oom": True, "error": "x"}], "cpu"
    )
    assert "| batch 8, grad cache 4 |" in table and "| batch 9 | OOM |" in table


@pytest.mark.slow  # two fresh Python processes
def test_main_writes_json_and_markdown(tmp_path: Path) -> None:
    bench = load_bench()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--batches", "8", "--chunk", "4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--config", tiny_config(tmp_path), "--compare", "grad_cache"]
    assert bench.main([*argv, "--json", str(out), "--markdown", str(md)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in rows] == ["batch 8", "batch 8, grad cache 4"]
    assert all(r["step_peak_mib"] >= 0 for r in rows)
    assert md.read_text().count("| batch 8") == 2


@pytest.mark.slow  # four fresh Python processes, two of them build the tiny VLM
def test_one_report_holds_grad_cache_and_full_vs_lora(tmp_path: Path) -> None:
    bench = load_bench()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--batches", "8", "--chunk", "4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--rows", "2", "--config", tiny_config(tmp_path)]
    assert bench.main([*argv, "--json", str(out), "--markdown", str(md)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["compare"], r["setting"]) for r in rows] == [
        ("grad_cache", "batch 8"), ("grad_cache", "batch 8, grad cache 4"),
        ("full_vs_lora", "full"), ("full_vs_lora", "lora"),
    ]  # fmt: skip
    full, lora = rows[2:]
    assert lora["trainable"] < full["trainable"] and lora["adapter_tensors"] > 0
    text = md.read_text()
    assert "### grad_cache" in text and "### full_vs_lora" in text and "| lora | cpu |" in text
