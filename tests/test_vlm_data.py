"""VLM data: every sample shape, overlong samples and bad input."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpt.datamodules.packing import IGNORE_INDEX, pack_row
from mmpt.datamodules.resolution import header_size
from mmpt.datamodules.vlm import Overlong, VLMCollate, VLMDataModule
from tests.helpers import jpeg_bytes
from tests.vlm_data_helpers import (
    doc,
    grid_tokens,
    image_bytes,
    kept_text,
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
