"""CTC beam search (torchaudio's flashlight decoder): equal to greedy on clear frames, and an
n-gram LM over a lexicon overturns an acoustically ambiguous word."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpt.ctc_vocab import CTCVocab
from mmpt.models.ctc_beam import BeamSearchDecoder, beam_search_available

pytestmark = pytest.mark.skipif(
    not beam_search_available(), reason="flashlight-text is not installed (pip install .[speech])"
)

TOKENS = ["<pad>", "<unk>", "|", "a", "c", "o", "t"]

# A word bigram model in ARPA form (log10 probabilities): "cat" is far likelier than "cot".
ARPA = """
\\data\\
ngram 1=5
ngram 2=4

\\1-grams:
-1.0\t</s>
-99\t<s>\t0
-2.0\t<unk>\t0
-0.2\tcat\t0
-2.5\tcot\t0

\\2-grams:
-0.1\t<s> cat
-2.5\t<s> cot
-0.1\tcat </s>
-0.1\tcot </s>

\\end\\
"""


def emissions(frames: list[dict[str, float]], vocab: CTCVocab) -> torch.Tensor:
    """(1, T, V) logits: each frame's listed tokens get their score, the rest -10."""
    logits = torch.full((1, len(frames), len(vocab)), -10.0)
    for t, scores in enumerate(frames):
        for token, score in scores.items():
            logits[0, t, vocab.ids[token]] = score
    return logits


def test_beam_search_without_lm_equals_greedy_on_clear_frames():
    vocab = CTCVocab(TOKENS)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, len(vocab), generator=g) * 8  # peaked: one clear best per frame
    lengths = torch.tensor([30, 25, 17, 9])
    beam = BeamSearchDecoder(vocab, beam_size=16, lm_weight=0.0)
    assert beam(logits, lengths) == vocab.greedy(logits, lengths)
    assert any(vocab.greedy(logits, lengths))  # not all empty


def test_word_lm_with_a_lexicon_overturns_an_ambiguous_vowel(tmp_path: Path):
    vocab = CTCVocab(TOKENS)
    lm, lexicon = tmp_path / "lm.arpa", tmp_path / "lexicon.txt"
    lm.write_text(ARPA.lstrip())
    lexicon.write_text("cat c a t |\ncot c o t |\n")
    # 'o' a little above 'a' in the vowel frame: greedy says "cot"
    frames = [{"c": 5.0}, {"<pad>": 5.0}, {"o": 2.2, "a": 2.0}, {"<pad>": 5.0}, {"t": 5.0}]
    logits, lengths = emissions(frames, vocab), torch.tensor([len(frames)])
    assert vocab.greedy(logits, lengths) == ["cot"]
    plain = BeamSearchDecoder(vocab, lexicon=str(lexicon), beam_size=8, lm_weight=0.0)
    assert plain(logits, lengths) == ["cot"]
    with_lm = BeamSearchDecoder(vocab, lm=str(lm), lexicon=str(lexicon), beam_size=8)
    assert with_lm(logits, lengths) == ["cat"]


def test_a_subword_vocabulary_is_refused(tmp_path: Path):
    vocab = CTCVocab(["<pad>", "<unk>", "ab"], tokenizer_file=str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match="character vocabulary"):
        BeamSearchDecoder(vocab)


def test_eval_asr_beam_search_and_its_flag_errors(tmp_path: Path, capsys):
    from mmpt.eval.cli import main
    from tests.test_ctc_data import ctc_model, write_speech

    urls = write_speech(tmp_path / "s", [(0.5, "kam sa"), (0.4, "ka")])
    model = ctc_model()
    ckpt = tmp_path / "ctc.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    base = ["asr", "--ckpt", str(ckpt), "--data", str(urls), "--num-workers", "0"]
    out = tmp_path / "eval"
    assert main([*base, "--device", "cpu", "--beam-size", "4", "--out", str(out)]) == 0
    report = (out / "asr.json").read_text()
    assert '"decoding": "beam 4"' in report
    assert len((out / "asr.tsv").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main([*base, "--beam-size", "4", "--lm", str(tmp_path / "no.arpa")]) == 2
    err = capsys.readouterr().err
    assert "--lm" in err and "no.arpa: no such file" in err
    assert main([*base, "--lm", str(tmp_path / "no.arpa")]) == 2
    assert "add --beam-size" in capsys.readouterr().err
