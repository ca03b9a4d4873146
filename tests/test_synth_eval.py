"""Synthetic held-out caption/VQA/choice sets and QA conversations of `mmpt data synth`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
import yaml
from transformers import AutoTokenizer

from mmpt.data_cli import main as data_main
from mmpt.datamodules.packing import IGNORE_INDEX
from mmpt.datamodules.resolution import FixedResolution
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.vlm import VLMSample
from mmpt.eval.caption_metrics import caption_scores
from mmpt.eval.choice_metrics import choice_scores, extract_choice
from mmpt.eval.prompts import choice_prompt, vqa_prompt
from mmpt.eval.vqa_metrics import vqa_scores
from mmpt.preprocess import ImagePreprocess, VLMPreprocess
from mmpt.shards import load_index
from mmpt.shards.eval_sets import REQUIRED_FIELDS
from mmpt.synth.image_eval import synth_image_text_eval

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"caption": "eval/caption", "vqa": "eval/vqa", "choice": "eval/choice"}


def records(folder: Path) -> list[dict[str, Any]]:
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [{**s, "json": json.loads(s["json"])} for s in ds]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    argv = ["synth", "--kind", "image-text", "--out", str(out), "--train-samples", "12",
            "--image-size", "32", "--eval-samples", "48", "--qa-samples", "16"]  # fmt: skip
    assert data_main(argv) == 0
    return out


def test_layout_and_answers_follow_the_attributes(shapes: Path, capsys) -> None:
    for task, name in TASKS.items():
        index = load_index(shapes / name)
        assert index.num_samples == 48
        assert index.meta["kind"] == "eval" and index.meta["task"] == task
        recs = [r["json"] for r in records(shapes / name)]
        assert len({r["id"] for r in recs}) == 48
        assert all(set(REQUIRED_FIELDS[task]) <= set(r) for r in recs)
    vqa = [r["json"] for r in records(shapes / "eval/vqa")]
    kinds = {r["question_type"] for r in vqa}
    assert kinds == {"what colour", "what shape", "is the shape in"}
    for r in vqa:
        assert len(r["answers"]) == 10 and len(set(r["answers"])) == 1
        answer = r["answers"][0]
        if r["question_type"] == "what colour":
            assert answer == r["color"] and r["question"] == "what colour is the shape ?"
        elif r["question_type"] == "what shape":
            assert answer == r["shape"] and r["answer_type"] == "other"
        else:
            asked = r["question"].removeprefix("is the shape in the ").removesuffix(" ?")
            assert answer == ("yes" if asked == r["position"] else "no")
    yes = [r["answers"][0] for r in vqa if r["answer_type"] == "yes/no"]
    assert 0.2 < yes.count("yes") / len(yes) < 0.8
    for r in (s["json"] for s in records(shapes / "eval/choice")):
        assert len(set(r["options"].values())) == 4 and list(r["options"]) == ["A", "B", "C", "D"]
        assert r["options"][r["answer"]] == f"{r['color']} {r['shape']}"
    answers = [s["json"]["answer"] for s in records(shapes / "eval/choice")]
    assert len(set(answers)) == 4  # the right option is not always in one place


def test_eval_images_are_held_out(shapes: Path) -> None:
    seen = {s["jpg"] for split in ("train", "val", "qa") for s in records(shapes / split)}
    for name in TASKS.values():
        assert not seen & {s["jpg"] for s in records(shapes / name)}


def test_same_seed_same_eval_bytes(shapes: Path, tmp_path: Path) -> None:
    again = synth_image_text_eval(tmp_path, train_samples=12, image_size=32, eval_samples=48,
                                  qa_samples=16)  # fmt: skip
    for name in [*TASKS.values(), "qa"]:
        tars = sorted((shapes / name).glob("*.tar"))
        assert tars and all(t.read_bytes() == (Path(tmp_path) / name / t.name).read_bytes()
                            for t in tars)  # fmt: skip
    assert again["eval_vqa_samples"] == 48 and again["qa_samples"] == 16


def test_perfect_answers_score_one_and_a_constant_answer_does_not(shapes: Path) -> None:
    vqa = [r["json"] for r in records(shapes / "eval/vqa")]
    answers = {r["id"]: r["answers"] for r in vqa}
    assert vqa_scores({k: v[0] for k, v in answers.items()}, answers)["vqa_accuracy"] == 1.0
    assert vqa_scores({k: "yes" for k in answers}, answers)["vqa_accuracy"] < 0.5
    choice = [r["json"] for r in records(shapes / "eval/choice")]
    preds = {r["id"]: extract_choice(r["answer"], r["options"]) for r in choice}
    assert choice_scores(preds, {r["id"]: r["answer"] for r in choice})["accuracy"] == 1.0
    caption = [r["json"] for r in records(shapes / "eval/caption")]
    refs = {r["id"]: r["captions"] for r in caption}
    perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs, meteor=False)
    wrong = caption_scores({k: "a red circle" for k in refs}, refs, meteor=False)
    assert perfect["BLEU-4"] > 0.9 and perfect["CIDEr"] > 3 * wrong["CIDEr"]


def test_tokenizer_covers_every_prompt_and_fits_the_quickstart_llm(shapes: Path) -> None:
    tok = AutoTokenizer.from_pretrained(shapes / "tokenizer", local_files_only=True)
    cfg = yaml.safe_load((ROOT / "configs/quickstart/vila_stage3.yaml").read_text())
    vocab_size = cfg["model"]["init_args"]["llm"]["init_args"]["config"]["vocab_size"]
    assert len(tok) <= vocab_size
    texts = []
    for s in records(shapes / "eval/vqa"):
        texts += [vqa_prompt(s["json"]["question"], load_index(shapes / "eval/vqa").meta["prompt"])]
        texts += s["json"]["answers"][:1]
    template = load_index(shapes / "eval/choice").meta["prompt"]
    for s in records(shapes / "eval/choice"):
        r = s["json"]
        texts += [choice_prompt(r["question"], r["options"], r["hint"], template), r["answer"]]
    texts += [c for s in records(shapes / "eval/caption") for c in s["json"]["captions"]]
    texts.append(load_index(shapes / "eval/caption").meta["prompt"])
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_qa_conversations_train_on_the_answer_only(shapes: Path) -> None:
    tok = AutoTokenizer.from_pretrained(shapes / "tokenizer", local_files_only=True)
    pre = VLMPreprocess(
        tokenizer=tok, image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_id=tok.pad_token_id, eos="</s>", policy=FixedResolution(32, 8),
        tokens_for_grid=lambda g: g[0] * g[1], image=ImagePreprocess(size=32),
    )  # fmt: skip
    fn = VLMSample(pre, get_template("chatml"), 256)
    samples = records(shapes / "qa")
    kinds = {s["json"]["question_kind"] for s in samples}
    assert kinds == {"colour", "shape", "position", "choice"}
    for s in samples:
        out = fn({**s, "json": json.dumps(s["json"]).encode()})
        answer = s["json"]["conversations"][1]["value"]
        target = tok.decode(out["labels"][out["labels"] != IGNORE_INDEX])
        assert target.split()[0] == answer and tok.unk_token_id not in out["input_ids"]
        if s["json"]["question_kind"] == "choice":
            assert answer in "ABCD"


def test_a_set_without_the_folders_a_config_reads_is_rendered_again(tmp_path: Path) -> None:
    from mmpt.datamodules.synthetic import SyntheticData
    from mmpt.synth.image_text import synth_image_text

    out = tmp_path / "shapes"
    synth_image_text(out, train_samples=4, image_size=16)  # an older set: no qa/, no eval/
    spec = SyntheticData(kind="image-text", out=str(out), train_samples=4, image_size=16)
    spec.ensure([str(out / "train")])
    assert not (out / "qa").exists()  # what the config reads is there: nothing rendered
    spec.ensure([str(out / "train"), str(out / "qa"), str(out / "train/{0..3}.tar")])
    assert load_index(out / "qa").num_samples == 2
    assert load_index(out / "eval" / "choice").num_samples == 192
