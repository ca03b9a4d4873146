"""mmpt data continue (BLSP step 1): continuations per sample, byte copies, seed, resume, errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mmpt.data_cli import main as data_main
from mmpt.shards.continuations import BLSP_PROMPT, ContinueSettings, continue_shards
from mmpt.text_generate import TextLLM

CHAT = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} :{% endif %}"
)


def tiny_llm(path: Path, chat_template: str | None = CHAT) -> Path:
    """A 2-layer Qwen2 over the synthetic word vocabulary, saved with save_pretrained."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mmpt.synth.vocab import write_synth_tokenizer

    write_synth_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = chat_template
    tok.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    from mmpt.synth import make_synthetic

    out = tmp_path_factory.mktemp("tones")
    make_synthetic("audio-text", out, train_samples=10, val_samples=2, samples_per_shard=4)
    return out


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return tiny_llm(tmp_path_factory.mktemp("llm") / "lm")


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_writes_a_continuation_per_sample_and_copies_the_rest(tones, llm_dir, tmp_path):
    out = tmp_path / "cont"
    report = continue_shards(
        TextLLM(str(llm_dir), device="cpu"),
        str(tones / "train"),
        out,
        ContinueSettings(max_new_tokens=6, batch_size=3),
        progress=False,
    )
    src = sorted((tones / "train").glob("*.tar"))
    assert [Path(s).name for s in report.shards] == [p.name for p in src]
    assert report.written == 10 and report.total_failed == 0 and report.replaced == 10
    for shard in src:
        before, after = members(shard), members(out / shard.name)
        assert before.keys() == after.keys()
        for name, data in before.items():
            if name.endswith(".json"):
                old, new = json.loads(data), json.loads(after[name])
                assert new["continuation"] and new["continuation"] != old["continuation"]
                assert {k: v for k, v in new.items() if k != "continuation"} == {
                    k: v for k, v in old.items() if k != "continuation"
                }
            else:
                assert after[name] == data  # audio byte for byte
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 10
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]
    meta = index["meta"]["continuation"]
    assert meta["prompt_template"] == BLSP_PROMPT and meta["chat_template"] == "tokenizer"
    assert "zeroshot" in index["meta"]  # the source index's meta is kept


def test_prompt_is_blsp_in_the_chat_template(llm_dir):
    llm = TextLLM(str(llm_dir), device="cpu")
    text = BLSP_PROMPT.replace("{text}", "a low tone")
    assert llm.render(text) == text + " :"
    assert text.startswith("Continue the following text in a coherent and engaging style")


def test_sampling_is_deterministic_with_the_seed(tones, llm_dir, tmp_path):
    llm = TextLLM(str(llm_dir), device="cpu")

    def run(name: str, seed: int) -> dict[str, bytes]:
        settings = ContinueSettings(max_new_tokens=6, batch_size=4, temperature=1.5, seed=seed)
        continue_shards(llm, str(tones / "train"), tmp_path / name, settings, progress=False)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.tar"))}

    torch.manual_seed(1)
    first = run("a", 0)
    torch.manual_seed(2)  # the global RNG state does not matter
    assert run("b", 0) == first
    assert run("c", 1) != first


def test_resumes_after_a_kill(tones, llm_dir, tmp_path, monkeypatch):
    from mmpt.shards import continuations

    llm = TextLLM(str(llm_dir), device="cpu")
    settings = ContinueSettings(max_new_tokens=5, batch_size=2, temperature=1.0, seed=7)
    whole = tmp_path / "whole"
    continue_shards(llm, str(tones / "train"), whole, settings, progress=False)

    calls = {"n": 0}
    real = continuations.continue_shard

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(continuations, "continue_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        continue_shards(llm, str(tones / "train"), out, settings, progress=False)
    assert len(list(out.glob("*.tar"))) == 1 and not (out / "index.json").exists()
    first = sorted(out.glob("*.tar"))[0]
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(continuations, "continue_shard", real)
    report = continue_shards(llm, str(tones / "train"), out, settings, progress=False)
    assert report.resumed == [str(first)] and len(report.shards) == 2
    assert first.stat().st_mtime_ns == stamp  # kept, not rewritten
    for shard in whole.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((out / "index.json").read_text())["num_samples"] == 10


def test_failures_are_counted(llm_dir, tmp_path):
    from webdataset import TarWriter

    (tmp_path / "src").mkdir()
    with TarWriter(str(tmp_path / "src" / "s-000000.tar")) as w:
        w.write({"__key__": "a", "wav": b"RIFF", "json": json.dumps({"transcript": "low tone"})})
        w.write({"__key__": "b", "wav": b"RIFF", "json": json.dumps({"transcript": "  "})})
        w.write({"__key__": "c", "wav": b"RIFF", "json": b"[1, 2]"})
        w.write({"__key__": "d", "wav": b"RIFF", "txt": b"high tone"})
    report = continue_shards(
        TextLLM(str(llm_dir), device="cpu"),
        str(tmp_path / "src"),
        tmp_path / "out",
        ContinueSettings(max_new_tokens=4),
        progress=False,
    )
    assert report.written == 2 and report.failed == {"no_transcript": 1, "bad_json": 1}
    got = members(tmp_path / "out" / "s-000000.tar")
    assert json.loads(got["d.json"])["continuation"]  # a json member made for a txt transcript
    assert got["d.txt"] == b"high tone"


def test_cli_runs_and_names_the_chat_template_flag(tones, llm_dir, tmp_path, capsys):
    bare = tiny_llm(tmp_path / "bare", chat_template=None)
    base = ["continue", "--from", str(tones / "val"), "--max-new-tokens", "3", "--no-progress"]
    assert data_main([*base, "--llm", str(bare), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--chat-template" in err
    argv = [*base, "--llm", str(bare), "--out", str(tmp_path / "y"), "--chat-template", "plain"]
    assert data_main(argv) == 0
    assert "wrote 2 samples with json:continuation" in capsys.readouterr().out
    index = json.loads((tmp_path / "y" / "index.json").read_text())
    assert index["meta"]["continuation"]["chat_template"] == "template:plain"
    bad = [*base, "--llm", str(llm_dir), "--out", str(tmp_path / "z"), "--prompt-template", "go"]
    assert data_main(bad) == 2
    assert "--prompt-template must hold {text}" in capsys.readouterr().err
    assert data_main([*base, "--llm", str(tmp_path / "none"), "--out", str(tmp_path / "w")]) == 2
    assert "--llm: no folder" in capsys.readouterr().err


def test_an_mmpt_export_folder_answers_as_mmpt_generate(tones, tmp_path):
    from mmpt.generate import Generator
    from tests.test_export_mmpt import perturb
    from tests.test_speech_lm import speech_lm

    model = perturb(speech_lm(tones, audio=False))
    export = model.export_mmpt(tmp_path / "export", template="plain")
    llm = TextLLM(str(export), chat_template="plain", device="cpu")
    prompts = ["a low rising pure tone then", "high"]
    want = Generator(model, "plain").generate(prompts, max_new_tokens=6)
    assert llm.generate(prompts, max_new_tokens=6) == [w.strip() for w in want]
    assert any(want)
