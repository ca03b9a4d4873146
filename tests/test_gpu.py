"""GPU checks (opt-in: ``pytest -m gpu``, run on the device machine): bf16 contrastive steps,
uint8 batches normalised on the device, and the loss in fp32 under autocast."""

from __future__ import annotations

import pytest
import torch

from mmpt.datamodules.transforms import normalize_images
from mmpt.models.losses import ClipLoss, SigLipLoss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_normalize_on_device_matches_cpu():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    gpu = normalize_images(x.cuda(), mean, std).cpu()
    assert torch.allclose(gpu, normalize_images(x, mean, std), atol=1e-6)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_loss_under_bf16_autocast_is_fp32_and_close(loss_cls):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    loss = loss_cls().cuda()
    ref = loss(img, txt)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss(img.bfloat16(), txt.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=2e-2)


def test_bf16_contrastive_training_steps_learn(tmp_path):
    import lightning as L

    from mmpt.cli import build_cli
    from tests.helpers import TINY_TEXT, TINY_VISION, write_shards

    shards = write_shards(tmp_path / "shards", n=64, per_shard=16)
    args = [
        "--model",
        "mmpt.models.contrastive.ContrastiveModule",
        f"--model.init_args.vision={TINY_VISION}".replace("'", '"'),
        f"--model.init_args.text={TINY_TEXT}".replace("'", '"'),
        "--data",
        "mmpt.datamodules.image_text.ImageTextDataModule",
        f'--data.init_args.train={{"urls": "{shards}"}}',
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=2",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=20",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
    ]
    cli = build_cli(args, run=False)
    before = [p.detach().clone() for p in cli.model.parameters()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert isinstance(cli.trainer, L.Trainer) and cli.trainer.global_step == 20
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
    after = list(cli.model.parameters())
    changed = [not torch.equal(a, b.cpu()) for a, b in zip(before, after, strict=True)]
    assert sum(changed) >= 0.9 * len(changed)
