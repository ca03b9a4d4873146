"""Two gloo CPU ranks: gathered ClipLoss/SigLipLoss match the single-process global-batch loss.

Math checked here. With W ranks each computing a local loss L_k on its B rows (B x W*B
logits), the global loss is L = mean_k L_k. ``gather_with_grad``'s backward sums over ranks,
so the gradient that lands on rank r's local features is d(sum_k L_k)/dx_r = W * dL/dx_r,
while a parameter used only locally (logit_scale, bias) gets dL_r/dtheta on rank r, whose
mean over ranks is dL/dtheta. DDP averages parameter gradients over ranks, so an encoder
fed through the W-scaled feature gradients ends up with exactly dL/dtheta. That is checked
end to end on tiny linear encoders, averaging by hand (all-reduce / W, which is DDP's
reduction) in the fast tests and with real DistributedDataParallel in a slow test (DDP's
first use imports torch._dynamo, several seconds per process).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmpt.models.losses import ClipLoss, SigLipLoss, gather_with_grad
from tests.helpers import ddp_average_, init_gloo

WORLD, B, D, D_IN = 2, 3, 8, 5
N = WORLD * B


def make_loss(name: str) -> nn.Module:
    if name == "clip":
        return ClipLoss(init_logit_scale=math.log(5.0)).double()
    return SigLipLoss(init_logit_scale=1.0, init_bias=-2.0).double()


class TwoTower(nn.Module):
    """Tiny linear image/text encoders + loss, so DDP's averaging can be checked end to end."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(D_IN, D).double()
        self.txt = nn.Linear(D_IN, D).double()
        self.loss = make_loss(name)

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor) -> torch.Tensor:
        return self.loss(F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1))


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    img = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    x_img = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return {"img": img, "txt": txt, "x_img": x_img, "x_txt": x_txt}


def loss_results(module: nn.Module, img: torch.Tensor, txt: torch.Tensor) -> dict:
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    loss = module(img, txt)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}
    out |= {f"p.{k}": p.grad.clone() for k, p in module.named_parameters()}
    return out


def model_grads(
    model: nn.Module, x_img: torch.Tensor, x_txt: torch.Tensor, average: bool = False
) -> dict:
    model(x_img, x_txt).backward()
    grads = {k.removeprefix("module."): p.grad.clone() for k, p in model.named_parameters()}
    return ddp_average_(grads) if average else grads


def worker(rank: int, init_file: str, out_dir: str, use_ddp: bool) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        data = global_batch()
        rows = slice(rank * B, (rank + 1) * B)
        x_img, x_txt = data["x_img"][rows], data["x_txt"][rows]
        res: dict = {"gathered": gather_with_grad(data["img"][rows]).detach()}
        for name in ("clip", "siglip"):
            if use_ddp:
                ddp = DistributedDataParallel(TwoTower(name))
                res[f"dp_{name}"] = model_grads(ddp, x_img, x_txt)
                continue
            res[name] = loss_results(make_loss(name), data["img"][rows], data["txt"][rows])
            res[f"dp_{name}"] = model_grads(TwoTower(name), x_img, x_txt, average=True)
        try:
            gather_with_grad(torch.zeros(rank + 1, 2))
            res["uneven"] = "no error"
        except ValueError as err:
            res["uneven"] = str(err)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, use_ddp: bool) -> list[dict]:
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp), use_ddp), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(tmp_path_factory.mktemp("dist"), use_ddp=False)


def rows(r: int) -> slice:
    return slice(r * B, (r + 1) * B)


@pytest.mark.timeout(120)
def test_gather_concatenates_in_rank_order(ranks):
    data = global_batch()
    for res in ranks:
        torch.testing.assert_close(res["gathered"], data["img"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_mean_local_loss_equals_global_loss(ranks, name):
    data = global_batch()
    ref = loss_results(make_loss(name), data["img"], data["txt"])
    mean_loss = sum(res[name]["loss"] for res in ranks) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-12, atol=1e-12)
    # The ranks see different rows, so their local losses differ (not a trivial match).
    assert not torch.isclose(ranks[0][name]["loss"], ranks[1][name]["loss"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_feature_and_scale_gradients_match_global(ranks, name):
    data = global_batch()
    ref = loss_results(make_loss(name), data["img"], data["txt"])
    for r, res in enumerate(ranks):
        # Gathered backward sums over ranks: local feature grads are W x the global rows.
        torch.testing.assert_close(res[name]["img"] / WORLD, ref["img"][rows(r)])
        torch.testing.assert_close(res[name]["txt"] / WORLD, ref["txt"][rows(r)])
    params = [k for k in ref if k.startswith("p.")]
    assert params == (["p.logit_scale"] if name == "clip" else ["p.logit_scale", "p.logit_bias"])
    for k in params:
        # Local-only parameters: the DDP mean over ranks is the global gradient.
        mean_grad = sum(res[name][k] for res in ranks) / WORLD
        torch.testing.assert_close(mean_grad, ref[k])
        assert ref[k].abs() > 1e-6


def check_parameter_grads(ranks: list[dict], name: str) -> None:
    data = global_batch()
    ref = model_grads(TwoTower(name), data["x_img"], data["x_txt"])
    assert len(ref) == (5 if name == "clip" else 6)  # 2 x (weight, bias) + scale (+ bias)
    for res in ranks:
        grads = res[f"dp_{name}"]
        assert grads.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_averaged_parameter_gradients_match_single_process(ranks, name):
    check_parameter_grads(ranks, name)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_ddp_parameter_gradients_match_single_process(tmp_path):
    ranks = run_ranks(tmp_path, use_ddp=True)
    for name in ("clip", "siglip"):
        check_parameter_grads(ranks, name)


@pytest.mark.timeout(120)
def test_uneven_local_batches_raise_on_every_rank(ranks):
    for res in ranks:
        assert "same local batch size" in res["uneven"] and "[1, 2]" in res["uneven"]
