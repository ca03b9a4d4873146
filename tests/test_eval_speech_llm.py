"""mmpt eval asr --model / translate: sacrebleu and jiwer parity, reports of a tiny BLSP model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mmpt.cli import main
from mmpt.eval.asr_metrics import TextNormalizer, wer_cer
from mmpt.eval.speech_llm import ASR_PROMPT
from mmpt.eval.translate_metrics import corpus_scores, sentence_scores

HYPS = ["the cat sat on a mat", "hello there general kenobi", "", "il fait beau"]
REFS = ["the cat sat on the mat", "hello there general kenobi", "nothing here", "il fait chaud"]


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    got = corpus_scores(HYPS, REFS, target_lang="en")
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < got["bleu"] < 100 and got["bleu_signature"].startswith("nrefs:1|")
    per = sentence_scores(HYPS, REFS)
    assert per[1] == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    for h, r, s in zip(HYPS, REFS, per, strict=True):
        assert s["bleu"] == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score)
        assert s["chrf"] == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score)
    zh = corpus_scores(["我爱你们"], ["我爱你"], target_lang="zh")
    assert "tok:zh" in zh["bleu_signature"]
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_scores(["a", "b"], ["a"])


def test_wer_cer_by_hand_and_jiwer():
    import jiwer

    got = wer_cer(["Hello, World!", "a b c"], ["hello world", "a x"])
    assert got["wer"] == pytest.approx(2 / 5)  # 0 errors + (1 substitution, 1 deletion)
    assert got["cer"] == pytest.approx(jiwer.cer(["hello world", "a b c"], ["hello world", "a x"]))
    assert wer_cer(["a b"], [""])["wer"] == 1.0  # an empty output: every word deleted


@pytest.fixture(scope="module")
def blsp(tmp_path_factory) -> tuple[Path, Path, object]:
    from mmpt.synth import make_synthetic
    from tests.test_export_mmpt import perturb
    from tests.test_speech_lm import speech_lm

    tones = tmp_path_factory.mktemp("tones")
    make_synthetic("audio-text", tones, train_samples=2, val_samples=5)
    model = perturb(speech_lm(tones))
    export = model.export_mmpt(tones / "export", template="plain")
    return tones, export, model


def read_tsv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_eval_asr_of_a_speech_llm_writes_reports(blsp, tmp_path, capsys):
    from mmpt.datamodules.audio import AudioReader
    from mmpt.generate import Generator

    tones, export, model = blsp
    argv = ["eval", "asr", "--model", str(export), "--data", str(tones / "val")]
    argv += ["--out", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "6"]
    assert main(argv) == 0
    assert "wer" in capsys.readouterr().out
    report = json.loads((tmp_path / "asr.json").read_text())
    rows = read_tsv(tmp_path / "asr.tsv")
    assert report["num_utterances"] == len(rows) == 5 and report["prompt"] == ASR_PROMPT
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    want = wer_cer(refs, hyps)  # the TSV holds the normalised texts: scoring them again is equal
    assert report["metrics"]["wer"] == pytest.approx(want["wer"]) and any(hyps)
    assert report["metrics"]["cer"] == pytest.approx(want["cer"])
    assert report["normalizer"]["lowercase"] is True
    # the hypotheses are mmpt generate's, prompted with the instruction and the clip
    import webdataset as wds

    first = sorted((tones / "val").glob("*.tar"))[0]
    sample = next(iter(wds.WebDataset(str(first), shardshuffle=False)))
    gen = Generator(model)
    clip = AudioReader(gen.pre.audio, train=False)(sample)
    want = gen.generate([ASR_PROMPT], None, [[clip]], max_new_tokens=6)[0]
    assert rows[0]["key"] == sample["__key__"]
    assert rows[0]["hypothesis"] == TextNormalizer()(want)  # the TSV holds the scored texts


def test_eval_translate_writes_bleu_and_chrf(blsp, tmp_path, capsys):
    import sacrebleu

    tones, export, _ = blsp
    argv = ["eval", "translate", "--model", str(export), "--data", str(tones / "val")]
    argv += ["--target-lang", "en", "--reference-key", "json:continuation", "--out", str(tmp_path)]
    assert main([*argv, "--max-new-tokens", "6", "--max-samples", "3"]) == 0
    report = json.loads((tmp_path / "translate.json").read_text())
    rows = read_tsv(tmp_path / "translate.tsv")
    assert len(rows) == 3 and report["prompt"] == "Translate the speech into English."
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert report["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert report["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert "bleu" in capsys.readouterr().out


def test_bad_input_is_one_clear_error(blsp, tmp_path, capsys):
    tones, export, _ = blsp
    assert main(["eval", "asr", "--data", str(tones / "val")]) == 2
    assert "give --ckpt CTC.ckpt (a CTC model), or a speech LLM" in capsys.readouterr().err
    argv = ["eval", "translate", "--model", str(export), "--data", str(tones / "val")]
    assert main([*argv, "--target-lang", "de", "--out", str(tmp_path)]) == 2
    assert "no utterance with audio and 'json:translation'" in capsys.readouterr().err
    text_only = tones / "export_text"
    from tests.test_speech_lm import speech_lm

    speech_lm(tones, audio=False).export_mmpt(text_only, template="plain")
    assert main(["eval", "asr", "--model", str(text_only), "--data", str(tones / "val")]) == 2
    assert "no speech encoder" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_eval_asr_from_config_and_checkpoint(tmp_path, monkeypatch, capsys):
    from mmpt.cli import build_cli
    from mmpt.synth import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic("audio-text", "data/tones", train_samples=2, val_samples=3)
    cfg = str(Path(__file__).resolve().parents[1] / "configs/quickstart/blsp_tiny.yaml")
    no_init = "--model.init_args.init_from=null"
    torch.manual_seed(0)
    model = build_cli(["-c", cfg, "--trainer.logger=false", no_init], run=False).model
    torch.save({"state_dict": model.state_dict()}, "model.ckpt")
    argv = ["eval", "asr", "-c", cfg, "--ckpt", "model.ckpt", no_init, "--data", "data/tones/val"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    report = json.loads(Path("eval/asr.json").read_text())
    assert report["num_utterances"] == 3 and report["checkpoint"] == "model.ckpt"


def test_overlong_bad_and_unlabelled_clips_are_counted(blsp, tmp_path):
    import io

    import numpy as np
    import soundfile as sf
    from webdataset import TarWriter

    tones, export, _ = blsp

    def wav(seconds: float) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV")
        return buf.getvalue()

    (tmp_path / "set").mkdir()
    with TarWriter(str(tmp_path / "set" / "s-000000.tar")) as w:
        w.write({"__key__": "ok", "wav": wav(1.0), "json": {"transcript": "low tone"}})
        w.write({"__key__": "long", "wav": wav(3.0), "json": {"transcript": "low tone"}})
        w.write({"__key__": "bad", "wav": b"RIFFnot", "json": {"transcript": "low tone"}})
        w.write({"__key__": "none", "wav": wav(1.0), "json": {"caption": "low tone"}})
        w.write({"__key__": "mute", "json": {"transcript": "low tone"}})
        w.write({"__key__": "dots", "wav": wav(1.0), "json": {"transcript": "..."}})
    argv = ["eval", "asr", "--model", str(export), "--data", str(tmp_path / "set")]
    assert main([*argv, "--out", str(tmp_path / "r"), "--max-new-tokens", "3"]) == 0
    report = json.loads((tmp_path / "r" / "asr.json").read_text())
    assert report["num_utterances"] == 1 and [
        r["key"] for r in read_tsv(tmp_path / "r" / "asr.tsv")
    ] == ["ok"]
    assert report["skipped"] == {
        "overlong": 1,
        "bad_audio": 1,
        "no_reference": 1,
        "no_audio": 1,
        "empty_reference": 1,
    }


def test_a_missing_set_fails_before_the_model_loads(tmp_path, capsys):
    argv = ["eval", "translate", "--model", str(tmp_path / "no-model"), "--target-lang", "fr"]
    assert main([*argv, "--data", str(tmp_path / "none")]) == 2
    assert "--data" in capsys.readouterr().err
