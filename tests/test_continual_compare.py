"""scripts/continual_compare.py (table, plot, metric reading) and scripts/bench_lora_memory.py
(the settings it compares)."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

from mmpt.synth.vocab import write_synth_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _metrics_csv(folder: Path, a: float, b: float) -> None:
    folder.mkdir(parents=True)
    cols = ["step", "val/A/retrieval/t2i/R@1", "val/A/retrieval/i2t/R@1", "val/B/retrieval/t2i/R@1"]
    rows = [[0, 0.1, 0.1, 0.0], [5, a, a + 0.1, ""], [9, "", "", b]]
    lines = [",".join(cols)] + [",".join(str(x) for x in r) + ",0.5" for r in rows]
    lines[0] += ",val/B/retrieval/i2t/R@1"
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_scores_table_and_plot(tmp_path: Path) -> None:
    cc = _script("continual_compare")
    _metrics_csv(tmp_path / "base" / "version_0", a=0.6, b=0.2)
    _metrics_csv(tmp_path / "lora" / "version_0", a=0.5, b=0.4)
    base, lora = cc.last_values(tmp_path / "base"), cc.last_values(tmp_path / "lora")
    assert base["val/A/retrieval/t2i/R@1"] == 0.6 and base["val/B/retrieval/t2i/R@1"] == 0.2
    assert cc.score(lora, "A", cc.METRICS) == pytest.approx((0.5 + 0.6) / 2)
    with pytest.raises(KeyError, match="not logged"):
        cc.score(lora, "C", cc.METRICS)
    rows = [
        {"setting": "base (A model)", "A": 0.65, "B": 0.35, "forgetting": 0.0, "gain": 0.0},
        {"setting": "lora", "A": 0.55, "B": 0.45, "forgetting": 0.1, "gain": 0.1,
         "trainable_share": 0.05, "seconds": 12.0},
    ]  # fmt: skip
    cc.write_reports(rows, tmp_path, cc.METRICS, "cfg.yaml", ["--trainer.max_epochs", "1"])
    table = (tmp_path / "continual_compare.md").read_text()
    assert "| lora | 0.550 | 0.450 | +0.100 | +0.100 | 5.0% | 12 |" in table
    assert json.loads((tmp_path / "continual_compare.json").read_text())["rows"][1]["gain"] == 0.1
    assert (tmp_path / "continual_compare.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        cc.last_values(tmp_path / "missing")


def test_lora_bench_trains_far_fewer_weights() -> None:
    bench = _script("bench_lora_memory")
    with tempfile.TemporaryDirectory() as tmp:
        tok = str(write_synth_tokenizer(Path(tmp)))
        full, lora = bench.build("full", tok), bench.build("lora", tok)
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (full, lora)]
    assert count[1] < 0.2 * count[0]
    assert all(not p.requires_grad for n, p in lora.named_parameters() if n.startswith("vision."))
    assert any("lora_A" in n for n, p in lora.named_parameters() if p.requires_grad)


#: The small CPU scale the comparison was measured at (the report's command).
A_RUN = ["--trainer.max_epochs", "2", "--data.init_args.batch_size", "64",
         "--model.init_args.lr_schedule.init_args.warmup_steps", "20"]  # fmt: skip
SMALL = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "25",
         "--trainer.check_val_every_n_epoch", "2", "--data.init_args.batch_size", "64",
         "--model.init_args.lr_schedule.init_args.warmup_steps", "5"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_comparison_learns_b_and_full_updates_forget_a(tmp_path: Path, monkeypatch) -> None:
    """The measured directions: every update method gains on B; full fine-tuning forgets A."""
    from mmpt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    assert main(["fit", "-c", "configs/quickstart/clip_tiny.yaml", *A_RUN]) == 0
    cc = _script("continual_compare")
    monkeypatch.setattr(cc, "REPO", tmp_path)
    rows = cc.compare("configs/quickstart/continual_tiny.yaml", list(cc.SETTINGS),
                      tmp_path / "compare", SMALL, cc.METRICS)  # fmt: skip
    by_name = {r["setting"]: r for r in rows}
    assert all(r["gain"] > 0 for r in rows[1:]), rows
    assert by_name["full"]["forgetting"] > 0, rows
