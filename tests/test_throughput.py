"""ThroughputMonitor logs perf/* keys under a real Trainer; the peak table; bench_train."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from mmpt.batch import ImageTextBatch
from mmpt.throughput import ThroughputMonitor, batch_samples, batch_tokens, peak_flops
from tests.test_contrastive_module import make_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _clip_batches(n: int = 4, b: int = 4) -> list[ImageTextBatch]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 100, (b, 12), generator=g)
    tokens[:, 8:] = 0  # open_clip pads with 0: 8 real tokens per caption
    return [
        ImageTextBatch(torch.randn(b, 3, 32, 32, generator=g), tokens, torch.arange(b))
        for _ in range(n)
    ]


def _fit(model: L.LightningModule, batches: list, monitor: ThroughputMonitor, tmp: Path) -> dict:
    logger = CSVLogger(tmp, name="")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda x: x)
    trainer.fit(model, train_dataloaders=loader)
    return dict(monitor.last)


def test_logs_throughput_without_mfu_on_cpu(tmp_path: Path) -> None:
    last = _fit(make_model(), _clip_batches(), ThroughputMonitor(window=5), tmp_path)
    assert {"perf/samples_per_s", "perf/tokens_per_s", "perf/tflops_per_s"} <= set(last)
    assert "perf/mfu" not in last
    assert 0.0 <= last["perf/data_wait_fraction"] <= 1.0
    # 8 non-pad tokens per caption, one caption per sample
    assert last["perf/tokens_per_s"] == pytest.approx(8 * last["perf/samples_per_s"])
    header = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "perf/samples_per_s" in header and "perf/data_wait_fraction" in header


def test_mfu_with_given_peak(tmp_path: Path) -> None:
    last = _fit(make_model(), _clip_batches(), ThroughputMonitor(peak_tflops=0.5), tmp_path)
    assert last["perf/mfu"] == pytest.approx(last["perf/tflops_per_s"] / 0.5)


class _Plain(L.LightningModule):
    """A model of no mmpt family, on dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.layer(batch["x"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unknown_batches_do_not_crash(tmp_path: Path) -> None:
    batches = [{"x": torch.randn(5, 3)} for _ in range(4)]
    last = _fit(_Plain(), batches, ThroughputMonitor(), tmp_path)
    assert 0.0 <= last["perf/data_wait_fraction"] <= 1.0
    assert "perf/tflops_per_s" not in last and "perf/tokens_per_s" not in last
    assert not any(math.isnan(v) for v in last.values())


def test_batch_counts() -> None:
    batch = _clip_batches(1)[0]
    assert batch_samples(batch) == 4 and batch_tokens(batch) == 32
    assert batch_samples(object()) is None and batch_tokens(object()) is None


def test_peak_table() -> None:
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "16-mixed") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert peak_flops("NVIDIA L4", "bf16-true") == 121e12
    assert peak_flops("NVIDIA L40S", "bf16-mixed") == 362e12
    assert peak_flops("Some Future GPU") is None


def test_bench_train_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "scripts/bench_train.py",
        "--config",
        "configs/quickstart/clip_tiny.yaml",
    ]
    cmd += ["--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]
    cmd += ["--set", "data.init_args.batch_size=8", "--set", "data.init_args.num_workers=0"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "samples/s" in res.stdout and "clip_tiny" in res.stdout
    assert out.exists() and "perf/samples_per_s" in out.read_text()
