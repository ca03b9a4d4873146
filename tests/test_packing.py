"""Sequence packing: first-fit-decreasing, packed rows and the cu_seqlens contract."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmpt.datamodules.packing import (
    IGNORE_INDEX,
    collate_packed,
    first_fit_decreasing,
    pack_sequences,
    pack_stream,
)
from mmpt.models.attention import cu_seqlens_from_position_ids


def sample(n: int, key: int = 0, start: int = 1) -> dict:
    ids = torch.arange(start, start + n)
    return {"input_ids": ids, "labels": ids + 1000, "__key__": f"s{key}"}


@pytest.mark.parametrize(
    ("lengths", "max_len", "bins"),
    [
        ([6, 5, 4, 3, 2], 10, [[0, 2], [1, 3, 4]]),
        ([5, 5, 5, 5], 10, [[0, 1], [2, 3]]),
        ([7, 7, 7], 10, [[0], [1], [2]]),
        ([1, 9, 2, 8, 3, 7], 10, [[1, 0], [3, 2], [5, 4]]),
        ([], 10, []),
    ],
)
def test_first_fit_decreasing_known_cases(lengths, max_len, bins):
    assert first_fit_decreasing(lengths, max_len) == bins


def test_first_fit_decreasing_invariants_and_bound():
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 80))]
        bins = first_fit_decreasing(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
        lower = math.ceil(sum(lengths) / 64)  # no packing can use fewer bins
        assert len(bins) <= 11 / 9 * lower + 6 / 9 + 1e-9  # FFD's proven worst case


@pytest.mark.parametrize("lengths", [[3, 11], [3, 0]])
def test_first_fit_decreasing_rejects_items_that_cannot_fit(lengths):
    with pytest.raises(ValueError, match="lengths must be in 1..10"):
        first_fit_decreasing(lengths, 10)


def test_pack_sequences_rows_positions_labels_and_fill():
    seqs = [sample(n, i, start=10 * i + 1) for i, n in enumerate([6, 5, 4, 3])]
    batch = pack_sequences(seqs, max_len=10, pad_id=0)
    assert batch["bins"] == [[0, 2], [1, 3]]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 10)
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 0, 1, 2, 0, 1],  # the pad tail restarts too: its own segment
    ]
    row = batch["input_ids"][1].tolist()
    assert row[:8] == seqs[1]["input_ids"].tolist() + seqs[3]["input_ids"].tolist()
    assert row[8:] == [0, 0]
    labels = batch["labels"][1].tolist()
    assert labels[8:] == [IGNORE_INDEX] * 2
    assert labels[0] == labels[5] == IGNORE_INDEX  # each sample's first label (HF shifts)
    assert labels[1:5] == seqs[1]["labels"][1:].tolist()
    assert batch["num_real_tokens"] == 18 and batch["num_samples"] == 4
    assert batch["fill_fraction"] == pytest.approx(18 / 20)
    assert batch["__key__"] == ["s0", "s2", "s1", "s3"]  # per-sample values in row order


def test_cu_seqlens_is_the_contract_models_attention_reads():
    seqs = [sample(n, i) for i, n in enumerate([6, 5, 4, 3, 1])]
    batch = pack_sequences(seqs, max_len=8, pad_id=0)
    rows, max_len = batch["input_ids"].shape
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == rows * max_len
    assert set(range(0, rows * max_len + 1, max_len)) <= set(cu.tolist())  # rows are cut
    assert torch.equal(cu, cu_seqlens_from_position_ids(batch["position_ids"]))
    assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())


def test_token_keys_are_padded_and_other_keys_listed():
    seqs = [sample(n, i) for i, n in enumerate([3, 2])]
    for s in seqs:
        s["image_mask"] = torch.ones(len(s["input_ids"]), dtype=torch.bool)
        s["pixels"] = torch.zeros(3, 4, 4)
    batch = pack_sequences(seqs, max_len=7, pad_id=0, token_keys=["image_mask"])
    assert batch["image_mask"].tolist() == [[True] * 5 + [False] * 2]
    assert len(batch["pixels"]) == 2


def test_overlong_samples_are_truncated_or_dropped_and_counted():
    seqs = [sample(12, 0), sample(4, 1), sample(0, 2)]
    cut = pack_sequences(seqs, max_len=10, pad_id=0, overlong="truncate")
    assert (cut["num_truncated"], cut["num_dropped"], cut["num_samples"]) == (1, 1, 2)
    assert cut["input_ids"][0].tolist() == list(range(1, 11))  # first max_len tokens kept
    drop = pack_sequences(seqs, max_len=10, pad_id=0, overlong="drop")
    assert (drop["num_truncated"], drop["num_dropped"], drop["num_samples"]) == (0, 2, 1)
    assert drop["bins"] == [[1]]


def test_bad_samples_get_clear_errors():
    with pytest.raises(KeyError, match="labels"):
        pack_sequences([{"input_ids": torch.arange(3)}], max_len=4, pad_id=0)
    bad = sample(3) | {"image_mask": torch.ones(2)}
    with pytest.raises(ValueError, match="image_mask"):
        pack_sequences([bad], max_len=4, pad_id=0, token_keys=["image_mask"])
    with pytest.raises(ValueError, match="overlong"):
        pack_sequences([sample(3)], max_len=4, pad_id=0, overlong="split")


def lognormal_stream(n: int, max_len: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        length = min(max_len, max(1, round(rng.lognormvariate(math.log(60), 1.0))))
        yield sample(length, i)


def test_pack_stream_fills_rows_and_yields_every_sample_once():
    rows = list(pack_stream(lognormal_stream(3000, 512), max_len=512, pad_id=0, buffer_size=256))
    keys = [k for r in rows for k in r["__key__"]]
    assert sorted(keys) == sorted(f"s{i}" for i in range(3000))
    assert all(r["input_ids"].shape == (512,) for r in rows)
    fill = sum(r["num_real_tokens"] for r in rows) / (512 * len(rows))
    assert fill >= 0.95
    batch = collate_packed(rows[:8])
    assert batch["input_ids"].shape == (8, 512)
    assert batch["cu_seqlens"][-1] == 8 * 512
    assert batch["fill_fraction"] == pytest.approx(
        sum(r["num_real_tokens"] for r in rows[:8]) / (8 * 512)
    )


def test_pack_stream_counts_dropped_samples_on_the_rows():
    samples = [sample(n, i) for i, n in enumerate([3, 20, 4, 0, 5, 30, 2])]
    rows = list(pack_stream(samples, max_len=8, pad_id=0, buffer_size=3, overlong="drop"))
    assert sum(r["num_dropped"] for r in rows) == 3
    assert sorted(k for r in rows for k in r["__key__"]) == ["s0", "s2", "s4", "s6"]
    assert all(r["num_real_tokens"] <= 8 for r in rows)
