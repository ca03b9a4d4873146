"""Tokenizers: padding/truncation, the Tokenizer protocol, small pickles, offline errors."""

import pickle
import subprocess
import sys

import pytest
import torch

from mmpt.models.encoders.tokenizers import HFTokenizer, OpenCLIPTokenizer
from mmpt.preprocess import Tokenizer

WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "mat", "red", "blue"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def save_tiny_hf_tokenizer(path) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    tok.save_pretrained(str(path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tok")
    save_tiny_hf_tokenizer(path)
    return str(path)


def test_openclip_tokenizer_matches_open_clip_and_pads():
    import open_clip

    tok = OpenCLIPTokenizer()
    texts = ["a photo of a cat", "Two DOGS!"]
    ids = tok(texts)
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert torch.equal(ids, open_clip.tokenize(texts))
    assert ids[0, 0].item() == 49406  # <start_of_text>
    n = int((ids[0] != 0).sum())
    assert ids[0, n - 1].item() == 49407 and (ids[0, n:] == 0).all()  # EOT then zero padding
    assert tok.vocab_size == open_clip.tokenizer.SimpleTokenizer().vocab_size == 49408
    assert int(ids.max()) < tok.vocab_size
    assert isinstance(tok, Tokenizer)


def test_openclip_tokenizer_truncates_keeping_eot():
    tok = OpenCLIPTokenizer(context_length=8)
    ids = tok(["one two three four five six seven eight nine ten"])
    assert ids.shape == (1, 8)
    assert ids[0, 0].item() == 49406 and ids[0, -1].item() == 49407


def test_openclip_tokenizer_pickle_is_small_and_lazy():
    tok = OpenCLIPTokenizer(context_length=16)
    before = tok(["a red cat"])  # builds the BPE tables
    blob = pickle.dumps(tok)
    assert len(blob) < 1_000  # parameters only, not the 49k-entry vocabulary
    clone = pickle.loads(blob)
    assert clone._tok is None and clone.context_length == 16
    assert torch.equal(clone(["a red cat"]), before)


def test_hf_tokenizer_pads_truncates_and_round_trips(hf_dir):
    tok = HFTokenizer(hf_dir, context_length=6)
    ids = tok(["a photo of the cat", "dog"])
    assert ids.dtype == torch.long and ids.shape == (2, 6)
    assert ids[1].tolist() == [2, 4 + WORDS.index("dog"), 3, 0, 0, 0]  # CLS dog SEP PAD...
    assert ids[0, 0].item() == 2 and ids[0, -1].item() == 3  # truncated, SEP kept
    assert tok.vocab_size == len(SPECIALS + WORDS) and tok.pad_token_id == 0
    assert isinstance(tok, Tokenizer)
    blob = pickle.dumps(tok)
    assert len(blob) < 100_000
    clone = pickle.loads(blob)
    assert clone._tok is None
    assert torch.equal(clone(["a photo of the cat", "dog"]), ids)


def test_hf_tokenizer_missing_path_names_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model\.init_args\.text\.init_args\.path"):
        HFTokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="hf download"):
        HFTokenizer("some-org/not-in-cache-model")


def test_tokenizer_module_imports_no_heavy_libraries():
    code = (
        "import sys, pickle\n"
        "from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer\n"
        "pickle.loads(pickle.dumps(OpenCLIPTokenizer()))\n"
        "print(sorted(m for m in ('open_clip', 'timm', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
