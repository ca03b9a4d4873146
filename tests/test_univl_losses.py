"""UniVL's losses against direct formulas on hand cases: MIL-NCE, masked-frame NCE, alignment
NCE, EnhancedV whole-text masking, teacher-forcing shift; and the re-ranked retrieval ranks."""

from __future__ import annotations

import math

import pytest
import torch

from mmpt.eval.univl_cli import rerank_ranks
from mmpt.models.losses import MILNCELoss
from mmpt.models.univl_losses import (
    alignment_nce,
    mask_frames,
    mask_whole_text,
    masked_frame_nce,
    shift_caption,
)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_milnce_equals_the_reference_formula() -> None:
    v = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    t = [[0.8, 0.6], [1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [-1.0, 0.0]]
    owner = [0, 0, 1, 2, 2]
    s = 2.0
    loss = MILNCELoss(init_logit_scale=math.log(s), learnable_scale=False)
    got = loss(torch.tensor(v, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
               torch.tensor(owner), gather=False)  # fmt: skip
    expected = 0.0
    for i in range(3):
        pos = [j for j in range(5) if owner[j] == i]
        num = sum(math.exp(s * _dot(v[i], t[j])) for j in pos)
        den = sum(math.exp(s * _dot(v[i], t[j])) for j in range(5))
        den += sum(math.exp(s * _dot(v[k], t[j])) for k in range(3) for j in pos)
        expected += -math.log(num / den) / 3
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_milnce_positives_lower_the_loss_and_bad_bags_raise() -> None:
    v = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    loss = MILNCELoss(learnable_scale=False)
    matched = loss(v, v.repeat(2, 1), torch.arange(4).repeat(2), gather=False)
    shifted = loss(v, v.roll(1, 0).repeat(2, 1), torch.arange(4).repeat(2), gather=False)
    assert matched < shifted
    with pytest.raises(ValueError, match="at least one candidate"):
        loss(v, v[:3], torch.arange(3), gather=False)


def test_masked_frame_nce_equals_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    masked = torch.tensor([[False, True, False], [True, False, False]])
    cand = [(n, t) for n in range(2) for t in range(3) if valid[n, t]]
    expected = 0.0
    for n, t in [(0, 1), (1, 0)]:
        logits = {c: float(pred[n, t] @ true[c]) for c in cand}
        lse = math.log(sum(math.exp(x) for x in logits.values()))
        expected += -(logits[(n, t)] - lse) / 2
    assert masked_frame_nce(pred, true, valid, masked).item() == pytest.approx(expected, abs=1e-6)
    none = masked_frame_nce(pred.requires_grad_(), true, valid, torch.zeros_like(valid))
    assert none.item() == 0.0 and none.requires_grad


def test_mask_frames_only_masks_real_frames() -> None:
    valid = torch.tensor([[True] * 6 + [False] * 4] * 50)
    picked = mask_frames(valid, 0.5, torch.Generator().manual_seed(0))
    assert not picked[:, 6:].any() and 0.3 < picked[:, :6].float().mean() < 0.7


def test_alignment_nce_equals_the_formula() -> None:
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    expected = 0.0
    for i in range(3):
        row = scores[i].tolist()
        expected += -(row[i] - math.log(sum(math.exp(x) for x in row))) / 3
    assert alignment_nce(scores).item() == pytest.approx(expected, abs=1e-6)
    target = torch.tensor([2, 0, 1])
    expected = (
        sum(
            -(scores[i, target[i]].item() - math.log(sum(math.exp(x) for x in scores[i].tolist())))
            for i in range(3)
        )
        / 3
    )
    assert alignment_nce(scores, target).item() == pytest.approx(expected, abs=1e-6)


def test_mask_whole_text_keeps_special_tokens() -> None:
    tokens = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0]])
    inputs, labels = mask_whole_text(tokens, 4, torch.tensor([0, 2, 3]))
    assert inputs.tolist() == [[2, 4, 4, 3, 0], [2, 4, 3, 0, 0]]
    assert labels.tolist() == [[-100, 7, 8, -100, -100], [-100, 9, -100, -100, -100]]


def test_shift_caption() -> None:
    inputs, target = shift_caption(torch.tensor([[2, 7, 8, 3, 0]]), pad_id=0)
    assert inputs.tolist() == [[2, 7, 8, 3]] and target.tolist() == [[7, 8, 3, -100]]


def test_rerank_ranks_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.2, 0.9, 0.8, 0.1], [0.9, 0.8, 0.7, 0.6]])
    owner = torch.tensor([1, 2, 3])
    top = sim.topk(2, dim=1).indices  # [[0, 1], [1, 2], [0, 1]]
    scores = torch.tensor([[0.0, 5.0], [1.0, 1.0], [3.0, 2.0]])
    # text 0: own clip 1 is second by similarity, first by alignment -> 1
    # text 1: own clip 2 ties clip 1 on alignment; the earlier of the top k wins -> 2
    # text 2: own clip 3 is outside the top 2: its similarity rank (4) stays
    assert rerank_ranks(sim, owner, top, scores).tolist() == [1, 2, 4]
