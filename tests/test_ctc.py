"""CTC fine-tuning: HF parity of loss, logits and greedy decoding; vocabulary; bad transcripts."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from mmpt.cli import main
from mmpt.ctc_vocab import CTCTokenizer, CTCVocab, build_char_vocab, frames_needed
from mmpt.models.ctc import CTCModule
from mmpt.models.ctc_beam import beam_search_available
from mmpt.models.encoders import Wav2Vec2Tower
from tests.helpers import TINY_WAV2VEC2

VOCAB = ["<pad>", "<unk>", "|", "a", "k", "m", "s"]
LAYER = {**TINY_WAV2VEC2, "feat_extract_norm": "layer", "do_stable_layer_norm": True}


def tiny_module(**kwargs) -> CTCModule:
    torch.manual_seed(0)
    tower = Wav2Vec2Tower(config=dict(LAYER), source=kwargs.pop("source", "hf"))
    return CTCModule(tower, {"tokens": VOCAB}, **kwargs)


def test_loss_and_logits_equal_hf_wav2vec2_for_ctc(tmp_path: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    module = tiny_module().eval()
    cfg = Wav2Vec2Config(
        **{k: v for k, v in LAYER.items()},
        vocab_size=len(VOCAB),
        pad_token_id=0,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )
    hf = Wav2Vec2ForCTC(cfg).eval()
    hf.wav2vec2.load_state_dict(module.encoder.model.state_dict())
    hf.lm_head.load_state_dict(module.lm_head.state_dict())
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(2, 6000, generator=g)
    lengths = torch.tensor([6000, 4400])
    audio[1, 4400:] = 0
    labels = torch.tensor([[4, 3, 2, 5, 3, 5], [6, 3, -100, -100, -100, -100]])
    mask = (torch.arange(6000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(input_values=audio, attention_mask=mask, labels=labels)
        logits, frames = module(audio, lengths)
        loss = module.loss(logits, labels, frames)
    assert frames.tolist() == hf._get_feat_extract_output_lengths(lengths).tolist()
    for row, n in enumerate(frames.tolist()):
        torch.testing.assert_close(logits[row, :n], ref.logits[row, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-6)
    # sum reduction too
    hf.config.ctc_loss_reduction = "sum"
    module.reduction = "sum"
    with torch.no_grad():
        ref_sum = hf(input_values=audio, attention_mask=mask, labels=labels).loss
        assert torch.allclose(module.loss(*module(audio, lengths)[:1], labels, frames), ref_sum)


def test_greedy_decoding_equals_hf_tokenizer(tmp_path: Path) -> None:
    from transformers import Wav2Vec2CTCTokenizer

    vocab = CTCVocab(VOCAB)
    path = vocab.save(tmp_path / "vocab.json")
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "word_delimiter_token": "|"}
    tok = Wav2Vec2CTCTokenizer(str(path), bos_token=None, eos_token=None, **special)
    # k k _ a a | | m _ m <unk> s s ; second row shorter (the rest is padding)
    ids = torch.tensor(
        [[4, 4, 0, 3, 3, 2, 2, 5, 0, 5, 1, 6, 6], [0, 5, 3, 2, 2, 4, 0, 0, 0, 0, 0, 0, 0]]
    )
    logits = torch.nn.functional.one_hot(ids, len(VOCAB)).float()
    lengths = torch.tensor([13, 6])
    ours = vocab.greedy(logits, lengths)
    theirs = [tok.decode(row[:n].tolist()) for row, n in zip(ids, lengths.tolist(), strict=True)]
    assert ours == theirs == ["ka mm<unk>s", "ma k"]


def test_vocab_builder_and_oov(tmp_path: Path) -> None:
    vocab, counts = build_char_vocab(["Kam sa", "mask  kam"], lowercase=True)
    assert vocab.tokens == ["<pad>", "<unk>", "|", "a", "k", "m", "s"]
    assert counts["|"] == 2 and counts["a"] == 4
    ids, oov = vocab.encode("kax  Sam!")
    assert vocab.decode(ids) == "ka<unk> sam<unk>" and oov == 2
    loaded = CTCVocab.load(vocab.save(tmp_path / "v.json"), lowercase=True)
    assert loaded.tokens == vocab.tokens
    assert pickle.loads(pickle.dumps(loaded)).encode("kam") == loaded.encode("kam")
    with pytest.raises(FileNotFoundError, match="mmpt data vocab"):
        CTCVocab.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="lacks"):
        CTCVocab(["a", "b"])


def test_frames_needed_counts_blanks_between_repeats() -> None:
    assert frames_needed([3, 4, 5]) == 3
    assert frames_needed([3, 3, 4, 4, 4]) == 8
    tok = CTCTokenizer(CTCVocab(VOCAB), lambda n: n // 400)
    assert tok(["ka", "mas k"]).tolist() == [[4, 3, -100, -100, -100], [5, 3, 6, 2, 4]]


class _Trainer:
    """The only part of a Trainer the module reads here."""

    global_step = 0


def test_freeze_encoder_steps_and_masking_config() -> None:
    module = tiny_module(freeze_encoder_steps=2, mask_time_prob=0.3, layerdrop=0.1)
    cfg = module.encoder.backbone.config
    assert cfg.mask_time_prob == 0.3 and cfg.layerdrop == 0.1
    assert module.encoder.backbone.masked_spec_embed is not None
    module.train()
    module._trainer = _Trainer()
    audio, lengths = torch.randn(2, 4000), torch.tensor([4000, 4000])
    module(audio, lengths)[0].sum().backward()
    assert module.lm_head.weight.grad is not None
    assert all(p.grad is None for p in module.encoder.parameters())
    _Trainer.global_step = 2  # past the frozen steps: the encoder trains
    module(audio, lengths)[0].sum().backward()
    assert module.encoder.model.encoder.layers[0].attention.q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="SpecAugment"):
        CTCModule(
            Wav2Vec2Tower(config=_ta_config(), source="torchaudio"),
            {"tokens": VOCAB},
            mask_time_prob=0.1,
        )


def _ta_config() -> dict:
    return {
        "extractor_mode": "layer_norm",
        "extractor_conv_layer_config": [[32, 10, 5], [32, 3, 4], [32, 3, 4]],
        "extractor_conv_bias": False,
        "encoder_embed_dim": 32,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 4,
        "encoder_num_layers": 2,
        "encoder_num_heads": 2,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 64,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_norm_first": True,
        "encoder_layer_drop": 0.0,
        "aux_num_out": None,
    }


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
def test_hf_ctc_export_loads_with_equal_logits_and_decoding(
    tmp_path: Path, model_type: str
) -> None:
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    from mmpt.export.hf_wav2vec2_ctc import export_hf_ctc

    torch.manual_seed(0)
    config = {k: v for k, v in LAYER.items() if "codevector" not in k}
    tower = Wav2Vec2Tower(config={**config, "model_type": model_type})
    module = CTCModule(tower, {"tokens": VOCAB}).eval()
    torch.nn.init.normal_(module.lm_head.weight, std=1.0)
    out = export_hf_ctc(module, tmp_path / "hf")
    hf = AutoModelForCTC.from_pretrained(out).eval()
    processor = Wav2Vec2Processor.from_pretrained(out)
    g = torch.Generator().manual_seed(2)
    clips = [torch.randn(6000, generator=g).numpy(), torch.randn(4400, generator=g).numpy()]
    inputs = processor(clips, sampling_rate=16000, return_tensors="pt", padding=True)
    from mmpt.datamodules.audio import normalize_audio, pad_audio

    audio, lengths = pad_audio([torch.from_numpy(c) for c in clips])
    with torch.no_grad():
        ours, frames = module(normalize_audio(audio, lengths), lengths)
        theirs = hf(**inputs).logits
    for row, n in enumerate(frames.tolist()):
        torch.testing.assert_close(ours[row, :n], theirs[row, :n], rtol=1e-4, atol=1e-4)
    ids = theirs.argmax(-1)
    decoded = [processor.decode(ids[r, :n]) for r, n in enumerate(frames.tolist())]
    assert decoded == module.vocab.greedy(ours, frames)
    assert hf.config.pad_token_id == 0 and hf.config.vocab_size == len(VOCAB)


def test_tri_stage_schedule_is_fairseqs() -> None:
    import math

    from mmpt.models.schedules import TriStage

    s = TriStage(phase_ratio=(0.1, 0.4, 0.5), init_scale=0.01, final_scale=0.05)
    total = 1000
    assert s.factor(0, total) == pytest.approx(0.01)
    assert s.factor(50, total) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(100, total) == s.factor(499, total) == 1.0
    assert s.factor(750, total) == pytest.approx(math.exp(math.log(0.05) * 0.5))
    assert s.factor(999, total) == pytest.approx(0.05, rel=0.01)
    assert s.decay_start(total) == 500 and s.warmup_for(total) == 100
    with pytest.raises(ValueError, match="phase_ratio"):
        TriStage(phase_ratio=(0.5, 0.5, 0.5))


@pytest.mark.skipif(beam_search_available(), reason="flashlight-text is installed here")
def test_beam_search_without_flashlight_is_one_clear_error(tmp_path: Path, capsys) -> None:
    """``--beam-size`` where torchaudio's decoder cannot load names the package and command."""
    (tmp_path / "val").mkdir()
    argv = ["eval", "asr", "--ckpt", str(tmp_path / "ctc.ckpt"), "--data", str(tmp_path / "val")]
    assert main([*argv, "--beam-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--beam-size" in err and "pip install flashlight-text" in err
    assert "Traceback" not in err
    assert main([*argv, "--lm", str(tmp_path / "lm.arpa")]) == 2
    assert "add --beam-size" in capsys.readouterr().err
