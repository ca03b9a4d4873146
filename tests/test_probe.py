"""Frozen-feature probes (kNN, linear probe, metrics) against hand-worked examples."""

import math

import pytest
import torch

from mmpt.eval.probe import knn_classify, linear_probe, probe_metrics, standardise


def _unit(degrees: list[float]) -> torch.Tensor:
    """Unit 2-D vectors (len, 2) at the given angles, in float64."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


# Class 0 at 0/10/20 deg, class 1 at 90/100/110 deg, a lone class-2 point at 48 deg.
TRAIN = _unit([0, 10, 20, 90, 100, 110, 48])
TRAIN_Y = torch.tensor([0, 0, 0, 1, 1, 1, 2])


def test_knn_hand_worked_2d() -> None:
    # Angular distances from 52 deg: 48 -> 4 (c2), 20 -> 32 (c0), 90 -> 38 (c1), 10 -> 42 (c0).
    test = _unit([5, 100, 52])
    assert knn_classify(TRAIN, TRAIN_Y, test, k=1).tolist() == [0, 1, 2]
    # k=3 at 52 deg: one vote each for c2, c0, c1 -> largest summed similarity (c2) wins.
    assert knn_classify(TRAIN, TRAIN_Y, test, k=3).tolist() == [0, 1, 2]
    # k=4 at 52 deg adds the 10 deg point: c0 has two votes and wins.
    assert knn_classify(TRAIN, TRAIN_Y, test, k=4).tolist() == [0, 1, 0]
    # Scale does not matter (cosine), and k > N falls back to all N neighbours (c0 and c1 tie
    # at 3 votes; c0 is closer to 5 deg).
    assert knn_classify(3 * TRAIN, TRAIN_Y, 0.5 * test, k=4).tolist() == [0, 1, 0]
    assert knn_classify(TRAIN, TRAIN_Y, _unit([5]), k=50).tolist() == [0]


def test_knn_tie_smaller_class_id() -> None:
    # The query at 45 deg is exactly equidistant from both points: votes and summed similarity
    # tie, so the smaller class id wins regardless of training order or label values.
    train = _unit([0, 90])
    query = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    for labels in ([3, 1], [1, 3]):
        y = torch.tensor(labels)
        assert knn_classify(train, y, query, k=2).tolist() == [1]
        assert knn_classify(train, y, query, k=2, temperature=0.1).tolist() == [1]


def test_knn_tie_broken_by_similarity() -> None:
    # Two votes each; class 1's neighbours sit closer to the query at 0 deg.
    train = _unit([30, -30, 10, -10])
    y = torch.tensor([0, 0, 1, 1])
    assert knn_classify(train, y, _unit([0]), k=4).tolist() == [1]
    y_swapped = torch.tensor([1, 1, 0, 0])
    assert knn_classify(train, y_swapped, _unit([0]), k=4).tolist() == [0]


def test_knn_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (200,), generator=g)
    test = torch.randn(53, 16, generator=g, dtype=torch.float64)
    for temperature in (None, 0.07):
        full = knn_classify(train, y, test, k=5, temperature=temperature, chunk_size=4096)
        for chunk in (1, 7, 53):
            chunked = knn_classify(train, y, test, k=5, temperature=temperature, chunk_size=chunk)
            assert torch.equal(full, chunked)
        assert full.shape == (53,) and full.dtype == torch.long


def test_weighted_knn_flips_borderline_case() -> None:
    # Two very close class-0 points versus three farther class-1 points: the plain majority
    # picks class 1, the exp(s / T) weighting (T = 0.07) lets the close pair win.
    train = _unit([5, -5, 40, -40, 45, 180])
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    query = _unit([0])
    assert knn_classify(train, y, query, k=5).tolist() == [1]
    assert knn_classify(train, y, query, k=5, temperature=0.07).tolist() == [0]
    # A very large temperature makes all weights ~1 and recovers the majority vote.
    assert knn_classify(train, y, query, k=5, temperature=1e6).tolist() == [1]


def test_knn_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        knn_classify(TRAIN, TRAIN_Y, _unit([0]), k=0)
    with pytest.raises(ValueError):
        knn_classify(TRAIN, TRAIN_Y, _unit([0]), temperature=0.0)
    with pytest.raises(ValueError):
        knn_classify(TRAIN, TRAIN_Y, torch.zeros(1, 3))
    with pytest.raises(ValueError):
        knn_classify(TRAIN, TRAIN_Y, _unit([0]), num_classes=2)


def _blobs(seed: int, n_per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 5-D with a large common offset and scale."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0, 0, 0, 0], [6, 0, 0, 0, 0], [0, 6, 0, 0, 0]])
    x = torch.cat([c + 0.5 * torch.randn(n_per_class, 5, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return 10 * x + 100, y


def test_linear_probe_separable_blobs() -> None:
    x_train, y_train = _blobs(0)
    x_test, y_test = _blobs(1)
    for batch_size, lr in ((None, 0.1), (16, 1e-2)):
        pred = linear_probe(x_train, y_train, x_test, 3, epochs=100, lr=lr, batch_size=batch_size)
        assert pred.dtype == torch.long and pred.shape == y_test.shape
        assert torch.equal(pred, y_test)


def test_linear_probe_deterministic() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(90, 8, generator=g), torch.randint(0, 4, (90,), generator=g)
    test = torch.randn(30, 8, generator=g)
    a = linear_probe(x, y, test, 4, epochs=5, batch_size=8, seed=0)
    b = linear_probe(x, y, test, 4, epochs=5, batch_size=8, seed=0)
    assert torch.equal(a, b)


def test_standardise_uses_train_statistics_only() -> None:
    x_train, _ = _blobs(0)
    x_test, _ = _blobs(1)
    train_z, test_z = standardise(x_train, x_test)
    train_z2, test_z2 = standardise(x_train, x_test + 1000.0)
    assert torch.equal(train_z, train_z2)
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    torch.testing.assert_close(test_z, (x_test - mean) / std)
    torch.testing.assert_close(test_z2 - test_z, (1000.0 / std).expand_as(test_z))
    torch.testing.assert_close(train_z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)


def test_linear_probe_ignores_test_features_when_training() -> None:
    # If test features leaked into the statistics, appending far-away test rows would change
    # the trained model and hence the predictions on the original test rows.
    x_train, y_train = _blobs(0)
    g = torch.Generator().manual_seed(5)
    x_test = 10 * torch.randn(20, 5, generator=g) + 100
    alone = linear_probe(x_train, y_train, x_test, 3, epochs=10, batch_size=32)
    both = linear_probe(
        x_train, y_train, torch.cat([x_test, x_test + 500]), 3, epochs=10, batch_size=32
    )
    assert torch.equal(both[:20], alone)


def test_probe_metrics_hand_worked() -> None:
    # True:  0 0 0 0 1 1 2 2 2 2   (class 3 absent)
    # Pred:  0 0 1 2 1 0 2 2 2 3
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 2, 3])
    out = probe_metrics(pred, labels, num_classes=4)
    expected_cm = torch.tensor(
        [[2, 1, 1, 0], [1, 1, 0, 0], [0, 0, 3, 1], [0, 0, 0, 0]], dtype=torch.long
    )
    assert torch.equal(out["confusion_matrix"], expected_cm)
    assert out["top1"] == pytest.approx(6 / 10)
    recall = out["per_class_recall"]
    assert recall[:3] == pytest.approx([2 / 4, 1 / 2, 3 / 4])
    assert math.isnan(recall[3])
    assert out["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    with pytest.raises(ValueError):
        probe_metrics(torch.tensor([0]), torch.tensor([4]), num_classes=4)


# --- leave-one-out kNN (the per-set probe of the evaluation callback) ------------------------


def test_knn_top1_loo_separable_and_shuffled() -> None:
    from mmpt.eval.probe import knn_top1_loo

    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 16, generator=gen)
    assert knn_top1_loo(feats, labels, k=5) == 1.0
    shuffled = labels[torch.randperm(200, generator=gen)]
    assert abs(knn_top1_loo(feats, shuffled, k=5) - 0.25) < 0.12  # about chance
    # Unlabelled rows (-1) take no part; too few rows or one class gives NaN.
    assert (
        knn_top1_loo(torch.cat([feats, feats[:3]]), torch.cat([labels, -torch.ones(3).long()]))
        == 1.0
    )
    assert math.isnan(knn_top1_loo(feats[:1], labels[:1]))
    assert math.isnan(knn_top1_loo(feats[:50], labels[:50]))


def test_knn_exclude_self_masks_each_rows_own_row() -> None:
    feats = _unit([0, 0, 90, 91])
    labels = torch.tensor([0, 0, 1, 1])
    # Without exclusion each row is its own nearest neighbour; with it, row 0's nearest is its
    # duplicate row 1 and row 2's is row 3.
    assert knn_classify(feats, labels, feats, k=1).tolist() == [0, 0, 1, 1]
    lone = _unit([0, 45, 90])
    lone_y = torch.tensor([0, 1, 2])
    assert knn_classify(lone, lone_y, lone, k=1).tolist() == [0, 1, 2]
    loo = knn_classify(lone, lone_y, lone, k=1, exclude_self=True).tolist()
    assert loo[0] == 1 and loo[2] == 1 and loo[1] in (0, 2)  # never itself
    dup = _unit([0, 0, 90])
    dup_y = torch.tensor([0, 1, 1])  # row 1 duplicates row 0 with another label
    assert knn_classify(dup, dup_y, dup, k=1, exclude_self=True).tolist()[:2] == [1, 0]
    # k is capped at N - 1; shapes must match.
    assert knn_classify(feats, labels, feats, k=10, exclude_self=True).shape == (4,)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_classify(feats, labels, feats[:2], exclude_self=True)
