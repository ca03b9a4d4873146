"""MultiTaskModule (MTP): one step carries every task's gradient, single-task fine-tuning from
an MTP checkpoint, ``mmpt eval segment|detect``, and (slow) the CPU quickstart learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmpt.datamodules.dense import DenseSample, collate_dense
from mmpt.models.dense.instance import MaskRCNNHead
from mmpt.models.dense.rotated import RotatedFCOSHead
from mmpt.models.dense.semseg import UPerNetHead
from mmpt.models.encoders import TimmVisionTower
from mmpt.models.mtp import MultiTaskModule
from mmpt.shards.dense_format import encode_dense_sample
from mmpt.synth.rs_dense import render_dense_tile

ROOT = Path(__file__).resolve().parents[1]
TOWER = {
    "model_name": "vit_tiny_patch16_224",
    "image_size": 32,
    "embed_dim": 0,
    "feature_layer": -1,
    "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
INSTANCE = {
    "num_classes": 2,
    "in_channels": 16,
    "anchor_sizes": [8, 16, 32, 64],
    "rpn_pre_nms_top_n": [50, 50],
    "rpn_post_nms_top_n": [20, 20],
    "box_batch_size_per_image": 16,
    "representation_size": 32,
    "mask_channels": 8,
}
HEADS = {
    "semseg": (UPerNetHead, {"num_classes": 5, "in_channels": 16, "channels": 16}),
    "instance": (MaskRCNNHead, INSTANCE),
    "rotated": (RotatedFCOSHead, {"num_classes": 2, "in_channels": 16, "num_convs": 1}),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (several fight over a shared CPU, ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(tasks: tuple[str, ...] = ("semseg", "instance", "rotated"), **kw) -> MultiTaskModule:
    heads = {t: cls(**args) for t, (cls, args) in HEADS.items() if t in tasks}
    return MultiTaskModule(TimmVisionTower(**TOWER), pyramid_channels=16, **heads, **kw)


def make_batch(tasks: list[str], seed: int = 0):
    """One tile per entry of ``tasks``, holding only that task's annotation."""
    rng = np.random.default_rng(seed)
    items = []
    for i, task in enumerate(tasks):
        t = render_dense_tile(rng, 32)
        sample = encode_dense_sample(
            f"{i:03d}",
            t["image"],
            t["mask"] if task == "semseg" else None,
            t["instances"] if task == "instance" else None,
            t["obbs"] if task == "rotated" else None,
        )
        items.append(DenseSample(32, train=False)(sample))
    batch = collate_dense(items)
    batch.images = (batch.images.float() / 255 - 0.5) / 0.25
    return batch


def test_one_step_sums_weighted_losses_with_every_tasks_gradient() -> None:
    torch.manual_seed(0)
    model = make_model(loss_weights={"semseg": 2.0, "rotated": 0.5})
    batch = make_batch(["semseg", "instance", "rotated", "semseg", "instance", "rotated"])
    torch.manual_seed(1)
    losses = model.task_losses(batch)
    expected = 2.0 * losses["semseg"] + losses["instance"] + 0.5 * losses["rotated"]
    assert {"semseg", "instance", "rotated", "instance/loss_mask", "rotated/loss_rcls"} <= set(
        losses
    )
    torch.manual_seed(1)  # the same RPN/RoI sampling
    total = model.training_step(batch, 0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    for name in ("vision", "pyramid", "semseg", "instance", "rotated"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name  # each task reached
    # a batch without instances or boxes: those heads get zero (not missing) gradients
    model.zero_grad()
    model.training_step(make_batch(["semseg", "semseg"]), 0).backward()
    rot = [p.grad for p in model.rotated.parameters()]
    assert all(g is not None and not g.any() for g in rot)
    assert any(p.grad.any() for p in model.vision.parameters())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MultiTaskModule(TimmVisionTower(**TOWER))
    with pytest.raises(ValueError, match="in_channels=16.*pyramid_channels"):
        MultiTaskModule(TimmVisionTower(**TOWER), semseg=UPerNetHead(3, 16, 16))
    with pytest.raises(ValueError, match="unknown tasks"):
        make_model(("semseg",), loss_weights={"segmentation": 1.0})


def _save(model: MultiTaskModule, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2"}, path)
    return path


def test_single_task_finetune_initialises_from_mtp_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mtp = make_model()
    ckpt = _save(mtp, tmp_path / "mtp.ckpt")
    torch.manual_seed(1)
    single = make_model(("semseg",), init_from=str(ckpt))
    before = single.vision.model.blocks[0].attn.qkv.weight.clone()
    single.configure_model()
    assert not torch.equal(before, single.vision.model.blocks[0].attn.qkv.weight)
    for name in ("vision", "pyramid", "semseg"):
        for key, value in getattr(single, name).state_dict().items():
            torch.testing.assert_close(value, getattr(mtp, name).state_dict()[key])


def _config(tmp_path: Path, val: Path) -> Path:
    heads = {
        t: {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": args}
        for t, (cls, args) in HEADS.items()
    }
    cfg = {
        "model": {
            "class_path": "mmpt.models.mtp.MultiTaskModule",
            "init_args": {
                "vision": {
                    "class_path": "mmpt.models.encoders.TimmVisionTower",
                    "init_args": TOWER,
                },
                "pyramid_channels": 16,
                **heads,
            },
        },
        "data": {
            "class_path": "mmpt.datamodules.dense.DenseDataModule",
            "init_args": {"val": {"urls": str(val)}, "batch_size": 4, "num_workers": 0},
        },
        "trainer": {"accelerator": "cpu", "logger": False},
    }
    path = tmp_path / "mtp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_segment_and_detect_write_reports(tmp_path: Path) -> None:
    from mmpt.eval.cli import main as eval_main
    from mmpt.synth import make_synthetic

    make_synthetic("rs-dense", tmp_path / "d", train_samples=1, val_samples=5, image_size=32)
    torch.manual_seed(0)
    ckpt = _save(make_model(), tmp_path / "m.ckpt")
    cfg = _config(tmp_path, tmp_path / "d" / "val")
    common = [
        "-c",
        str(cfg),
        "--ckpt",
        str(ckpt),
        "--out",
        str(tmp_path / "ev"),
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    assert eval_main(["segment", *common]) == 0
    report = json.loads((tmp_path / "ev" / "segment.json").read_text())
    seg = report["metrics"]
    assert 0 <= seg["miou"] <= 1 and 0 <= seg["acc"] <= 1
    assert set(seg["iou"]) == {"background", "field", "road", "building", "vehicle"}
    assert report["num_images"] == 5
    assert eval_main(["detect", *common]) == 0
    det = json.loads((tmp_path / "ev" / "detect.json").read_text())["metrics"]
    assert {"mask_ap", "mask_ap50", "rotated_map"} <= set(det) and "miou" not in det
    assert set(det["rotated_ap"]) == {"building", "vehicle"}


def _val_metrics(run: Path) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader((run / "version_0" / "metrics.csv").open()))
    out = {}
    for row in rows:
        out |= {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
    return out


@pytest.mark.slow
def test_mtp_quickstart_learns_far_above_an_untrained_backbone(tmp_path: Path) -> None:
    """The CPU quickstart (minutes) vs the same heads on an untrained backbone.

    Two baselines: the whole model untrained (every metric near 0), and the same heads
    trained on the frozen, untrained backbone (the pyramid and heads learn; the backbone does
    not). The multi-task run must be far above the first and above the second on all three.
    """
    import lightning as L

    from mmpt.eval.cli import main as eval_main
    from mmpt.run_config import build_from_config

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = str(ROOT / "configs" / "quickstart" / "mtp_tiny.yaml")
    data = tmp_path / "rsdense"
    sources = ",".join(str(data / f"train-{t}") for t in HEADS)
    overrides = [
        f"--data.init_args.synthetic.out={data}",
        f"--data.init_args.train.urls=[{sources}]",
        f"--data.init_args.val.urls={data / 'val'}",
    ]
    runs = {}
    for name, extra in (("mtp", []), ("frozen", ["--model.init_args.freeze=[vision.*]"])):
        root = tmp_path / name
        cmd = [sys.executable, "-m", "mmpt.cli", "fit", "-c", recipe, *overrides,
               f"--trainer.default_root_dir={root}", *extra]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=1800)
        runs[name] = _val_metrics(root)
    L.seed_everything(0)
    untrained = _save(build_from_config([recipe], overrides).model, tmp_path / "init.ckpt")
    for task in ("segment", "detect"):
        args = [task, "-c", recipe, *overrides, "--ckpt", str(untrained), "--out",
                str(tmp_path / "ev"), "--num-workers", "0"]  # fmt: skip
        assert eval_main(args) == 0
    init = {**json.loads((tmp_path / "ev" / "segment.json").read_text())["metrics"],
            **json.loads((tmp_path / "ev" / "detect.json").read_text())["metrics"]}  # fmt: skip
    mtp, frozen = runs["mtp"], runs["frozen"]
    for key, margin in (("miou", 0.2), ("mask_ap50", 0.05), ("rotated_map", 0.2)):
        assert mtp[f"val/{key}"] > init[key] + margin, (key, mtp, init)
        assert mtp[f"val/{key}"] > frozen[f"val/{key}"], (key, mtp, frozen)
