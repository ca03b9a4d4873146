"""scripts/bench_mae.py on the CPU at a tiny size: both variants, token counts, JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_mae.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_mae_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--depth", "1"]
    argv += ["--image-size", "64", "--decoder-dim", "32", "--decoder-depth", "1"]
    argv += ["--decoder-heads", "2", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    result = bench.main([*argv, "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result

    # 64 px / patch 16 -> 16 patches; mmpt sees 1 + int(16 * 0.25), the baseline 1 + 16
    checks = result["checks"]
    assert checks["num_patches"] == 16 and checks["prefix_tokens"] == 1
    assert checks["mmpt_encoder_tokens"] == checks["expected_mmpt_tokens"] == 5
    assert checks["full_encoder_tokens"] == 17 and checks["tokens_ok"] is True
    assert checks["hf_encoder_tokens"] == 5  # HF's ViTMAE also encodes the visible patches only
    fractions = {"mmpt_mae": 0.75, "full_sequence": 0.75, "hf_vitmae": 0.75}
    assert checks["masked_fraction"] == fractions
    assert checks["same_initial_weights"] is True
    gflop = checks["gflop_per_step"]  # same shapes as HF's MAE: the same work
    assert gflop["hf_vitmae"] == pytest.approx(gflop["mmpt_mae"], rel=0.02)
    assert gflop["full_sequence"] > 2 * gflop["mmpt_mae"]

    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"mmpt_mae", "full_sequence", "hf_vitmae"}
    assert rows["hf_vitmae"]["encoder_tokens"] == 5
    assert rows["mmpt_mae"]["encoder_tokens"] == 5 and rows["full_sequence"]["encoder_tokens"] == 17
    # same model apart from the baseline's encoder mask token (width 192)
    assert rows["full_sequence"]["params"] - rows["mmpt_mae"]["params"] == 192
    for r in rows.values():
        assert r["steps_timed"] == 2
        assert r["step_ms"] > 0 and r["encoder_fwd_ms"] > 0 and r["images_per_s"] > 0
        assert r["step_ms_q1"] <= r["step_ms"] <= r["step_ms_q3"]
        assert r["step_ms_iqr"] >= 0 and r["encoder_fwd_ms_iqr"] >= 0
        assert r["peak_mib"] is None  # no CUDA memory stats on the CPU
        assert torch.isfinite(torch.tensor(r["final_loss"]))
    assert result["speedup"]["train_step"] > 0 and result["speedup"]["encoder_fwd"] > 0
    assert result["speedup"]["hf_train_step"] > 0 and result["speedup"]["hf_encoder_fwd"] > 0
    q = result["speedup"]["hf_train_step_paired"]
    assert 0 < q["q1"] <= q["median"] <= q["q3"]
    assert result["config"]["encoder_depth"] == 1 and result["config"]["dtype"] == "fp32"
    printed = capsys.readouterr().out
    assert printed.startswith("command: python scripts/bench_mae.py --device cpu")
    assert "= 5 [ok]" in printed and "speedup" in printed
    assert "vs HF ViTMAEForPreTraining" in printed


def test_full_sequence_loss_counts_masked_patches_only() -> None:
    bench = load_bench()
    torch.manual_seed(0)
    tower = bench.TimmVisionTower(
        "vit_tiny_patch16_224", embed_dim=0, image_size=32, feature_layer=-1,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    )  # fmt: skip
    model = bench.FullSequenceMIM(tower, 0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(images)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert torch.equal(mask.sum(1), torch.full((2,), 12.0))
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.all(grad[mask == 0] == 0) and torch.any(grad[mask == 1] != 0)
    # a masked patch's pixels never reach the encoder: changing them leaves the latent as is
    latent = model.encode(images, mask)
    changed = images.clone()
    first = int(mask[0].nonzero()[0])
    r, c = divmod(first, 4)
    changed[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 1.0
    assert torch.allclose(model.encode(changed, mask), latent)


def test_hf_baseline_has_the_same_shapes() -> None:
    bench = load_bench()
    tower = bench.TimmVisionTower(
        "vit_tiny_patch16_224", embed_dim=0, image_size=32, feature_layer=-1,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    )  # fmt: skip
    hf = bench.HFViTMAE(tower, 0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    cfg = hf.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 2, 2)
    assert (cfg.intermediate_size, cfg.patch_size, cfg.image_size) == (128, 8, 32)
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers) == (16, 1)
    loss, pred, mask = hf(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert torch.equal(mask.sum(1), torch.full((2,), 12.0)) and torch.isfinite(loss)
    # encoder parameter count equals timm's apart from HF's fixed (non-learned) position table
    timm_enc = sum(p.numel() for n, p in tower.named_parameters() if "pos_embed" not in n)
    vit = hf.model.vit.named_parameters()
    hf_enc = sum(p.numel() for n, p in vit if "position_embeddings" not in n)
    assert hf_enc == timm_enc
