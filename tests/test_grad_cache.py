"""Gradient caching gives the loss and every parameter gradient of the full-batch computation.

Tiny towers with dropout: the reference embeds the same chunks with autograd graphs (so its
dropout draws are those of the cached first pass), concatenates and backpropagates once. With
dropout off, the reference is one unchunked forward. ClipLoss, SigLipLoss and EgoNCE; one
process, two gloo processes (hand-averaged and real DDP, FSDP2), and 2 chunks x 2 ranks against
one process holding the global batch.
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

from mmpt.models.grad_cache import GradCache, cached_embeddings, fsdp_forward_method
from mmpt.models.losses import ClipLoss, EgoNCELoss, SigLipLoss
from tests.helpers import ddp_average_, init_gloo

WORLD, B, D_IN, D, TAGS = 2, 6, 5, 8, 4
LOSSES = ("clip", "siglip", "egonce")
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_loss(name: str) -> nn.Module:
    if name == "clip":
        return ClipLoss(init_logit_scale=math.log(5.0))
    if name == "siglip":
        return SigLipLoss(init_logit_scale=1.0, init_bias=-2.0)
    return EgoNCELoss(temperature=0.2)


class Pair(nn.Module):
    """Two MLP towers with dropout and a contrastive loss; ``forward`` is the training loss."""

    def __init__(self, loss: str, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)

        def tower() -> nn.Module:
            return nn.Sequential(
                nn.Linear(D_IN, 16), nn.Dropout(dropout), nn.GELU(), nn.Linear(16, D)
            )

        self.img, self.txt, self.loss = tower(), tower(), make_loss(loss)
        self.fsdp_root: nn.Module | None = None  # set to the model when fully_shard shards it

    def embed(self, x_img: torch.Tensor, x_txt: torch.Tensor, rows: slice) -> tuple:
        return F.normalize(self.img(x_img[rows]), dim=-1), F.normalize(
            self.txt(x_txt[rows]), dim=-1
        )

    def forward(self, data: dict, chunk: int | None, cache: bool = True, replay: bool = True):
        n = data["x_img"].shape[0]
        if chunk is None:  # one unchunked pass
            img, txt = self.embed(data["x_img"], data["x_txt"], slice(0, n))
        elif cache:
            embed = fsdp_forward_method(self, "embed")  # FSDP2 gathers the root's weights
            img, txt = cached_embeddings(
                lambda r: embed(data["x_img"], data["x_txt"], r),
                n,
                chunk,
                [self.img, self.txt],
                root=self.fsdp_root,
                replay_rng=replay,
            )
        else:  # reference: the same chunks, embedded with graphs
            parts = [
                self.embed(data["x_img"], data["x_txt"], slice(i, i + chunk))
                for i in range(0, n, chunk)
            ]
            img, txt = (torch.cat(k) for k in zip(*parts, strict=True))
        if isinstance(self.loss, EgoNCELoss):
            return self.loss(img, txt, data["nouns"], data["verbs"])
        return self.loss(img, txt)


def batch(n: int, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(n, D_IN, generator=g)
    return {
        "x_img": x_img,
        "x_txt": x_img + 0.5 * torch.randn(n, D_IN, generator=g),
        "nouns": (torch.rand(n, TAGS, generator=g) < 0.4).float(),
        "verbs": (torch.rand(n, TAGS, generator=g) < 0.4).float(),
    }


def step(model: nn.Module, data: dict, seed: int = 7, **kw) -> dict[str, torch.Tensor]:
    """Loss and every parameter gradient of one backward (RNG seeded first)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(data, **kw)
    loss.backward()
    out = {"loss": loss.detach().clone()}
    return out | {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [1, 4, 6])
def test_cached_equals_full_batch_with_dropout(loss: str, chunk: int) -> None:
    model = Pair(loss, dropout=0.3).train()
    data = batch(B)
    want = step(model, data, chunk=chunk, cache=False)
    got = step(model, data, chunk=chunk)
    assert len(got) == 1 + 8 + (2 if loss == "siglip" else 1 if loss == "clip" else 0)
    assert_same(got, want)


@pytest.mark.parametrize("loss", LOSSES)
def test_without_rng_replay_dropout_gradients_differ(loss: str) -> None:
    """The replay is what makes the test above pass: without it dropout draws new masks."""
    model = Pair(loss, dropout=0.3).train()
    data = batch(B)
    want = step(model, data, chunk=2, cache=False)
    got = step(model, data, chunk=2, replay=False)
    torch.testing.assert_close(got["loss"], want["loss"])  # the forward is the same
    assert not torch.allclose(got["img.0.weight"], want["img.0.weight"], **TOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_cached_equals_one_unchunked_pass_without_dropout(loss: str) -> None:
    model = Pair(loss, dropout=0.0)
    data = batch(B)
    assert_same(step(model, data, chunk=4), step(model, data, chunk=None))


def test_rng_stream_and_accumulation_are_unchanged() -> None:
    """The replay leaves the generator where the step left it; gradients accumulate as usual."""
    model = Pair("clip", dropout=0.3).train()
    data = batch(B)
    torch.manual_seed(1)
    model(data, chunk=2).backward()
    after_cached = torch.rand(3)
    once = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.manual_seed(1)
    model(data, chunk=2, cache=False)
    assert torch.equal(after_cached, torch.rand(3))
    torch.manual_seed(1)
    model(data, chunk=2).backward()  # second backward accumulates onto the first
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[k], **TOL)


def test_autocast_reentered_in_replay() -> None:
    """Under bf16 autocast the replay runs in bf16 too (one chunk: the very same operations)."""
    model = Pair("clip", dropout=0.3).train()
    data = batch(B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = step(model, data, chunk=B, cache=False)
        got = step(model, data, chunk=B)
    assert_same(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # several chunks: bf16 rounding apart
        want = step(model, data, chunk=2, cache=False)
        got = step(model, data, chunk=2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-2, atol=4e-3)


def test_no_grad_is_plain_chunked_embedding_and_bad_chunk_size() -> None:
    model = Pair("clip", dropout=0.0)
    data = batch(B)
    with torch.no_grad():
        loss = model(data, chunk=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, model(data, chunk=None).detach())
    with pytest.raises(ValueError, match="model.grad_cache.chunk_size"):
        GradCache(chunk_size=0)


def fsdp2_grads(data: dict) -> dict[str, torch.Tensor]:
    """Gradients of a cached step with the image tower and the model sharded by ``fully_shard``.

    The text tower belongs to the root unit (as a tower's embeddings do under
    ``mmpt.strategies.FSDP2``, which shards only the listed layers): its weights are gathered
    only around the registered forward method. Scalars (the logit scale) stay whole with
    averaged gradients, as ``mmpt.strategies.FSDP2`` does.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mmpt.strategies import _GradAverage

    mesh = init_device_mesh("cpu", (WORLD,))
    model = Pair("clip", dropout=0.0)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        p.register_post_accumulate_grad_hook(_GradAverage(mesh.get_group()))
    for module in (model.img, model):
        fully_shard(module, mesh=mesh, ignored_params=scalars)
    model.fsdp_root = model
    model(data, chunk=3).backward()
    return {
        k: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        for k, p in model.named_parameters()
    }


def worker(rank: int, init_file: str, out_dir: str, wrapped: bool) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        data = {k: v[rank * B : (rank + 1) * B] for k, v in batch(WORLD * B).items()}
        res = {}
        if wrapped:  # DDP's first use imports torch._dynamo: several seconds per process
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(Pair("clip", dropout=0.0))
            ddp(data, chunk=3).backward()
            res["ddp"] = {k.removeprefix("module."): p.grad for k, p in ddp.named_parameters()}
            res["fsdp2"] = fsdp2_grads(data)
        for name in () if wrapped else LOSSES:
            drop = Pair(name, dropout=0.3).train()
            res[f"{name}/ref"] = ddp_average_(step(drop, data, seed=7 + rank, chunk=3, cache=False))
            res[f"{name}/cached"] = ddp_average_(step(drop, data, seed=7 + rank, chunk=3))
            res[f"{name}/no_dropout"] = ddp_average_(step(Pair(name, 0.0), data, chunk=3))
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, wrapped: bool) -> list[dict]:
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp), wrapped), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(tmp_path_factory.mktemp("gc"), wrapped=False)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loss", LOSSES)
def test_two_ranks_cached_equals_gathered_full_batch(ranks, loss: str) -> None:
    for res in ranks:
        assert_same(res[f"{loss}/cached"], res[f"{loss}/ref"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loss", LOSSES)
def test_two_chunks_two_ranks_equal_one_process_global_batch(ranks, loss: str) -> None:
    """Mean of the local losses and DDP-averaged gradients = one process, global batch."""
    want = step(Pair(loss, dropout=0.0), batch(WORLD * B), chunk=None)
    got = dict(ranks[0][f"{loss}/no_dropout"])
    got["loss"] = (
        ranks[0][f"{loss}/no_dropout"]["loss"] + ranks[1][f"{loss}/no_dropout"]["loss"]
    ) / 2
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_and_fsdp2_reduce_cached_gradients_to_the_global_batch(tmp_path: Path) -> None:
    """Real DDP (all-reduce hooks fire once) and FSDP2 (reduce-scatter after the last chunk)."""
    want = step(Pair("clip", dropout=0.0), batch(WORLD * B), chunk=None)
    want.pop("loss")
    for res in run_ranks(tmp_path, wrapped=True):
        assert_same(res["ddp"], want)
        assert_same(res["fsdp2"], want)
