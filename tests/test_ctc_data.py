"""CTC data and evaluation: OOV counted, too-long targets skipped with a reason, mmpt eval asr,
wav2vec-S steps, WER/CER equal jiwer's on edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch

from mmpt.datamodules.ctc import CTCDataModule
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.streams import StreamConfig
from mmpt.eval.asr_metrics import ErrorTally, TextNormalizer, wer_cer
from mmpt.models.ctc import CTCModule
from mmpt.models.encoders import Wav2Vec2Tower
from mmpt.shards import ShardWriter
from mmpt.shards.audio_build import encode_pcm16
from tests.helpers import TINY_WAV2VEC2

VOCAB = {"tokens": ["<pad>", "<unk>", "|", "a", "k", "m", "s"]}
RATE = 16000


def ctc_model(pretraining_head: bool = False) -> CTCModule:
    torch.manual_seed(0)
    tower = Wav2Vec2Tower(config=dict(TINY_WAV2VEC2), pretraining_head=pretraining_head)
    return CTCModule(tower, VOCAB)


def write_speech(out: Path, samples: list[tuple[float, str | None]]) -> Path:
    """Shards of noise clips of the given seconds with transcripts (None: no transcript)."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, samples_per_shard=4, modalities=["audio", "text"]) as w:
        for i, (seconds, text) in enumerate(samples):
            audio = (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
            info = {} if text is None else {"transcript": text}
            w.write(
                {"__key__": f"{i:04d}", "flac": encode_pcm16(audio, RATE, "FLAC"), "json": info}
            )
    return out


def batches(dm: CTCDataModule, urls: Path, train: bool = False) -> list:
    cfg = StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)
    return list(make_loader(dm.stream(cfg, train=train, field="data.val"), 0))


def test_oov_counted_and_too_long_target_skipped_with_reason(tmp_path: Path) -> None:
    # 80 samples a frame: 0.1 s = 20 frames, too few for 24 letters
    urls = write_speech(
        tmp_path / "s",
        [(0.5, "kam sa"), (0.5, "Kax zz"), (0.1, "mamamamamakakakakasasasa"), (0.5, "ka")],
    )
    model = ctc_model()
    dm = CTCDataModule(batch_size=8, num_workers=0, preprocess=model.preprocess)
    (batch,) = batches(dm, urls)
    assert batch.keys == ["0000", "0001", "0003"]
    assert batch.transcripts == ["kam sa", "Kax zz", "ka"]
    assert batch.oov == 4  # K, x, z, z (case kept)
    assert batch.text_tokens[1].tolist()[:6] == [1, 3, 1, 2, 1, 1]
    assert batch.skipped == 1
    (reason,) = batch.skip_reasons
    assert "CTC target longer than the encoder's frames" in reason
    logits, frames = model(batch.audio, batch.audio_lengths)
    assert torch.isfinite(model.loss(logits, batch.text_tokens, frames))


def test_unlabelled_rows_only_when_allowed(tmp_path: Path) -> None:
    urls = write_speech(tmp_path / "s", [(0.5, "kam"), (0.5, None)])
    model = ctc_model()
    strict = CTCDataModule(batch_size=4, num_workers=0, preprocess=model.preprocess)
    (batch,) = batches(strict, urls)
    assert batch.keys == ["0000"] and batch.skipped == 1
    loose = CTCDataModule(
        batch_size=2, num_workers=0, preprocess=model.preprocess, allow_unlabelled=True,
        bucket_batches=0,
    )  # fmt: skip
    (batch,) = batches(loose, urls, train=True)
    assert sorted(batch.transcripts) == ["", "kam"]
    assert sorted((batch.text_tokens >= 0).sum(1).tolist()) == [0, 3]


def test_wer_cer_equal_jiwer_on_edge_cases() -> None:
    plain = TextNormalizer(lowercase=False, remove_punctuation=False)
    cases = [
        (["a b c", "d e f g"], ["a x c", ""]),  # an empty hypothesis
        (["one"], ["one two three"]),  # insertions only
        (["the cat sat"], ["the cat sat"]),
    ]
    for refs, hyps in cases:
        out = wer_cer(refs, hyps, plain)
        assert out["wer"] == pytest.approx(jiwer.wer(refs, hyps))
        assert out["cer"] == pytest.approx(jiwer.cer(refs, hyps))
        assert sum(r["word_errors"] for r in out["rows"]) == pytest.approx(
            out["wer"] * out["words"]
        )
    with pytest.raises(ValueError, match="empty reference"):
        wer_cer(["fine", "  "], ["fine", "x"], keys=["u1", "u2"])
    with pytest.raises(ValueError, match="empty reference.*u2"):
        wer_cer(["fine", "?!"], ["fine", "x"], keys=["u1", "u2"])  # empty once normalised
    norm = wer_cer(["Hello, World!"], ["hello world"])
    assert norm["wer"] == 0 and norm["normalizer"]["lowercase"] is True
    tally = ErrorTally(plain)
    tally.add(["a b c"], ["a x c"])
    tally.add(["d e f g"], [""])
    assert tally.counts()[0] / tally.counts()[1] == pytest.approx(jiwer.wer(*cases[0]))


def test_eval_asr_writes_json_and_tsv(tmp_path: Path) -> None:
    from mmpt.eval.cli import main

    urls = write_speech(tmp_path / "s", [(0.5, "kam sa"), (0.4, "ka"), (0.5, "mas")])
    model = ctc_model()
    ckpt = tmp_path / "ctc.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    out = tmp_path / "eval"
    args = ["asr", "--ckpt", str(ckpt), "--data", str(urls), "--out", str(out)]
    assert main([*args, "--num-workers", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "asr.json").read_text())
    metrics = report["metrics"]
    assert metrics["utterances"] == 3 and metrics["words"] == 4 and report["decoding"] == "greedy"
    assert report["normalizer"]["remove_punctuation"] is True
    lines = (out / "asr.tsv").read_text().splitlines()
    assert lines[0].startswith("key\treference\thypothesis") and len(lines) == 4
    assert main(["asr", "--ckpt", str(tmp_path / "none.ckpt"), "--data", str(urls)]) == 2


def test_wav2vec_s_step_mixes_ssl_and_ctc_and_pseudo_labels(tmp_path: Path) -> None:
    from mmpt.models.wav2vec_s import WavSModule

    teacher = ctc_model()
    ckpt = tmp_path / "teacher.ckpt"
    torch.save(
        {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, ckpt
    )
    torch.manual_seed(0)
    tower = Wav2Vec2Tower(config=dict(TINY_WAV2VEC2), pretraining_head=True)
    module = WavSModule(tower, VOCAB, ssl_weight=1.0, ssl_weight_end=0.0, mask_length=2,
                        num_negatives=4, pseudo_labeler=str(ckpt))  # fmt: skip
    assert module.ssl_weight_at(0, 11) == 1.0 and module.ssl_weight_at(10, 11) == 0.0
    urls = write_speech(tmp_path / "s", [(0.5, "kam"), (0.5, None), (0.5, "sa"), (0.5, None)])
    dm = CTCDataModule(batch_size=4, num_workers=0, preprocess=module.preprocess,
                       allow_unlabelled=True, bucket_batches=0)  # fmt: skip
    (batch,) = batches(dm, urls, train=True)
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    loss = module.training_step(batch)
    loss.backward()
    assert logged["train/labelled"] == 0.5
    assert {"train/ssl_loss", "train/ctc_loss", "train/pseudo_loss"} <= set(logged)
    assert module.lm_head.weight.grad is not None
    assert module.encoder.model.quantizer.codevectors.grad is not None  # the SSL loss trains
    assert not any(k.startswith("_labeler") for k in module.state_dict())


def test_data_vocab_cli_and_tone_speech_synth(tmp_path: Path) -> None:
    from mmpt.data_cli import main as data_main
    from mmpt.synth.tone_speech import lexicon, synth_tone_speech, tone_vocab

    out = synth_tone_speech(tmp_path / "a", train_samples=12, val_samples=3)
    assert data_main(["vocab", "--from", out["train"], "--out", str(tmp_path / "v.json")]) == 0
    built = json.loads((tmp_path / "v.json").read_text())
    assert list(built)[:3] == ["<pad>", "<unk>", "|"]
    assert set(built) <= set(tone_vocab().tokens)
    assert json.loads((tmp_path / "a" / "tokenizer" / "vocab.json").read_text()) == tone_vocab().ids
    bare = synth_tone_speech(tmp_path / "u", train_samples=4, val_samples=2, unlabelled=True)
    assert data_main(["vocab", "--from", bare["train"], "--out", str(tmp_path / "x.json")]) == 2
    assert set(lexicon("a")) != set(lexicon("b"))
    with pytest.raises(ValueError, match="--language"):
        lexicon("c")


def test_subword_vocabulary_from_a_tokenizers_file(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmpt.ctc_vocab import CTCVocab

    pieces = ["<pad>", "<unk>", "ka", "m", "sa", "▁"]
    raw = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tok.json"))
    vocab = CTCVocab.load(tmp_path / "tok.json")
    assert vocab.tokens == pieces and vocab.blank == 0
    ids, oov = vocab.encode("ka zz")
    assert ids[0] == 2 and oov == 1
