"""VLM data: packing through the datamodule, token budgets per policy, skips in collate."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from mmpt.batch import VLMBatch
from mmpt.datamodules.packing import IGNORE_INDEX, pack_row
from mmpt.datamodules.resolution import AnyResTiles, FixedResolution, NativeResolution
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.vlm import Overlong, VLMCollate, VLMSample
from mmpt.preprocess import VLMPreprocess
from mmpt.shards import load_index
from mmpt.synth import make_synthetic
from tests.helpers import jpeg_bytes
from tests.vlm_data_helpers import (
    doc,
    grid_tokens,
    image_bytes,
    make_pre,
    runs,
    sample_fn,
    train_batches,
    word_tokenizer,
    write_shard,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pre(tok):
    return make_pre(tok)


# ---------------------------------------------------------------- packing on synthetic sets


@pytest.fixture(scope="module")
def synth_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic("image-text", root / "it", train_samples=40, image_size=32)
    make_synthetic(
        "interleaved",
        root / "il",
        train_samples=24,
        image_size=32,
        val_samples=2,
        samples_per_shard=10,
    )
    return {"image-text": root / "it", "interleaved": root / "il"}


def shard_samples(folder: Path) -> list[dict]:
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("kind", ["image-text", "interleaved"])
def test_packing_through_the_datamodule(kind, synth_sets):
    root = synth_sets[kind]
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    pre = make_pre(tok)
    max_len = {"image-text": 128, "interleaved": 384}[kind]  # several samples a row
    fn = sample_fn(pre, max_seq_len=max_len)
    expected = {s["__key__"]: fn(s) for s in shard_samples(root / "train")}
    assert not any(e["truncated"] for e in expected.values())
    batches = train_batches(root / "train", pre, batch_size=2, max_seq_len=max_len)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(expected)  # each sample exactly once
    img = pre.image_token_id
    for b in batches:
        assert b.input_ids.shape[1] == max_len and len(b) <= 2
        assert b.skipped == 0 and b.num_truncated == 0
        assert b.num_samples == len(b.keys)
        # segments: every real one is a whole sample, positions restart at 0
        flat_ids, flat_pos = b.input_ids.flatten(), b.position_ids.flatten()
        cu = b.cu_seqlens.tolist()
        assert cu[-1] == b.input_ids.numel()
        real = []
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            assert torch.equal(flat_pos[s:e], torch.arange(e - s))
            if not (flat_ids[s:e] == pre.pad_id).all():
                real.append((s, e))
        assert len(real) == len(b.keys)
        for (s, e), key in zip(real, b.keys, strict=True):
            assert torch.equal(flat_ids[s:e], expected[key]["input_ids"])
            labels = b.labels.flatten()[s:e]
            assert labels[0] == IGNORE_INDEX
            assert torch.equal(labels[1:], expected[key]["labels"][1:])
        assert b.num_real_tokens == sum(e - s for s, e in real)
        # image-token runs <-> layouts, in order and length
        per_layout = [
            sum(grid_tokens(g) for g in lay.grids) + lay.row_end_tokens for lay in b.images
        ]
        assert runs(b.input_ids, img) == per_layout
        assert int((b.input_ids == img).sum()) == sum(per_layout)
        n_images = sum(len(expected[k]["images"]) for k in b.keys)
        assert len(b.images) == n_images
        assert sum(p.shape[0] for p in b.pixels) == n_images
        assert all(p.dtype == torch.uint8 and p.shape[1:] == (3, 32, 32) for p in b.pixels)
        assert (b.labels[b.input_ids == img] == IGNORE_INDEX).all()
    rows = [r for b in batches for r in b.input_ids]
    fills = sorted(float((r != pre.pad_id).float().mean()) for r in rows)
    assert len(rows) >= 4
    assert fills[-1] > 0.9 and sum(fills[1:]) / len(fills[1:]) > 0.9  # all but the emptiest


@pytest.mark.parametrize("kind", ["image-text", "interleaved"])
def test_no_packing_pads_each_sample_to_the_batch_longest(kind, synth_sets):
    root = synth_sets[kind]
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    pre = make_pre(tok)
    fn = sample_fn(pre, max_seq_len=128)
    lengths = {s["__key__"]: fn(s)["input_ids"].shape[0] for s in shard_samples(root / "train")}
    batches = train_batches(root / "train", pre, batch_size=4, max_seq_len=128, packing=False)
    assert sorted(k for b in batches for k in b.keys) == sorted(lengths)
    widths = set()
    for b in batches:
        assert len(b) == len(b.keys) == b.num_samples <= 4
        longest = max(lengths[k] for k in b.keys)
        assert b.input_ids.shape[1] == longest
        widths.add(longest)
        for row, key in zip(b.input_ids, b.keys, strict=True):
            n = lengths[key]
            assert (row[n:] == pre.pad_id).all() and not (row[:n] == pre.pad_id).any()
        assert b.num_real_tokens == sum(lengths[k] for k in b.keys)
    if kind == "interleaved":
        assert len(widths) > 1  # padded per batch, not to a fixed length


# ---------------------------------------------------------------- token budgets per policy

SIZES = [((40, 20), "PNG"), ((20, 60), "JPEG"), ((33, 33), "PNG"), ((64, 16), "JPEG")]


def multi_image_sample(seed: int = 0) -> dict:
    members = {f"{i}.img": image_bytes(size, fmt, seed + i) for i, (size, fmt) in enumerate(SIZES)}
    names = list(members)
    texts = [x for name in names for x in ("hello", None)]
    images = [x for name in names for x in (None, name)]
    return doc("multi", texts, images, **members)


def collate_one(pre: VLMPreprocess, sample: dict, max_images: int = 6) -> tuple[dict, VLMBatch]:
    out = sample_fn(pre, max_seq_len=1024, max_images=max_images)(sample)
    n = out["input_ids"].shape[0]
    return out, VLMCollate(pre, "plain")([pack_row([out], n + 3, pre.pad_id)])


def test_anyres_budget_matches_crops_and_sets_layout(tok):
    policy = AnyResTiles(
        tile_size=16, patch_size=8, max_tiles=4, global_view=True, row_end_token=True
    )
    pre = make_pre(tok, policy)
    out, batch = collate_one(pre, multi_image_sample())
    assert len(batch.images) == len(SIZES)
    grids = set()
    for (size, _), layout, count in zip(SIZES, batch.images, out["image_tokens"], strict=True):
        rows, cols = policy.select_grid(*size)
        grids.add((rows, cols))
        assert layout.tiles == (rows, cols)
        assert layout.global_view is True
        assert layout.row_end_tokens == rows * 2  # tile 16 / patch 8 patch rows per tile row
        assert len(layout.crops) == len(layout.grids) == 1 + rows * cols
        assert count == 4 * (1 + rows * cols) + rows * 2
    assert len(grids) > 2  # the sizes really pick different tile grids
    assert runs(batch.input_ids, pre.image_token_id) == out["image_tokens"]
    assert all(p.shape[1:] == (3, 16, 16) for p in batch.pixels)


def test_native_budget_matches_crops(tok):
    policy = NativeResolution(patch_size=8, max_num_patches=12)
    pre = make_pre(tok, policy)
    out, batch = collate_one(pre, multi_image_sample(seed=3))
    shapes = set()
    for (size, _), layout, count in zip(SIZES, batch.images, out["image_tokens"], strict=True):
        gh, gw = policy.grid(*size)
        assert layout.grids == [(gh, gw)] and gh * gw <= 12
        assert layout.tiles is None and not layout.global_view and layout.row_end_tokens == 0
        assert count == gh * gw
        g, i = layout.crops[0]
        assert batch.pixels[g][i].shape == (3, gh * 8, gw * 8)
        shapes.add((gh, gw))
    assert len(shapes) > 2  # aspect kept: different grids
    assert runs(batch.input_ids, pre.image_token_id) == out["image_tokens"]


def test_collate_rejects_a_policy_whose_budget_disagrees(tok):
    class Liar(FixedResolution):
        def num_tokens(self, width, height, tokens_for_grid):
            return 3

    pre = make_pre(tok, Liar(32, 8))
    with pytest.raises(RuntimeError, match="disagrees"):
        collate_one(pre, multi_image_sample())


def test_fusion_mode_costs_one_token_per_image(tok):
    for policy in (FixedResolution(32, 8), AnyResTiles(16, 8, max_tiles=4)):
        pre = make_pre(tok, policy, tokens_for_grid=None)
        out, batch = collate_one(pre, multi_image_sample())
        assert out["image_tokens"] == [1] * len(SIZES)
        assert runs(batch.input_ids, pre.image_token_id) == [1] * len(SIZES)
        assert len(batch.images) == len(SIZES)
        pair = sample_fn(pre)({"__key__": "p", "jpg": jpeg_bytes(0), "txt": b"a red circle"})
        assert pair["input_ids"].tolist().count(pre.image_token_id) == 1


def test_undecodable_json_and_text_are_counted_skips_not_worker_crashes(tmp_path, pre):
    """JSONDecodeError / UnicodeDecodeError cannot be rebuilt from one message string."""
    good = {"__key__": "good", "jpg": jpeg_bytes(1), "txt": "a red circle"}
    bad_json = {"__key__": "badjson", "jpg": jpeg_bytes(2), "json": b"{not json"}
    bad_text = {"__key__": "badtxt", "jpg": jpeg_bytes(3), "txt": b"\xff\xfe\xfa"}
    shard = write_shard(tmp_path / "bad", [bad_json, good, bad_text])
    batches = train_batches(shard, pre, batch_size=1, max_seq_len=64)
    assert [k for b in batches for k in b.keys] == ["good"]
    assert sum(b.skipped for b in batches) == 2


def test_truncation_that_leaves_no_target_is_a_counted_skip(pre):
    """A ChatML prompt cut before its answer would make an all-masked row."""
    sample = {"__key__": "q", "jpg": jpeg_bytes(4), "txt": "a red circle"}
    fn = VLMSample(pre, get_template("chatml"), max_seq_len=18, caption_prompt="what is this")
    with pytest.raises(Overlong, match="no target"):
        fn(sample)


def test_image_token_typed_in_raw_text_is_refused(pre):
    """Only placeholders may produce image tokens; otherwise counts and positions disagree."""
    tok = pre.tokenizer
    other = Image.new("RGB", (32, 32))
    buf = io.BytesIO()
    other.save(buf, format="PNG")
    sample = {"__key__": "t", "png": buf.getvalue(), "txt": "a red circle"}
    fn = VLMSample(pre, get_template("plain"), max_seq_len=64)
    assert fn(sample)["image_tokens"] == [16]
    raw_id = tok.convert_tokens_to_ids("circle")
    fooled = VLMPreprocess(**{**pre.__dict__, "image_token_id": raw_id})
    with pytest.raises(ValueError, match="image token itself"):
        VLMSample(fooled, get_template("plain"), max_seq_len=64)(sample)
