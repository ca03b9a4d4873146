"""EgoMCQ accuracy and EPIC-style multi-instance retrieval against hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from mmpt.eval.metrics import retrieval_metrics
from mmpt.eval.video_metrics import (
    average_precision,
    egomcq_accuracy,
    multi_instance_retrieval,
    ndcg,
    video_text_retrieval_metrics,
)

L3 = math.log2(3)  # discount denominator at rank 2; rank 1 is log2(2) = 1, rank 3 log2(4) = 2

# ---- EgoMCQ -------------------------------------------------------------------------------

MCQ_SCORES = [
    [0.9, 0.1, 0.2, 0.3, 0.4],  # q0 answer 0: top score            -> correct (type 1)
    [0.5, 0.1, 0.4, 0.3, 0.2],  # q1 answer 2: 0.5 beats it          -> wrong   (type 1)
    [0.1, 0.2, 0.3, 0.4, 0.8],  # q2 answer 4: top score            -> correct (type 1)
    [0.2, 0.7, 0.1, 0.0, 0.3],  # q3 answer 1: top score            -> correct (type 2)
    [0.6, 0.2, 0.3, 0.5, 0.1],  # q4 answer 3: 0.6 beats it          -> wrong   (type 2)
    [0.4, 0.4, 0.1, 0.2, 0.3],  # q5 answer 0: tied with candidate 1 -> wrong   (type 2)
    [0.0, 0.0, 1.0, 0.0, 0.0],  # q6 answer 2: top score            -> correct (type 2)
]
MCQ_ANSWERS = [0, 2, 4, 1, 3, 0, 2]
MCQ_TYPES = [1, 1, 1, 2, 2, 2, 2]
# Type 1: 2 of 3 correct; type 2: 2 of 4 (q5's tie is not a hit); overall 4 of 7.


def mcq(type_names, types=MCQ_TYPES, scores=MCQ_SCORES):
    return egomcq_accuracy(
        torch.tensor(scores), torch.tensor(MCQ_ANSWERS), torch.tensor(types), type_names
    )


def test_egomcq_hand_worked():
    out = mcq({1: "inter", 2: "intra"})
    assert out == {
        "overall_acc": pytest.approx(4 / 7),
        "inter_video_acc": pytest.approx(2 / 3),
        "intra_video_acc": pytest.approx(2 / 4),
        "count": 7,
        "inter_video_count": 3,
        "intra_video_count": 4,
    }


def test_egomcq_swapped_mapping_swaps_results():
    right, swapped = mcq({1: "inter", 2: "intra"}), mcq({2: "inter", 1: "intra"})
    assert swapped["inter_video_acc"] == right["intra_video_acc"] == pytest.approx(1 / 2)
    assert swapped["intra_video_acc"] == right["inter_video_acc"] == pytest.approx(2 / 3)
    assert swapped["inter_video_count"] == right["intra_video_count"] == 4
    assert swapped["intra_video_count"] == right["inter_video_count"] == 3
    assert swapped["overall_acc"] == right["overall_acc"]


def test_egomcq_ties_never_count_and_absent_type_is_nan():
    out = mcq({1: "inter", 2: "intra"}, scores=[[0.5] * 5] * 7)
    assert out["overall_acc"] == 0.0  # argmax would have scored q0 and q5 (answer 0) as hits
    only_inter = mcq({1: "inter", 2: "intra"}, types=[1] * 7)
    assert only_inter["inter_video_acc"] == pytest.approx(4 / 7)
    assert math.isnan(only_inter["intra_video_acc"]) and only_inter["intra_video_count"] == 0


@pytest.mark.parametrize(
    ("type_names", "types", "match"),
    [
        ({1: "inter"}, MCQ_TYPES, r"type ids \[2\]"),
        ({1: "inter", 2: "intra"}, [1, 1, 1, 2, 2, 2, 3], r"type ids \[3\]"),
        ({1: "Inter-video", 2: "intra"}, MCQ_TYPES, "distinct names"),
        ({1: "inter", 2: "inter"}, MCQ_TYPES, "distinct names"),
    ],
)
def test_egomcq_rejects_unmapped_or_invalid_types(type_names, types, match):
    with pytest.raises(ValueError, match=match):
        mcq(type_names, types=types)


def test_egomcq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="answers"):
        egomcq_accuracy(torch.rand(3, 5), torch.tensor([0, 1]), torch.ones(3).long(), {1: "inter"})
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        egomcq_accuracy(torch.rand(2, 5), torch.tensor([0, 5]), torch.ones(2).long(), {1: "inter"})


# ---- multi-instance retrieval -------------------------------------------------------------

SIM_3x3 = [[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.4, 0.6, 0.7]]  # rows videos, columns texts
REL_3x3 = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]]
# Video -> text (rows), ranked relevance and the relevant (== 1) hits:
#   v0: t0 .9, t1 .5, t2 .1 -> rel [1, .5, 0]: AP 1.   k=2: DCG = IDCG = 1 + .5/L3 -> 1
#   v1: t2 .8, t1 .3, t0 .2 -> rel [.2, 1, 0]: AP 1/2. k=2: DCG .2 + 1/L3, IDCG 1 + .2/L3
#   v2: t2 .7, t1 .6, t0 .4 -> rel [1, 0, 0]:  AP 1.   k=1: 1
# Text -> video (columns):
#   t0: v0 .9, v2 .4, v1 .2 -> rel [1, 0, 0]:  AP 1.   k=1: 1
#   t1: v2 .6, v0 .5, v1 .3 -> rel [0, .5, 1]: AP 1/3. k=2: DCG .5/L3, IDCG 1 + .5/L3
#       (uncut, the 1 at rank 3 would add 1/log2(4) = 1/2 to the DCG)
#   t2: v1 .8, v2 .7, v0 .1 -> rel [.2, 1, 0]: AP 1/2. k=2: as v1
NDCG_V1 = (0.2 + 1 / L3) / (1 + 0.2 / L3)
NDCG_T1 = (0.5 / L3) / (1 + 0.5 / L3)
EXPECTED_3x3 = {
    "v2t/mAP": (1 + 1 / 2 + 1) / 3,
    "t2v/mAP": (1 + 1 / 3 + 1 / 2) / 3,
    "v2t/nDCG": (1 + NDCG_V1 + 1) / 3,
    "t2v/nDCG": (1 + NDCG_T1 + NDCG_V1) / 3,
}

SIM_2x4 = [[0.8, 0.8, 0.3, 0.1], [0.2, 0.5, 0.5, 0.9]]  # two ties, one per row
REL_2x4 = [[1.0, 0.0, 0.5, 0.0], [0.0, 0.25, 1.0, 0.0]]
# Video -> text, ties ranked least relevant first:
#   v0: {t0 .8 rel 1, t1 .8 rel 0} -> t1, t0; then t2, t3 -> rel [0, 1, .5, 0]
#       AP: hit at rank 2 -> 1/2. k=2: DCG 1/L3, IDCG 1 + .5/L3
#   v1: t3 .9; {t1 .5 rel .25, t2 .5 rel 1} -> t1, t2; then t0 -> rel [0, .25, 1, 0]
#       AP: hit at rank 3 -> 1/3. k=2: DCG .25/L3 (the 1 at rank 3 is cut), IDCG 1 + .25/L3
# Text -> video:
#   t0: v0 .8, v1 .2 -> rel [1, 0]: AP 1, nDCG (k=1) 1
#   t1: v0 .8, v1 .5 -> rel [0, .25]: no relevant (== 1) video -> left out of mAP; k=1:
#       DCG 0, IDCG .25 -> nDCG 0
#   t2: v1 .5, v0 .3 -> rel [1, .5]: AP 1, nDCG 1
#   t3: relevance all zero -> left out of both means
EXPECTED_2x4 = {
    "v2t/mAP": (1 / 2 + 1 / 3) / 2,
    "t2v/mAP": (1 + 1) / 2,
    "v2t/nDCG": ((1 / L3) / (1 + 0.5 / L3) + (0.25 / L3) / (1 + 0.25 / L3)) / 2,
    "t2v/nDCG": (1 + 0 + 1) / 3,
}


def with_averages(expected: dict[str, float]) -> dict[str, float]:
    out = dict(expected)
    for m in ("mAP", "nDCG"):
        out[f"avg/{m}"] = (expected[f"v2t/{m}"] + expected[f"t2v/{m}"]) / 2
    return out


@pytest.mark.parametrize(
    ("sim", "rel", "expected"),
    [(SIM_3x3, REL_3x3, EXPECTED_3x3), (SIM_2x4, REL_2x4, EXPECTED_2x4)],
    ids=["3x3", "2x4"],
)
def test_mir_hand_worked(sim, rel, expected):
    f64 = torch.float64  # float32 0.2 is not 0.2
    out = multi_instance_retrieval(torch.tensor(sim, dtype=f64), torch.tensor(rel, dtype=f64))
    assert out == pytest.approx(with_averages(expected), rel=1e-12)


def test_mir_options_threshold_and_uncut_ndcg():
    sim, rel = torch.tensor(SIM_3x3), torch.tensor(REL_3x3)
    # Threshold 0.2 counts every positive: v2t rows rank hits [1,1,0], [1,1,0], [1,0,0] -> AP 1
    # each; t2v t1 ranks [0, 1, 1] -> (1/2 + 2/3) / 2 = 7/12, t0 and t2 -> 1.
    out = multi_instance_retrieval(sim, rel, map_threshold=0.2)
    assert out["v2t/mAP"] == pytest.approx(1.0)
    assert out["t2v/mAP"] == pytest.approx((1 + 7 / 12 + 1) / 3)
    uncut = ndcg(sim.T, rel.T, at_num_relevant=False)
    assert uncut[1].item() == pytest.approx((0.5 / L3 + 1 / 2) / (1 + 0.5 / L3))
    assert ndcg(sim.T, rel.T)[1].item() == pytest.approx(NDCG_T1)


def test_mir_perfect_ranking_is_one():
    g = torch.Generator().manual_seed(0)
    rel = torch.rand(6, 9, generator=g)
    rel[rel < 0.4] = 0.0  # graded, many zeros
    rel[torch.arange(6), torch.arange(6)] = 1.0
    for sim in (rel, 2 * rel - 1):
        out = multi_instance_retrieval(sim, rel)
        assert out == pytest.approx(dict.fromkeys(out, 1.0))


def test_mir_constant_scores_rank_worst_and_order_does_not_matter():
    rel = torch.tensor(REL_3x3)
    worst = multi_instance_retrieval(torch.zeros(3, 3), rel)
    reverse = multi_instance_retrieval(-rel, rel)  # the worst ordering, without ties
    assert worst == pytest.approx(reverse)
    sim = torch.tensor(SIM_2x4)
    rel = torch.tensor(REL_2x4)
    rows, cols = torch.tensor([1, 0]), torch.tensor([2, 0, 3, 1])
    permuted = multi_instance_retrieval(sim[rows][:, cols], rel[rows][:, cols])
    assert permuted == pytest.approx(multi_instance_retrieval(sim, rel), rel=1e-12)


def direct_ap_ndcg(scores: list[list[float]], rel: list[list[float]]) -> tuple[list, list]:
    """Per-query AP (relevant: rel == 1) and EPIC nDCG by plain loops; ties least relevant first."""
    aps, ndcgs = [], []
    for s_row, r_row in zip(scores, rel, strict=True):
        ranked = [r for _, r in sorted(zip(s_row, r_row, strict=True), key=lambda p: (-p[0], p[1]))]
        hits, total = 0, 0.0
        for i, r in enumerate(ranked, start=1):
            if r == 1.0:
                hits += 1
                total += hits / i
        aps.append(total / hits if hits else math.nan)
        k = sum(r > 0 for r in r_row)
        ideal = sorted(r_row, reverse=True)
        dcg = sum(ranked[i] / math.log2(i + 2) for i in range(k))
        idcg = sum(ideal[i] / math.log2(i + 2) for i in range(k))
        ndcgs.append(dcg / idcg if idcg > 0 else math.nan)
    return aps, ndcgs


def mean_defined(xs: list[float]) -> float:
    kept = [x for x in xs if not math.isnan(x)]
    return sum(kept) / len(kept)


def test_mir_matches_direct_computation_on_random_example():
    g = torch.Generator().manual_seed(1)
    sim = (torch.rand(7, 9, generator=g, dtype=torch.float64) * 10).round() / 10  # many ties
    rel = torch.rand(7, 9, generator=g, dtype=torch.float64)
    rel = torch.where(rel < 0.5, 0.0, torch.where(rel > 0.8, 1.0, (rel * 4).round() / 4))
    out = multi_instance_retrieval(sim, rel, chunk_size=3)
    for name, s, r in (("v2t", sim, rel), ("t2v", sim.T, rel.T)):
        aps, ndcgs = direct_ap_ndcg(s.tolist(), r.tolist())
        assert out[f"{name}/mAP"] == pytest.approx(mean_defined(aps), rel=1e-12)
        assert out[f"{name}/nDCG"] == pytest.approx(mean_defined(ndcgs), rel=1e-12)
        per_query = average_precision(s, r)
        assert torch.equal(per_query.isnan(), torch.tensor([math.isnan(a) for a in aps]))


def test_mir_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        multi_instance_retrieval(torch.rand(2, 3), torch.rand(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        multi_instance_retrieval(torch.tensor([[math.nan, 0.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="non-negative"):
        multi_instance_retrieval(torch.rand(2, 2), -torch.ones(2, 2))
    with pytest.raises(ValueError, match="threshold"):
        multi_instance_retrieval(torch.rand(2, 2), torch.ones(2, 2), map_threshold=0.0)


def test_video_text_retrieval_reuses_image_text_metrics():
    g = torch.Generator().manual_seed(2)
    video, text = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    text_to_video = torch.tensor([0, 0, 1, 2, 3, 3])
    out = video_text_retrieval_metrics(video, text, text_to_video, ks=(1, 5))
    ref = retrieval_metrics(video, text, text_to_video, ks=(1, 5))
    renamed = {k.replace("t2i", "t2v").replace("i2t", "v2t"): v for k, v in ref.items()}
    assert out == renamed and "t2v/R@1" in out and "v2t/median_rank" in out
