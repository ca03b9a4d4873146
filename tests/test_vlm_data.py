"""VLM data: every sample shape, bad input, packing through the datamodule, token budgets."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from mmpt.batch import VLMBatch
from mmpt.datamodules.packing import IGNORE_INDEX, pack_row
from mmpt.datamodules.resolution import AnyResTiles, FixedResolution, NativeResolution, header_size
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.vlm import Overlong, VLMCollate, VLMDataModule, VLMSample
from mmpt.preprocess import ImagePreprocess, VLMPreprocess
from mmpt.shards import ShardWriter, load_index
from mmpt.synth import make_synthetic
from mmpt.synth.vocab import write_word_tokenizer
from tests.helpers import jpeg_bytes

WORDS = [
    *("hello", "world", "a", "red", "circle", "the", "end", "what", "is", "this"),
    *("user", "assistant", "system", "USER", "ASSISTANT", ":"),
]


def grid_tokens(grid: tuple[int, int]) -> int:
    """One LLM token per vision patch (module level: picklable)."""
    return grid[0] * grid[1]


def make_pre(tok: Any, policy: Any = None, tokens_for_grid: Any = grid_tokens) -> VLMPreprocess:
    """Default policy FixedResolution(32, 8): a 4 x 4 grid, so 16 tokens an image."""
    return VLMPreprocess(
        tokenizer=tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_id=tok.pad_token_id,
        eos="</s>",
        policy=policy or FixedResolution(32, 8),
        tokens_for_grid=tokens_for_grid,
        image=ImagePreprocess(size=32),
    )


def image_bytes(size: tuple[int, int], fmt: str = "PNG", seed: int = 0) -> bytes:
    """A ``size`` = (width, height) image with distinct, non-black pixels."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(30, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format=fmt)
    return buf.getvalue()


def doc(key: str, texts: list[str | None], images: list[str | None], **members: bytes) -> dict:
    """An interleaved sample as webdataset yields it (bytes values)."""
    return {
        "__key__": key,
        "json": json.dumps({"texts": texts, "images": images}).encode(),
        **members,
    }


def runs(ids: torch.Tensor, value: int) -> list[int]:
    """Lengths of the runs of ``value`` over ``ids`` flattened row-major."""
    out, n = [], 0
    for v in ids.flatten().tolist():
        if v == value:
            n += 1
        elif n:
            out, n = [*out, n], 0
    return [*out, n] if n else out


def kept_text(tok: Any, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def write_shard(folder: Path, samples: list[dict]) -> Path:
    with ShardWriter(folder, samples_per_shard=1000, modalities=["image", "text"]) as w:
        for s in samples:
            w.write(s)
    return folder


def train_batches(urls: Path, pre: VLMPreprocess, **kw: Any) -> list[VLMBatch]:
    """One plain pass (no shuffling, no workers) over ``urls`` as a VLMDataModule streams it."""
    kw = {"batch_size": 2, "max_seq_len": 128, **kw}
    dm = VLMDataModule(
        train=StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False),
        num_workers=0,
        preprocess=pre,
        **kw,
    )
    dm.setup("fit")
    return list(dm.train_dataloader())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", WORDS)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pre(tok) -> VLMPreprocess:
    return make_pre(tok)


def sample_fn(pre: VLMPreprocess, template: str = "plain", max_seq_len: int = 256, **kw):
    return VLMSample(pre, get_template(template), max_seq_len, **kw)


# ---------------------------------------------------------------- sample shapes


def test_pair_caption_is_the_only_target(pre, tok):
    img = jpeg_bytes(0, 24)
    out = sample_fn(pre)({"__key__": "p0", "jpg": img, "txt": b" a red circle \n"})
    assert out["key"] == "p0" and out["truncated"] == 0
    assert out["images"] == [img]
    assert out["image_tokens"] == [pre.policy.num_tokens(24, 24, grid_tokens)] == [16]
    ids, labels = out["input_ids"], out["labels"]
    # "plain": the image, then the caption and eos; nothing else
    assert ids[:16].tolist() == [pre.image_token_id] * 16
    assert tok.decode(ids[16:].tolist()) == "a red circle </s>"
    assert kept_text(tok, labels) == "a red circle </s>"
    assert (labels[:16] == IGNORE_INDEX).all()


def test_pair_with_prompt_and_chat_template_keeps_only_the_caption(pre, tok):
    fn = sample_fn(pre, "chatml", caption_prompt="what is this")
    out = fn(
        {"__key__": "p1", "png": image_bytes((40, 20)), "json": b'{"caption": "a red circle"}'}
    )
    assert runs(out["input_ids"], pre.image_token_id) == [16]
    assert kept_text(tok, out["labels"]) == "a red circle <|im_end|>"
    text = tok.decode([i for i in out["input_ids"].tolist() if i != pre.image_token_id])
    expected = (
        "<|im_start|> user what is this <|im_end|> <|im_start|> assistant a red circle <|im_end|>"
    )
    assert text == expected


def test_interleaved_images_follow_the_document_and_text_is_kept(pre, tok):
    a, b = jpeg_bytes(1), jpeg_bytes(2)
    sample = doc(
        "d0",
        ["hello world", None, "a red circle", None, "the end"],
        [None, "1.jpg", None, "0.jpg", None],
        **{"0.jpg": a, "1.jpg": b},
    )
    out = sample_fn(pre)(sample)
    assert out["images"] == [b, a]  # json order, not member name order
    assert out["image_tokens"] == [16, 16]
    ids = out["input_ids"]
    img = pre.image_token_id
    words = tok.convert_tokens_to_ids(["hello", "world", "a", "red", "circle", "the", "end"])
    expected = [*words[:2], *[img] * 16, *words[2:5], *[img] * 16, *words[5:], tok.eos_token_id]
    assert ids.tolist() == expected
    assert kept_text(tok, out["labels"]) == "hello world a red circle the end </s>"
    assert (out["labels"][ids == img] == IGNORE_INDEX).all()


def test_interleaved_max_images_drops_later_images_but_keeps_text(pre, tok):
    members = {f"{i}.jpg": jpeg_bytes(i) for i in range(3)}
    sample = doc(
        "d1",
        ["hello", None, "world", None, "a red", None, "circle"],
        [None, "0.jpg", None, "1.jpg", None, "2.jpg", None],
        **members,
    )
    out = sample_fn(pre, max_images=2)(sample)
    assert out["images"] == [members["0.jpg"], members["1.jpg"]]
    assert out["image_tokens"] == [16, 16]
    assert runs(out["input_ids"], pre.image_token_id) == [16, 16]
    assert kept_text(tok, out["labels"]) == "hello world a red circle </s>"
    # the dropped image's placeholder is gone, its neighbours' text is joined
    img, w = pre.image_token_id, tok.convert_tokens_to_ids
    expected = [w("hello"), *[img] * 16, w("world"), *[img] * 16, *w(["a", "red", "circle"])]
    assert out["input_ids"].tolist() == [*expected, tok.eos_token_id]


def test_conversation_messages_get_the_image_in_the_first_user_turn(pre, tok):
    img = jpeg_bytes(3)
    meta = {
        "messages": [
            {"role": "system", "content": "hello"},
            {"role": "user", "content": "what is this"},
            {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": "what is this"},
            {"role": "assistant", "content": "the end"},
        ]
    }
    out = sample_fn(pre, "chatml")({"__key__": "c0", "jpg": img, "json": json.dumps(meta)})
    assert out["images"] == [img] and out["image_tokens"] == [16]
    ids = out["input_ids"].tolist()
    first = ids.index(pre.image_token_id)
    # <|im_start|> user <image>x16 what is this: the image opens the FIRST user turn
    user_start = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|im_start|>")]
    assert first == user_start[1] + 2  # [0] opens the system turn; [1] + 1 is "user"
    assert ids[first + 16 : first + 19] == tok.convert_tokens_to_ids(["what", "is", "this"])
    assert runs(out["input_ids"], pre.image_token_id) == [16]
    assert kept_text(tok, out["labels"]) == "a red circle <|im_end|> the end <|im_end|>"


def test_llava_conversations_equal_messages(pre, tok):
    img = jpeg_bytes(4)
    fn = sample_fn(pre, "vicuna")
    messages = {
        "messages": [
            {"role": "user", "content": "what is this"},
            {"role": "assistant", "content": "a red circle"},
        ]
    }
    with_placeholder = {
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is this"},
            {"from": "gpt", "value": "a red circle"},
        ]
    }
    without = {
        "conversations": [
            {**t, "value": t["value"].replace("<image>\n", "")}
            for t in with_placeholder["conversations"]
        ]
    }
    outs = [
        fn({"__key__": "c", "jpg": img, "json": json.dumps(m).encode()})
        for m in (messages, with_placeholder, without)
    ]
    for out in outs[1:]:
        assert torch.equal(out["input_ids"], outs[0]["input_ids"])
        assert torch.equal(out["labels"], outs[0]["labels"])
        assert out["images"] == [img]
    assert runs(outs[0]["input_ids"], pre.image_token_id) == [16]
    assert kept_text(tok, outs[0]["labels"]) == "a red circle </s>"


def test_conversation_with_named_images(pre, tok):
    a, b = jpeg_bytes(5), jpeg_bytes(6)
    meta = {
        "images": ["b.png", "a.jpg"],
        "conversations": [
            {"from": "human", "value": "what is this"},
            {"from": "gpt", "value": "a red circle"},
        ],
    }
    out = sample_fn(pre, "chatml")(
        {"__key__": "c2", "a.jpg": a, "b.png": b, "json": json.dumps(meta).encode()}
    )
    assert out["images"] == [b, a]
    assert runs(out["input_ids"], pre.image_token_id) == [32]  # both open the user turn


def test_text_only_sample(pre, tok):
    for sample in (
        {"__key__": "t0", "txt": b"hello world"},
        {"__key__": "t0", "json": b'{"text": "hello world", "key": "t0"}'},
    ):
        out = sample_fn(pre)(sample)
        assert out["images"] == [] and out["image_tokens"] == []
        assert pre.image_token_id not in out["input_ids"].tolist()
        assert torch.equal(out["labels"], out["input_ids"])  # all of it is the target
        assert tok.decode(out["input_ids"].tolist()) == "hello world </s>"


def test_interleaved_texts_and_images_must_be_parallel(pre):
    sample = doc("d", ["hello", None], [None, "0.jpg", None], **{"0.jpg": jpeg_bytes(0)})
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        sample_fn(pre)(sample)


def test_sample_fn_and_collate_pickle_for_workers(pre):
    sample = {"__key__": "p", "jpg": jpeg_bytes(0), "txt": b"a red circle"}
    fn, collate = sample_fn(pre), VLMCollate(pre, "plain")
    fn2, collate2 = pickle.loads(pickle.dumps((fn, collate)))
    out, out2 = fn(sample), fn2(sample)
    assert torch.equal(out["input_ids"], out2["input_ids"])
    batch = collate2([pack_row([out2], 32, pre.pad_id)])
    assert batch.keys == ["p"] and len(batch.images) == 1


# ---------------------------------------------------------------- overlong


def test_truncate_cuts_before_an_image_that_would_be_split(pre, tok):
    a, b = jpeg_bytes(7), jpeg_bytes(8)
    sample = doc(
        "long",
        ["hello world", None, "a red circle", None, "the end"],
        [None, "0.jpg", None, "1.jpg", None],
        **{"0.jpg": a, "1.jpg": b},
    )
    # 2 + 16 + 3 + 16 + 2 + eos = 40 tokens; the 2nd image spans positions 21..36
    full = sample_fn(pre)(sample)
    assert full["input_ids"].shape[0] == 40 and full["truncated"] == 0
    out = sample_fn(pre, max_seq_len=30)(sample)
    assert out["truncated"] == 1
    assert out["input_ids"].shape[0] == 21  # cut where the 2nd image starts, not at 30
    assert out["images"] == [a] and out["image_tokens"] == [16]
    assert runs(out["input_ids"], pre.image_token_id) == [16]
    assert kept_text(tok, out["labels"]) == "hello world a red circle"
    # a cut after the last image keeps both images and cuts the text
    out = sample_fn(pre, max_seq_len=38)(sample)
    assert out["input_ids"].shape[0] == 38 and out["truncated"] == 1
    assert out["images"] == [a, b] and runs(out["input_ids"], pre.image_token_id) == [16, 16]
    # a first image longer than max_seq_len cannot be kept at all
    with pytest.raises(Overlong, match="first image"):
        sample_fn(pre, max_seq_len=10)({"__key__": "p", "jpg": a, "txt": b"a red circle"})


@pytest.fixture
def overlong_shard(tmp_path) -> Path:
    # 2 + 16 + 39 + 16 + 2 + eos = 76 tokens > max_seq_len 64; the 2nd image spans 57..72
    long_doc = doc(
        "long",
        ["hello world", None, " ".join(["a red circle"] * 13), None, "the end"],
        [None, "0.jpg", None, "1.jpg", None],
        **{"0.jpg": jpeg_bytes(9), "1.jpg": jpeg_bytes(10)},
    )
    samples = [{"__key__": f"p{i}", "jpg": jpeg_bytes(i), "txt": "a red circle"} for i in range(3)]
    samples.insert(1, long_doc)
    return write_shard(tmp_path / "overlong", samples)


def test_overlong_truncate_is_counted_in_the_batch(overlong_shard, pre):
    batches = train_batches(overlong_shard, pre, max_seq_len=64, overlong="truncate")
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == ["long", "p0", "p1", "p2"]
    assert sum(b.num_truncated for b in batches) == 1
    assert sum(b.skipped for b in batches) == 0
    assert all(b.input_ids.shape[1] == 64 for b in batches)
    # the cut image went with its tokens: 3 pairs + the long doc's first image
    assert sum(len(b.images) for b in batches) == 4
    for b in batches:
        assert runs(b.input_ids, pre.image_token_id) == [16] * len(b.images)
    long_batch = next(b for b in batches if "long" in b.keys)
    assert long_batch.num_real_tokens == 57 + 20 * (len(long_batch.keys) - 1)


def test_overlong_drop_is_skipped_and_counted(overlong_shard, pre):
    batches = train_batches(overlong_shard, pre, max_seq_len=64, overlong="drop")
    assert sorted(k for b in batches for k in b.keys) == ["p0", "p1", "p2"]
    assert sum(b.skipped for b in batches) == 1
    assert sum(b.num_truncated for b in batches) == 0


# ---------------------------------------------------------------- bad input


def test_missing_interleaved_member_is_skipped_and_counted(tmp_path, pre):
    good = [
        doc(f"g{i}", ["hello", None, "world"], [None, "0.jpg", None], **{"0.jpg": jpeg_bytes(i)})
        for i in range(3)
    ]
    bad = doc(
        "bad",
        ["hello", None, "world", None],
        [None, "0.jpg", None, "2.jpg"],
        **{"0.jpg": jpeg_bytes(5), "1.jpg": jpeg_bytes(6)},
    )
    pair = {"__key__": "pair", "jpg": jpeg_bytes(7), "txt": "a red circle"}
    shard = write_shard(tmp_path / "bad", [good[0], bad, good[1], pair, good[2]])
    batches = train_batches(shard, pre, batch_size=1, max_seq_len=64)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == ["g0", "g1", "g2", "pair"]
    assert sum(b.skipped for b in batches) == 1


def test_unknown_template_in_datamodule_raises(pre):
    with pytest.raises(ValueError, match="unknown template 'nope'.*plain.*chatml"):
        VLMDataModule(template="nope", preprocess=pre, num_workers=0)
    with pytest.raises(ValueError, match="overlong"):
        VLMDataModule(overlong="cut", preprocess=pre, num_workers=0)


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(11, 40)
    return data[: len(data) // 2]


def test_corrupt_image_passes_the_header_read():
    bad = truncated_jpeg()
    assert header_size(bad) == (40, 40)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(bad)).convert("RGB")


def test_corrupt_image_becomes_black_and_is_counted_in_collate(pre):
    good, bad = jpeg_bytes(12, 40), truncated_jpeg()
    fn = sample_fn(pre)
    items = [
        fn(
            doc(
                "x",
                ["hello", None, "world", None],
                [None, "0.jpg", None, "1.jpg"],
                **{"0.jpg": good, "1.jpg": bad},
            )
        )
    ]
    batch = VLMCollate(pre, "plain")([pack_row(items, 64, pre.pad_id)])
    assert batch.skipped == 1
    assert len(batch.images) == 2 and len(batch.pixels) == 1
    crops = batch.pixels[0]
    (_, i0), (_, i1) = batch.images[0].crops[0], batch.images[1].crops[0]
    assert crops[i0].float().mean() > 20  # the good image
    assert (crops[i1] == 0).all()  # the corrupt one: black, same size


def test_corrupt_image_is_counted_through_the_stream(tmp_path, pre):
    samples = [
        {"__key__": "ok0", "jpg": jpeg_bytes(13), "txt": "a red circle"},
        {"__key__": "broken", "jpg": truncated_jpeg(), "txt": "the end"},
        {"__key__": "ok1", "jpg": jpeg_bytes(14), "txt": "hello world"},
    ]
    shard = write_shard(tmp_path / "corrupt", samples)
    batches = train_batches(shard, pre, batch_size=1, max_seq_len=64)
    assert sorted(k for b in batches for k in b.keys) == ["broken", "ok0", "ok1"]
    assert sum(b.skipped for b in batches) == 1


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
