"""EgoNCELoss against a direct double-loop formula, ClipLoss, and its 2-rank gloo version.

The distributed part follows tests/test_losses_distributed.py: two gloo CPU ranks each hold
B rows of a global batch of N = 2B pairs, compute their local loss, and save the loss and
the gradients; the test compares them with the single-process global-batch loss. Feature
gradients on a rank are W x the global ones (``gather_with_grad`` sums over ranks) and
encoder gradients averaged over ranks (DDP's reduction, by hand) equal the global ones.
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

from mmpt.models.losses import ClipLoss, EgoNCELoss
from tests.helpers import ddp_average_, init_gloo

N_NOUNS, N_VERBS = 5, 3
# Tags of a batch of 6 narrations, as id lists (the direct formula uses set intersection).
# Shared noun AND verb: (0, 1) [noun 0, verb 0] and (2, 5) [noun 2, verb 1]. Near misses:
# (1, 3) share noun 1 only; (0, 4) share verb 0 only (row 4 has no noun at all).
NOUNS = [[0], [0, 1], [2], [1], [], [2, 4]]
VERBS = [[0], [0], [1], [2], [0], [1]]
# No two rows share a noun and a verb (several share one of the two).
NOUNS_DISJOINT = [[0], [0], [1], [2], [3], [4]]
VERBS_DISJOINT = [[0], [1], [0], [0], [2], [0]]


def multi_hot(ids: list[list[int]], size: int) -> torch.Tensor:
    out = torch.zeros(len(ids), size)
    for i, row in enumerate(ids):
        out[i, row] = 1.0
    return out


def features(seed: int, n: int = 6, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(video + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return video, text


def direct_egonce(video, text, nouns, verbs, tau: float) -> float:
    """EgoVLP's loss written out with python floats and two loops (t2v + v2t)."""
    n = len(nouns)
    v, t = video.tolist(), text.tolist()
    s = [
        [sum(a * b for a, b in zip(v[i], t[j], strict=True)) / tau for j in range(n)]
        for i in range(n)
    ]

    def pos(i: int, j: int) -> bool:
        return i == j or bool(set(nouns[i]) & set(nouns[j]) and set(verbs[i]) & set(verbs[j]))

    v2t = t2v = 0.0
    for i in range(n):  # video i against all texts j
        num = sum(math.exp(s[i][j]) for j in range(n) if pos(i, j))
        v2t -= math.log(num / sum(math.exp(s[i][j]) for j in range(n)))
    for j in range(n):  # text j against all videos i
        num = sum(math.exp(s[i][j]) for i in range(n) if pos(i, j))
        t2v -= math.log(num / sum(math.exp(s[i][j]) for i in range(n)))
    return v2t / n + t2v / n


def fixed_clip() -> ClipLoss:
    """ClipLoss at EgoNCE's scale 1/0.05, its log scale set in float64 (not rounded to fp32)."""
    clip = ClipLoss(learnable_scale=False).double()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1 / 0.05))
    return clip


def run_loss(module, video, text, nouns, verbs, **kw):
    video = video.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    loss = module(video, text, nouns, verbs, **kw)
    loss.backward()
    return loss.detach(), video.grad, text.grad


@pytest.mark.parametrize(
    ("nouns", "verbs", "tau"),
    [(NOUNS, VERBS, 0.05), (NOUNS_DISJOINT, VERBS_DISJOINT, 0.05), (NOUNS, VERBS, 0.2)],
    ids=["overlap", "no-overlap", "overlap-tau0.2"],
)
def test_matches_direct_double_loop(nouns, verbs, tau):
    video, text = features(0)
    loss = EgoNCELoss(temperature=tau)(
        video, text, multi_hot(nouns, N_NOUNS), multi_hot(verbs, N_VERBS)
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(direct_egonce(video, text, nouns, verbs, tau), rel=1e-12)


def test_positive_mask_is_noun_and_verb_overlap_plus_diagonal():
    mask = EgoNCELoss().positive_mask(multi_hot(NOUNS, N_NOUNS), multi_hot(VERBS, N_VERBS))
    expected = torch.eye(6, dtype=torch.bool)
    for i, j in [(0, 1), (2, 5)]:
        expected[i, j] = expected[j, i] = True
    assert torch.equal(mask, expected)


def test_reduces_to_clip_loss_without_shared_noun_and_verb():
    video, text = features(1)
    nouns, verbs = multi_hot(NOUNS_DISJOINT, N_NOUNS), multi_hot(VERBS_DISJOINT, N_VERBS)
    clip = fixed_clip()
    ref, ref_v, ref_t = run_loss(lambda v, t, *_: clip(v, t), video, text, nouns, verbs)
    mean, mean_v, mean_t = run_loss(EgoNCELoss(combine="mean"), video, text, nouns, verbs)
    total = EgoNCELoss()(video, text, nouns, verbs)  # default "sum": t2v + v2t, as EgoVLP
    torch.testing.assert_close(mean, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean_v, ref_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_t, ref_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, 2 * ref, rtol=1e-12, atol=1e-12)


def test_extra_positives_lower_the_loss_below_clip():
    # -log(sum_pos / sum_all) <= -log(diag / sum_all), strictly with an off-diagonal positive.
    video, text = features(2)
    nouns, verbs = multi_hot(NOUNS, N_NOUNS), multi_hot(VERBS, N_VERBS)
    clip = fixed_clip()
    assert EgoNCELoss(combine="mean")(video, text, nouns, verbs) < clip(video, text) - 1e-3


def test_symmetric_in_video_and_text_and_row_order():
    video, text = features(3)
    nouns, verbs = multi_hot(NOUNS, N_NOUNS), multi_hot(VERBS, N_VERBS)
    loss = EgoNCELoss()
    ref = loss(video, text, nouns, verbs)
    torch.testing.assert_close(loss(text, video, nouns, verbs), ref, rtol=1e-12, atol=1e-12)
    perm = torch.tensor([4, 2, 5, 0, 3, 1])  # e.g. anchors and appended neighbours reordered
    permuted = loss(video[perm], text[perm], nouns[perm], verbs[perm])
    torch.testing.assert_close(permuted, ref, rtol=1e-12, atol=1e-12)


def test_tag_dtypes_are_equivalent():
    video, text = features(4)
    nouns, verbs = multi_hot(NOUNS, N_NOUNS), multi_hot(VERBS, N_VERBS)
    loss = EgoNCELoss()
    ref = loss(video, text, nouns, verbs)
    for n, v in [(nouns.bool(), verbs.bool()), (nouns.long(), verbs.long()), (3 * nouns, verbs)]:
        torch.testing.assert_close(loss(video, text, n, v), ref, rtol=0, atol=0)


def test_all_pairs_positive_gives_zero_loss_and_zero_gradient():
    video, text = features(5)
    ones = torch.ones(6, 2)
    loss, gv, gt = run_loss(EgoNCELoss(), video, text, ones, ones)
    assert loss.item() == 0.0
    assert gv.abs().max() == 0 and gt.abs().max() == 0


def test_gradcheck_and_finite_gradients():
    video, text = features(6, n=4, d=3)
    nouns, verbs = multi_hot([[0], [0], [1], []], 2), multi_hot([[0], [0], [0], [1]], 2)
    loss = EgoNCELoss()
    video.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, t: loss(v, t, nouns, verbs), (video, text))
    # float32, identical features: logits at the 1/0.05 = 20 extreme stay finite.
    same = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    tags = multi_hot([[i % 3] for i in range(8)], 3)
    out = loss(same, same, tags, tags)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(same.grad).all() and same.grad.abs().sum() > 0


def test_temperature_is_fixed_and_configurable():
    loss = EgoNCELoss()
    assert loss.temperature == 0.05 and loss.scale.item() == pytest.approx(20.0)
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    loss.clamp_()  # no-op, same interface as the learnable-scale losses
    assert EgoNCELoss(temperature=0.1).scale.item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="temperature"):
        EgoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="combine"):
        EgoNCELoss(combine="max")


def test_fp32_under_autocast_and_bf16_inputs():
    video, text = (t.float() for t in features(7, n=16, d=32))
    nouns, verbs = (
        multi_hot([[i % 4] for i in range(16)], 4),
        multi_hot([[i % 2] for i in range(16)], 2),
    )
    loss = EgoNCELoss()
    ref = loss(video, text, nouns, verbs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(video, text, nouns, verbs)
        half = loss(video.bfloat16(), text.bfloat16(), nouns.bfloat16(), verbs.bfloat16())
    assert auto.dtype == half.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        half, loss(video.bfloat16().float(), text.bfloat16().float(), nouns, verbs)
    )


def test_shape_errors():
    video, text = features(8)
    nouns, verbs = multi_hot(NOUNS, N_NOUNS), multi_hot(VERBS, N_VERBS)
    loss = EgoNCELoss()
    with pytest.raises(ValueError, match="same shape"):
        loss(video, text[:5], nouns, verbs)
    with pytest.raises(ValueError, match="nouns"):
        loss(video, text, nouns[:5], verbs)
    with pytest.raises(ValueError, match="verbs"):
        loss(video, text, nouns, verbs[:, 0])


# ---- two gloo ranks ---------------------------------------------------------------------

WORLD, B, D_IN, D = 2, 3, 5, 8
# Rank 0 holds rows 0-2, rank 1 rows 3-5: the positive pair (2, 5) spans the two ranks.


def global_data() -> dict[str, torch.Tensor]:
    video, text = features(9, n=WORLD * B, d=D)
    g = torch.Generator().manual_seed(10)
    return {
        "video": video,
        "text": text,
        "nouns": multi_hot(NOUNS, N_NOUNS),
        "verbs": multi_hot(VERBS, N_VERBS).bool(),  # bool tags are gathered too
        "x_video": torch.randn(WORLD * B, D_IN, generator=g, dtype=torch.float64),
        "x_text": torch.randn(WORLD * B, D_IN, generator=g, dtype=torch.float64),
    }


class TwoTower(nn.Module):
    """Tiny linear video/text encoders, to check the gradients that reach parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.video = nn.Linear(D_IN, D).double()
        self.text = nn.Linear(D_IN, D).double()
        self.loss = EgoNCELoss()

    def forward(self, xv, xt, nouns, verbs) -> torch.Tensor:
        v, t = F.normalize(self.video(xv), dim=-1), F.normalize(self.text(xt), dim=-1)
        return self.loss(v, t, nouns, verbs)


def encoder_grads(model: nn.Module, xv, xt, nouns, verbs, average: bool = False) -> dict:
    model(xv, xt, nouns, verbs).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return ddp_average_(grads) if average else grads


def worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        data = global_data()
        local = {k: v[rank * B : (rank + 1) * B] for k, v in data.items()}
        args = (local["nouns"], local["verbs"])
        res = {
            "gathered": run_loss(EgoNCELoss(), local["video"], local["text"], *args),
            "local_only": EgoNCELoss()(local["video"], local["text"], *args, gather=False),
            "encoders": encoder_grads(
                TwoTower(), local["x_video"], local["x_text"], *args, average=True
            ),
        }
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("egonce_dist")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(120)
def test_distributed_loss_and_gradients_match_global_batch(ranks):
    data = global_data()
    ref, ref_v, ref_t = run_loss(
        EgoNCELoss(), data["video"], data["text"], data["nouns"], data["verbs"]
    )
    assert ref.item() == pytest.approx(
        direct_egonce(data["video"], data["text"], NOUNS, VERBS, 0.05), rel=1e-12
    )
    mean_loss = sum(res["gathered"][0] for res in ranks) / WORLD
    torch.testing.assert_close(mean_loss, ref, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(ranks[0]["gathered"][0], ranks[1]["gathered"][0])
    for r, res in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        _, grad_v, grad_t = res["gathered"]
        torch.testing.assert_close(grad_v / WORLD, ref_v[rows])
        torch.testing.assert_close(grad_t / WORLD, ref_t[rows])


@pytest.mark.timeout(120)
def test_distributed_encoder_gradients_match_single_process(ranks):
    data = global_data()
    ref = encoder_grads(TwoTower(), data["x_video"], data["x_text"], data["nouns"], data["verbs"])
    assert len(ref) == 4  # two (weight, bias) pairs; the loss has no parameters
    for res in ranks:
        for k in ref:
            torch.testing.assert_close(res["encoders"][k], ref[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.timeout(120)
def test_gather_false_is_rank_local(ranks):
    data = global_data()
    for r, res in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        ref = EgoNCELoss()(
            data["video"][rows], data["text"][rows], data["nouns"][rows], data["verbs"][rows]
        )
        torch.testing.assert_close(res["local_only"], ref, rtol=1e-12, atol=1e-12)
