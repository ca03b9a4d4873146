"""Prompt templates: exact rendering, label masks on target text only, image expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mmpt.datamodules.packing import IGNORE_INDEX
from mmpt.datamodules.templates import TEMPLATES, check_targets, encode, get_template
from mmpt.synth.vocab import SPECIAL_TOKENS, write_word_tokenizer

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
WORDS = (
    *("you", "are", "terse", "what", "is", "this", "a", "red", "circle", "the", "end"),
    *("hello", "world", "here"),
    *("system", "user", "assistant", "USER", "ASSISTANT", ":", "."),
)
EOS = "</s>"
CONVERSATION = [
    {"role": "system", "content": "you are terse"},
    {"role": "user", "content": "what is this"},
    {"role": "assistant", "content": "a red circle"},
]
EXPECTED = {
    "plain": "you are terse\nwhat is this\na red circle</s>",
    "chatml": (
        "<|im_start|>system\nyou are terse<|im_end|>\n"
        "<|im_start|>user\nwhat is this<|im_end|>\n"
        "<|im_start|>assistant\na red circle<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nyou are terse<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nwhat is this<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na red circle<|eot_id|>"
    ),
    "vicuna": "you are terse USER: what is this ASSISTANT: a red circle</s>",
}
#: The assistant content plus the end marker the model must learn, as the tokenizer decodes it.
EXPECTED_TARGET = {
    "plain": "a red circle </s>",
    "chatml": "a red circle <|im_end|>",
    "llama3": "a red circle <|eot_id|>",
    "vicuna": "a red circle </s>",
}
IMAGE_ID = 4  # "<image>" is the 5th special token


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_word_tokenizer(path, WORDS, special_tokens=(*SPECIAL_TOKENS, *LLAMA3_SPECIALS))
    tokenizer = AutoTokenizer.from_pretrained(Path(path))
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    return tokenizer


def kept(enc: dict[str, torch.Tensor]) -> list[int]:
    return enc["labels"][enc["labels"] != IGNORE_INDEX].tolist()


def test_every_template_has_an_expectation():
    assert set(TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_exact_string(name):
    segments = get_template(name).render(CONVERSATION, EOS)
    assert "".join(s.text for s in segments) == EXPECTED[name]
    assert all(s.text for s in segments)  # empty segments are dropped


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_labels_only_on_assistant_content_and_end_marker(name, tok):
    enc = encode(get_template(name).render(CONVERSATION, EOS), tok, IMAGE_ID, [])
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    # the whole rendered text is tokenised (markers included), nothing unknown
    assert ids.tolist() == tok(EXPECTED[name], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids.tolist()
    assert tok.decode(kept(enc)) == EXPECTED_TARGET[name]
    # kept labels are the input ids at the same positions, in one contiguous span
    where = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(labels[where], ids[where])
    assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_labels_every_assistant_turn(name, tok):
    messages = [
        {"role": "user", "content": "what is this"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the end"},
    ]
    enc = encode(get_template(name).render(messages, EOS), tok, IMAGE_ID, [])
    marker = EXPECTED_TARGET[name].split()[-1]
    assert tok.decode(kept(enc)) == f"a red circle {marker} the end {marker}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_text_role_is_a_target_without_chat_markers(name, tok):
    template = get_template(name)
    segments = template.render([{"role": "text", "content": "hello world"}], EOS)
    assert "".join(s.text for s in segments) == template.bos + "hello world</s>"
    targets = [s.text for s in segments if s.target]
    assert targets == ["hello world</s>"]
    enc = encode(segments, tok, IMAGE_ID, [])
    assert tok.decode(kept(enc)) == "hello world </s>"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_image_placeholder_expands_to_masked_image_ids(name, tok):
    messages = [
        {"role": "user", "content": "<image>\nwhat is this"},
        {"role": "assistant", "content": "a red circle"},
    ]
    enc = encode(get_template(name).render(messages, EOS), tok, IMAGE_ID, [5])
    ids, labels = enc["input_ids"], enc["labels"]
    image = ids == IMAGE_ID
    assert int(image.sum()) == 5
    pos = image.nonzero().squeeze(1).tolist()
    assert pos == list(range(pos[0], pos[0] + 5))  # one contiguous run
    assert (labels[image] == IGNORE_INDEX).all()
    assert tok.decode(kept(enc)) == EXPECTED_TARGET[name]


def test_images_expand_in_order_in_text_and_assistant_turns(tok):
    messages = [
        {"role": "text", "content": "here <image> a <image> red"},
        {"role": "assistant", "content": "<image> circle"},
    ]
    enc = encode(get_template("plain").render(messages, EOS), tok, IMAGE_ID, [2, 3, 1])
    ids, labels = enc["input_ids"].tolist(), enc["labels"]
    here, a, red, circle = (tok.convert_tokens_to_ids(w) for w in ("here", "a", "red", "circle"))
    eos = tok.eos_token_id
    assert ids == [here, *[IMAGE_ID] * 2, a, *[IMAGE_ID] * 3, red, eos, IMAGE_ID, circle, eos]
    # image ids are never targets, even inside target segments
    assert (labels[enc["input_ids"] == IMAGE_ID] == IGNORE_INDEX).all()
    assert kept(enc) == [here, a, red, eos, circle, eos]


@pytest.mark.parametrize("counts", [[], [4], [4, 4, 4]])
def test_placeholder_image_count_mismatch_raises(counts, tok):
    messages = [
        {"role": "user", "content": "<image> <image> what is this"},
        {"role": "assistant", "content": "a red circle"},
    ]
    segments = get_template("chatml").render(messages, EOS)
    with pytest.raises(ValueError, match="2 <image> placeholders for"):
        encode(segments, tok, IMAGE_ID, counts)


def test_bad_message_raises():
    with pytest.raises(ValueError, match="role"):
        get_template("plain").render([{"role": "robot", "content": "hi"}], EOS)
    with pytest.raises(ValueError, match="string content"):
        get_template("plain").render([{"role": "user", "content": None}], EOS)


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_template("nope")
    msg = str(err.value)
    assert "'nope'" in msg and "data.template" in msg
    for name in ("plain", "chatml", "llama3", "vicuna"):
        assert name in msg
    assert get_template("vicuna") is TEMPLATES["vicuna"]


def test_check_targets_names_the_template():
    labels = torch.full((2, 6), IGNORE_INDEX)
    with pytest.raises(ValueError, match="data.template='llama3'"):
        check_targets(labels, "llama3")
    labels[1, 3] = 7
    check_targets(labels, "llama3")  # one target token is enough
