"""``mmpt data score --kind vlm``: judgement and caption likelihood equal the model's forward."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import mmpt
from mmpt.curation.vlm_prompt import load_prompt
from mmpt.curation.vlm_score import mean_target_logprob
from mmpt.data_cli import main as data_main
from mmpt.eval.vlm_likelihood import option_logprobs, padded_batch, render_row
from mmpt.generate import Generator
from mmpt.shards import ShardWriter
from tests.helpers import jpeg_bytes
from tests.test_export_mmpt import perturb
from tests.test_vlm_module import shapes as shapes  # noqa: F401 - the module fixture
from tests.test_vlm_module import tiny_vlm

CAPTIONS = ["a red circle", "a big green square", "one small blue cross", "the grey photo"]
JUDGE = {
    "mode": "judgement",
    "scores": {"from": 0, "to": 9},
    "rescale": [0, 100],
    "template": "{caption} : {criteria} {low} {high}",
    "metrics": {"itm": "what colour is it", "ctq": {"criteria": "look", "aspect": "picture"}},
}
LIKELIHOOD = {"mode": "caption_likelihood", "prompt": "Describe the image", "pmi": True}


@pytest.fixture(scope="module")
def setup(shapes, tmp_path_factory) -> dict:  # noqa: F811
    """A tiny VLM exported with the chatml template, 3 shards of 2 pairs, the prompt YAMLs."""
    tmp = tmp_path_factory.mktemp("vlm_score")
    export = perturb(tiny_vlm(shapes)).export_mmpt(tmp / "export", template="chatml")
    with ShardWriter(tmp / "raw", 2, prefix="raw", modalities=["image", "text"]) as w:
        for i in range(6):
            w.write({"__key__": f"{i:06d}", "jpg": jpeg_bytes(i, 32), "txt": CAPTIONS[i % 4]})
    paths = {}
    for name, spec in (("judge", JUDGE), ("ll", LIKELIHOOD)):
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    return {"tmp": tmp, "export": export, "raw": tmp / "raw", **paths}


def _score(setup: dict, prompt: str, out: str, *extra: str) -> list[dict]:
    argv = ["score", "--kind", "vlm", "--model", str(setup["export"]), "--prompt", str(prompt)]
    argv += ["--from", str(setup["raw"]), "--out", str(setup["tmp"] / out), "--batch-size", "3"]
    assert data_main([*argv, "--accelerator", "cpu", *extra]) == 0
    rows = pq.read_table(setup["tmp"] / out).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def _pairs(setup: dict) -> dict[str, tuple[Image.Image, str]]:
    return {
        f"{i:06d}": (Image.open(io.BytesIO(jpeg_bytes(i, 32))).convert("RGB"), CAPTIONS[i % 4])
        for i in range(6)
    }


def test_judgement_is_the_expected_score_of_the_models_next_token(setup) -> None:
    rows = _score(setup, setup["judge"], "judge")
    assert len(rows) == 6 and set(rows[0]) == {"shard", "key", "mlm_itm", "mlm_ctq"}
    assert rows[0]["shard"] == "raw-000000.tar" and rows[5]["shard"] == "raw-000002.tar"
    gen = Generator(mmpt.load(setup["export"]).float().eval())
    digits = [
        gen.pre.tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)
    ]
    prompts = load_prompt(setup["judge"]).prompts
    for row in rows:
        image, caption = _pairs(setup)[row["key"]]
        for metric, template in prompts.items():
            text = template.replace("{caption}", caption)
            assert text.startswith(f"{caption} : ") and text.endswith(" 0 9")
            batch, _ = gen.batch([text], [[image]])  # one row, no padding: generation's input
            with torch.no_grad():
                last = gen.model(batch).logits[0, -1].double()
            want = float(last[digits].softmax(-1) @ torch.arange(10.0).double()) * 100 / 9
            assert row[f"mlm_{metric}"] == pytest.approx(want, abs=1e-5), (row, metric)
    assert len({round(r["mlm_itm"], 6) for r in rows}) > 1  # the scores depend on the pair


def test_caption_likelihood_and_pmi_equal_a_direct_forward(setup) -> None:
    rows = _score(setup, setup["ll"], "ll", "--name", "cap")
    assert set(rows[0]) == {"shard", "key", "cap_ll", "cap_pmi"}
    gen = Generator(mmpt.load(setup["export"]).float().eval())
    for row in rows:
        image, caption = _pairs(setup)[row["key"]]
        reply = render_row(gen.pre, gen.template, None, "Describe the image", [], caption)
        n = int((reply["labels"] != -100).sum())  # the caption's tokens and its end of turn
        with_image = option_logprobs(gen, "Describe the image", image, [caption])[0] / n
        text_only = padded_batch([reply], [], gen.pre.pad_id)
        with torch.no_grad():
            logits = gen.model(text_only).logits
        without = float(mean_target_logprob(logits, text_only.labels)[0])
        assert row["cap_ll"] == pytest.approx(with_image, abs=1e-5)
        assert row["cap_pmi"] == pytest.approx(with_image - without, abs=1e-5)


def test_judgement_rows_are_the_generation_prompt(setup) -> None:
    """The rows scored are the ids ``mmpt generate`` would continue from."""
    gen = Generator(mmpt.load(setup["export"]).float().eval(), system="you are a judge")
    image = _pairs(setup)["000001"][0]
    crop = gen.pre.policy(image)
    row = render_row(gen.pre, gen.template, gen.system, "what colour", [crop])
    assert torch.equal(row["input_ids"], gen.encode("what colour", [image], [])[0])
    assert (row["labels"] == -100).all()


def test_filter_keeps_what_the_expression_selects(setup) -> None:
    rows = _score(setup, setup["judge"], "judge_f", "--num-workers", "2")  # workers split
    cut = sorted(r["mlm_itm"] for r in rows)[3]
    out = setup["tmp"] / "curated"
    argv = ["filter", "--from", str(setup["raw"]), "--scores", str(setup["tmp"] / "judge_f")]
    argv += ["--keep", f"mlm_itm >= {cut!r} and mlm_ctq >= 0", "--out", str(out)]
    assert data_main(argv) == 0
    kept = _kept_keys(out)
    assert kept == {r["key"] for r in rows if r["mlm_itm"] >= cut} and len(kept) == 3


def _kept_keys(folder: Path) -> set[str]:
    import webdataset as wds

    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


BAD = [
    ({**JUDGE, "metric": JUDGE["metrics"]}, "unknown key(s) ['metric']"),
    ({k: v for k, v in JUDGE.items() if k != "metrics"}, "metrics: a mapping"),
    ({**JUDGE, "mode": "judgment"}, "mode: 'judgment'"),
    ({**JUDGE, "template": "{captoin} {criteria}"}, "unknown field(s) ['captoin']"),
    ({**JUDGE, "template": "{criteria}"}, "neither template nor criteria has {caption}"),
    ({**JUDGE, "scores": {"from": 9, "to": 0}}, "scores: {'from': 9, 'to': 0}"),
    ({**JUDGE, "rescale": [0]}, "rescale: [0]"),
    ({**LIKELIHOOD, "pmi": "yes"}, "pmi true or false"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_a_bad_prompt_yaml_is_one_clear_error(setup, spec, message, capsys) -> None:
    path = setup["tmp"] / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    argv = ["score", "--kind", "vlm", "--model", "/nowhere", "--prompt", str(path)]
    assert data_main([*argv, "--from", str(setup["raw"]), "--out", str(setup["tmp"] / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --prompt {path}: ") and message in err, err
    assert err.count("\n") == 1


def test_scores_that_are_not_one_token_fail_before_reading(setup, capsys) -> None:
    path = setup["tmp"] / "wide.yaml"
    path.write_text(yaml.safe_dump({**JUDGE, "scores": {"from": 0, "to": 100}}))
    argv = ["score", "--kind", "vlm", "--model", str(setup["export"]), "--prompt", str(path)]
    argv += ["--from", str(setup["raw"]), "--out", str(setup["tmp"] / "wide"), "--accelerator"]
    assert data_main([*argv, "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--prompt scores: '10' is 1 token(s) [1]" in err and "not one" in err, err
    assert not (setup["tmp"] / "wide").exists()
    assert data_main(["score", "--kind", "vlm", "--prompt", str(path), "--from", "x", "--out", "y"])
    assert "either --model" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_the_same_vlm_scores(setup) -> None:
    """torchrun, 2 processes (gloo): every shard scored once, the numbers of one rank."""
    import os
    import socket
    import subprocess
    import sys

    one = _score(setup, setup["judge"], "one_rank")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", port, "-m", "mmpt.cli", "data", "score", "--kind", "vlm"]
    cmd += ["--model", str(setup["export"]), "--prompt", str(setup["judge"]), "--from"]
    cmd += [str(setup["raw"]), "--out", str(setup["tmp"] / "two_ranks"), "--batch-size", "3"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, "--accelerator", "cpu"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = sorted(pq.read_table(setup["tmp"] / "two_ranks").to_pylist(), key=lambda r: r["key"])
    assert [(r["shard"], r["key"]) for r in two] == [(r["shard"], r["key"]) for r in one]
    for a, b in zip(one, two, strict=True):
        assert a["mlm_itm"] == pytest.approx(b["mlm_itm"], abs=1e-5)
        assert a["mlm_ctq"] == pytest.approx(b["mlm_ctq"], abs=1e-5)
    assert "rank 0 scored 4 samples" in done.stdout and "rank 1 scored 2 samples" in done.stdout


def test_the_shipped_prompts_load(setup) -> None:
    """configs/curation/*.yaml: MLM-Filter's four metrics on a one-token scale, and PMI."""
    root = Path(__file__).resolve().parents[1] / "configs" / "curation"
    mlm = load_prompt(root / "mlm_filter.yaml")
    assert mlm.columns("mlm") == ["mlm_itm", "mlm_odf", "mlm_ctq", "mlm_sem"]
    assert mlm.values()[0] == 0 and mlm.values()[-1] == 100
    assert all(p.startswith("Text Caption: {caption}\n") for p in mlm.prompts.values())
    assert all(
        "0 to 9" in p and "{" not in p.replace("{caption}", "") for p in mlm.prompts.values()
    )
    tokenizer = mmpt.load(setup["export"]).preprocess.tokenizer
    assert len(set(mlm.score_token_ids(tokenizer))) == 10
    cap = load_prompt(root / "caption_likelihood.yaml")
    assert cap.columns("mlm") == ["mlm_ll", "mlm_pmi"]
