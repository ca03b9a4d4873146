"""Retrieval and zero-shot classification metrics against hand-worked examples."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpt.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    zeroshot_classifier,
)


def _captions_from_scores(scores: list[list[float]]) -> torch.Tensor:
    """Unit-norm captions whose cosine with one-hot image e_n is scores[m][n] (slack dim)."""
    s = torch.tensor(scores, dtype=torch.float64)
    slack = (1 - (s**2).sum(1, keepdim=True)).sqrt()
    return torch.cat([s, slack], 1)


# Similarity matrix S[caption, image]; images are e0, e1, e2 (D=4, last dim is slack).
# Captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
HAND_SCORES = [
    [0.90, 0.10, 0.20],  # cap0 -> img0: own 0.90, best in row -> t2i rank 1
    [0.30, 0.50, 0.40],  # cap1 -> img0: own 0.30 < 0.50, 0.40 -> t2i rank 3
    [0.60, 0.20, 0.05],  # cap2 -> img1: own 0.20 < 0.60 -> t2i rank 2
    [0.10, 0.70, 0.38],  # cap3 -> img1: own 0.70, best in row -> t2i rank 1
    [0.20, 0.30, 0.10],  # cap4 -> img2: own 0.10 < 0.20, 0.30 -> t2i rank 3
    [0.50, 0.40, 0.35],  # cap5 -> img2: own 0.35 < 0.50, 0.40 -> t2i rank 3
]
# Image->text, reading the columns:
#   img0 column [.90 .30 .60 .10 .20 .50]: own caps 0,1; best 0.90 is the top score -> rank 1
#     (cap1 alone would rank 4th: ANY caption counts, so the best one decides).
#   img1 column [.10 .50 .20 .70 .30 .40]: own caps 2,3; best 0.70 is the top score -> rank 1
#   img2 column [.20 .40 .05 .38 .10 .35]: own caps 4,5; best 0.35 < 0.40 (cap1), 0.38 (cap3)
#     -> rank 3
HAND_T2I = [1, 3, 2, 1, 3, 3]
HAND_I2T = [1, 1, 3]


def _hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.eye(3, 4, dtype=torch.float64)
    texts = _captions_from_scores(HAND_SCORES)
    return images, texts, torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_worked_ranks():
    t2i, i2t = retrieval_ranks(*_hand_example())
    assert t2i.tolist() == HAND_T2I
    assert i2t.tolist() == HAND_I2T


def test_hand_worked_metrics():
    m = retrieval_metrics(*_hand_example(), ks=(1, 2, 5))
    # t2i ranks [1, 3, 2, 1, 3, 3]: R@1 = 2/6, R@2 = 3/6, R@5 = 6/6
    assert m["t2i/R@1"] == pytest.approx(2 / 6)
    assert m["t2i/R@2"] == pytest.approx(3 / 6)
    assert m["t2i/R@5"] == pytest.approx(1.0)
    assert m["t2i/mean_rank"] == pytest.approx(13 / 6)
    assert m["t2i/median_rank"] == pytest.approx(2.5)  # sorted [1 1 2 3 3 3] -> (2 + 3) / 2
    # i2t ranks [1, 1, 3]: R@1 = R@2 = 2/3, R@5 = 1
    assert m["i2t/R@1"] == pytest.approx(2 / 3)
    assert m["i2t/R@2"] == pytest.approx(2 / 3)
    assert m["i2t/R@5"] == pytest.approx(1.0)
    assert m["i2t/mean_rank"] == pytest.approx(5 / 3)
    assert m["i2t/median_rank"] == pytest.approx(1.0)
    assert len(m) == 10
    ranks = (torch.tensor(HAND_T2I), torch.tensor(HAND_I2T))
    assert metrics_from_ranks(*ranks, ks=(1, 2, 5)) == m


def test_default_keys():
    m = retrieval_metrics(*_hand_example())
    expected = {f"{d}/R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    expected |= {f"{d}/{s}_rank" for d in ("t2i", "i2t") for s in ("mean", "median")}
    assert set(m) == expected


def test_scale_invariant_and_half_precision():
    images, texts, t2i = _hand_example()
    scaled = retrieval_ranks(images * 7.0, texts.float() * 0.3, t2i)
    assert scaled[0].tolist() == HAND_T2I and scaled[1].tolist() == HAND_I2T
    half = retrieval_ranks(images.bfloat16(), texts.bfloat16(), t2i)
    assert half[0].dtype == torch.long and half[0].shape == (6,)


def test_ties_are_not_broken_in_the_query_favour():
    # Exact scores: img0 == img1 == e0, img2 = e1. Captions e0 -> img0, e0 -> img1,
    # e1 -> img2, e2 -> img2 (scores 0 with every image).
    images = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    texts = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    t2i_idx = torch.tensor([0, 1, 2, 2])
    t2i, i2t = retrieval_ranks(images, texts, t2i_idx)
    # cap0: img0 ties img1, own is the lower index -> 1. cap1: img0 ties and is lower -> 2.
    # cap2: unique max -> 1. cap3: all three tie at 0, two lower indices -> 3.
    assert t2i.tolist() == [1, 2, 1, 3]
    # img0 column [1 1 0 0]: own cap0 first -> 1. img1 column [1 1 0 0]: cap0 ties, lower -> 2.
    # img2 column [0 0 1 0]: best own caption cap2 -> 1.
    assert i2t.tolist() == [1, 2, 1]
    m = retrieval_metrics(images, texts, t2i_idx, ks=(1,))
    assert m["t2i/R@1"] == pytest.approx(0.5) and m["i2t/R@1"] == pytest.approx(2 / 3)


def _rank(scores: torch.Tensor, own: int) -> int:
    """1 + candidates scoring higher than ``own``, or equal with a lower index."""
    return 1 + sum(
        bool(scores[j] > scores[own] or (scores[j] == scores[own] and j < own))
        for j in range(len(scores))
    )


def _brute_force(images, texts, t2i_idx):
    """Direct definition on the full similarity matrix, one query at a time."""
    sim = F.normalize(texts, dim=1) @ F.normalize(images, dim=1).T  # (M, N)
    t2i = [_rank(sim[m], int(t2i_idx[m])) for m in range(sim.shape[0])]
    i2t = [
        min(_rank(sim[:, n], m) for m in (t2i_idx == n).nonzero().flatten().tolist())
        for n in range(sim.shape[1])
    ]
    return t2i, i2t


def test_matches_brute_force_with_many_exact_ties():
    g = torch.Generator().manual_seed(0)
    # One-hot embeddings: every score is exactly 0 or 1, so ties are everywhere.
    images = F.one_hot(torch.randint(0, 3, (9,), generator=g), 4).float()
    texts = F.one_hot(torch.randint(0, 4, (20,), generator=g), 4).float()
    t2i_idx = torch.cat([torch.arange(9), torch.randint(0, 9, (11,), generator=g)])
    t2i_idx = t2i_idx[torch.randperm(20, generator=g)]
    expected = _brute_force(images, texts, t2i_idx)
    for chunk in (1, 4, 4096):
        t2i, i2t = retrieval_ranks(images, texts, t2i_idx, chunk_size=chunk)
        assert (t2i.tolist(), i2t.tolist()) == expected


def test_chunked_equals_unchunked_on_random_data():
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    t2i_idx = torch.cat([torch.arange(37), torch.randint(0, 37, (64,), generator=g)])
    t2i_idx = t2i_idx[torch.randperm(101, generator=g)]
    full = retrieval_ranks(images, texts, t2i_idx, chunk_size=4096)
    assert full[0].tolist() == _brute_force(images, texts, t2i_idx)[0]
    for chunk in (1, 5, 16, 37, 100):
        t2i, i2t = retrieval_ranks(images, texts, t2i_idx, chunk_size=chunk)
        assert torch.equal(t2i, full[0]) and torch.equal(i2t, full[1])
    assert full[0].min() >= 1 and full[0].max() <= 37 and full[1].max() <= 101


def test_image_without_caption_raises():
    images, texts = torch.randn(5, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="2 of 5 images have no caption"):
        retrieval_ranks(images, texts, torch.tensor([0, 0, 2, 4]))


@pytest.mark.parametrize(
    "t2i_idx", [torch.tensor([0, 1, 3]), torch.tensor([0, -1, 2]), torch.tensor([0.0, 1.0, 2.0])]
)
def test_bad_caption_index_raises(t2i_idx):
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_ranks(torch.randn(3, 4), torch.randn(3, 4), t2i_idx)


def _fake_encoder(calls: list[list[str]]):
    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(p)))
            rows.append(torch.randn(6, generator=g) * (1 + len(p)))  # deliberately not unit
        return torch.stack(rows)

    return encode


def test_zeroshot_classifier_matches_formula():
    calls: list[list[str]] = []
    encode = _fake_encoder(calls)
    classnames, templates = ["cat", "dog"], ["a photo of a {}.", "a {c} drawing", "{}"]
    weights = zeroshot_classifier(encode, classnames, templates)
    assert calls == [
        ["a photo of a cat.", "a cat drawing", "cat"],
        ["a photo of a dog.", "a dog drawing", "dog"],
    ]
    expected = torch.stack(
        [F.normalize(F.normalize(encode(p), dim=1).mean(0), dim=0) for p in calls[:2]]
    )
    assert weights.shape == (2, 6)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(2))


def test_classification_imbalanced_and_top5_nan():
    classifier = torch.eye(3)
    # 4 images of class 0 (all right), 1 of class 1 (predicted 0), 1 of class 2 (right).
    images = torch.tensor(
        [[1.0, 0, 0], [0.9, 0.1, 0], [0.8, 0, 0.2], [1.0, 0.5, 0.5], [0.7, 0.3, 0], [0, 0, 1.0]]
    )
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    m = classification_metrics(images, classifier, labels)
    assert m["top1"] == pytest.approx(5 / 6)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)  # != top1
    assert math.isnan(m["top5"])


def test_classification_top5():
    classifier = torch.eye(6)
    images = torch.tensor(
        [
            [0.5, 0.3, 0.4, 0.0, 0.0, 0.1],  # label 2 ranks 2nd: top5 hit, top1 miss
            [0.9, 0.8, 0.7, 0.0, 0.6, 0.5],  # label 3 ranks 6th: miss
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],  # label 4 ranks 1st: hit
        ]
    )
    m = classification_metrics(images, classifier, torch.tensor([2, 3, 4]))
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)  # classes 2, 3, 4 only
    with pytest.raises(ValueError):
        classification_metrics(images, classifier, torch.tensor([2, 3, 6]))


def test_confusion_matrix_rows_are_true_class():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    expected = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1]])
    assert cm.dtype == torch.long
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == 5
