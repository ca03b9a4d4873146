"""CausalLM backbone: tiny config-built Qwen2/Llama + WordLevel tokenizer, offline save/load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmpt.models.llm import CausalLM
from mmpt.synth.vocab import write_word_tokenizer

WORDS = ["<pad>", "<unk>", "</s>", "a", "photo", "of", "the", "cat", "dog", "on", "mat"]


def tiny_config(model_type: str = "qwen2", vocab_size: int = len(WORDS)) -> dict:
    """A 2-layer, width-32 causal LM config with GQA."""
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }


def write_tokenizer(path: Path, words: list[str] = WORDS) -> Path:
    """A WordLevel tokenizer over ``words`` (whitespace split) saved with ``save_pretrained``."""
    return write_word_tokenizer(path, words, special_tokens=("<pad>", "<unk>", "</s>"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def build(tok_dir: Path, model_type: str = "qwen2", **kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(config=tiny_config(model_type), tokenizer=str(tok_dir), **kw).eval()


def ids(llm: CausalLM, text: str = "a photo of the cat on the mat") -> torch.Tensor:
    return llm.tokenizer([text, text.replace("cat", "dog")], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_forward_shapes_and_finite_loss(tok_dir, model_type):
    llm = build(tok_dir, model_type)
    x = ids(llm)  # (2, 8)
    assert llm.hidden_size == 32 and llm.vocab_size == len(WORDS) + 1
    assert len(llm.decoder_layers) == 2
    emb = llm.embed(x)
    assert emb.shape == (2, 8, 32)
    out = llm(inputs_embeds=emb, labels=x)
    assert out.logits.shape == (2, 8, llm.vocab_size)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(llm(input_ids=x).logits, out.logits)


def test_image_token_added_once_and_logged(tok_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmpt.llm"):
        llm = build(tok_dir)
    n = len(WORDS)
    assert llm.image_token_id == n == llm.tokenizer.convert_tokens_to_ids("<image>")
    assert len(llm.tokenizer) == n + 1 == llm.vocab_size
    assert llm.model.get_output_embeddings().weight.shape == (n + 1, 32)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "'<image>'" in msg and f"{n} -> {n + 1}" in msg
    # one token, never split, even glued to text
    got = llm.tokenizer("a <image> cat", add_special_tokens=False)["input_ids"]
    assert got == [3, n, 7]

    llm.save_pretrained(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmpt.llm"):
        again = CausalLM(pretrained=str(tmp_path))
    assert not [r for r in caplog.records if r.name == "mmpt.llm"]
    assert again.image_token_id == n and again.vocab_size == n + 1 == len(again.tokenizer)


def test_image_token_already_in_vocab_is_not_added(tmp_path):
    tok = write_tokenizer(tmp_path / "tok", [*WORDS, "<image>"])
    llm = CausalLM(config=tiny_config(vocab_size=len(WORDS) + 1), tokenizer=str(tok))
    assert llm.image_token_id == len(WORDS) and llm.vocab_size == len(WORDS) + 1


def test_save_pretrained_round_trip_reproduces_logits(tok_dir, tmp_path):
    llm = build(tok_dir, attn_implementation="sdpa")
    x = ids(llm)
    llm.save_pretrained(tmp_path / "ckpt")
    loaded = CausalLM(pretrained=str(tmp_path / "ckpt"), attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, llm(input_ids=x).logits)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x).logits, llm(input_ids=x).logits)


def test_packed_attention_matches_sdpa_unpacked(tok_dir):
    llm = build(tok_dir)
    assert llm.model.config._attn_implementation == "mmpt_packed"
    x = ids(llm)
    pos = torch.arange(x.shape[1]).expand_as(x)
    with torch.no_grad():
        packed = llm(input_ids=x, position_ids=pos).logits
        llm.model.set_attn_implementation("sdpa")
        sdpa = llm(input_ids=x, position_ids=pos).logits
    torch.testing.assert_close(packed, sdpa, atol=1e-5, rtol=1e-5)


def test_dtype_and_gradient_checkpointing(tok_dir):
    llm = build(tok_dir, dtype="bfloat16", gradient_checkpointing=True).train()
    assert llm.embed(ids(llm)).dtype == torch.bfloat16
    assert llm.model.is_activation_checkpointing
    llm(input_ids=ids(llm), labels=ids(llm)).loss.backward()


@pytest.mark.parametrize(
    ("path", "repo_id", "download"),
    [
        ("mmpt-test/absent-llm", None, "run `hf download mmpt-test/absent-llm`"),
        (
            "/nonexistent/Qwen2.5-1.5B",
            "Qwen/Qwen2.5-1.5B",
            "`hf download Qwen/Qwen2.5-1.5B --local-dir /nonexistent/Qwen2.5-1.5B`",
        ),
        # No repo id in the config: no command is guessed (a local path is never a repo id).
        ("/nonexistent/Qwen2.5-1.5B", None, "add `repo_id: ORG/NAME`"),
    ],
)
def test_missing_weights_error_names_download_and_flag(path, repo_id, download):
    with pytest.raises(FileNotFoundError) as err:
        CausalLM(pretrained=path, repo_id=repo_id)
    msg = str(err.value)
    assert "LLM weights not found" in msg and download in msg
    assert ("hf download" in msg) == (download.count("hf download") == 1)
    assert "--model.init_args.llm.init_args.pretrained" in msg


@pytest.mark.parametrize("kwargs", [{}, {"pretrained": "x", "config": {"model_type": "qwen2"}}])
def test_exactly_one_of_pretrained_or_config(kwargs):
    with pytest.raises(ValueError, match=r"llm\.init_args\.pretrained.*llm\.init_args\.config"):
        CausalLM(**kwargs)


def test_config_without_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="tokenizer"):
        CausalLM(config=tiny_config())
