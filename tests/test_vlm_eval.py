"""mmpt eval caption|vqa|choice|all: sets checked before generation, runners, likelihood, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from webdataset import TarWriter

from mmpt.batch import VLMBatch
from mmpt.cli import main
from mmpt.datamodules.templates import encode
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import group_crops
from mmpt.eval.suite import evaluate_set, load_suite
from mmpt.eval.vlm_likelihood import option_logprobs
from mmpt.eval.vlm_sets import SetSpec, read_set
from mmpt.eval.vlm_tasks import derangement, predict, score
from mmpt.generate import Decoding, Generator, prompt_content
from tests.test_export_mmpt import perturb
from tests.test_vlm_module import shapes as shapes  # noqa: F401 - the module fixture
from tests.test_vlm_module import tiny_vlm


def png(seed: int, size: int = 32) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 255, (size, size, 3), generator=gen, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


RECORDS = {
    "caption": [{"id": f"c{i}", "captions": [f"a red circle {i}", "a shape"]} for i in range(3)],
    "vqa": [
        {"id": f"q{i}", "question": "what color", "answers": ["red"] * 3, "answer_type": "other"}
        for i in range(3)
    ],
    "choice": [
        {
            "id": f"m{i}",
            "question": "what color is the shape",
            "options": {"A": "red", "B": "blue", "C": "green"},
            "answer": "ABC"[i],
            "category": "color",
        }
        for i in range(3)
    ],
}


def write_set(folder: Path, records: list[dict], corrupt: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(folder / "shard-000000.tar")) as w:
        for i, rec in enumerate(records):
            image = b"not an image" if corrupt and i == 1 else png(i)
            w.write({"__key__": f"s{i}", "png": image, "json": json.dumps(rec)})
    return folder


@pytest.fixture(scope="module")
def model(shapes):  # noqa: F811
    return perturb(tiny_vlm(shapes))


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    return {task: write_set(root / task, recs) for task, recs in RECORDS.items()}


def test_sets_without_the_task_fields_fail_before_loading(tmp_path, sets, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model loaded before the set was checked")

    monkeypatch.setattr("mmpt.generate_cli.load_model", no_load)
    bad = {
        "caption": {"id": "x", "captions": []},
        "vqa": {"id": "x", "question": "what", "answer_type": "other"},
        "choice": {"id": "x", "question": "what", "options": {"A": "red"}, "answer": "A"},
    }
    for task, rec in bad.items():
        data = write_set(tmp_path / f"bad_{task}", [*RECORDS[task][:1], rec])
        argv = ["eval", task, "--model", str(tmp_path), "--data", str(data)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "sample 's1'" in err and str(data) in err, err
    argv = ["eval", "vqa", "--model", str(tmp_path), "--data", str(tmp_path / "none")]
    assert main(argv) == 2 and "--data" in capsys.readouterr().err


def test_caption_and_vqa_records_equal_generate(model, sets):
    gen = Generator(model)
    for task in ("caption", "vqa"):
        spec = SetSpec(task, task, str(sets[task]), prompt="{question}" if task == "vqa" else "")
        samples = read_set(spec)
        records = predict(gen, spec, samples, Decoding(max_new_tokens=4), batch_size=2)
        prompt = "what color" if task == "vqa" else ""
        images = [[Image.open(io.BytesIO(png(i))).convert("RGB")] for i in range(3)]
        want = gen.generate([prompt] * 3, images, max_new_tokens=4)
        assert [r["output"] for r in records] == [w.strip() for w in want]
        metrics = score(spec, records, java=False)
        key = "CIDEr" if task == "caption" else "vqa_accuracy"
        assert key in metrics and metrics["empty"] == sum(not w.strip() for w in want) / 3


def test_shuffled_images_and_empty_or_unreadable_are_counted(model, sets, tmp_path, monkeypatch):
    source = derangement(7, seed=1)
    assert sorted(source) == list(range(7)) and all(s != i for i, s in enumerate(source))
    gen = Generator(model)
    spec = SetSpec("c", "caption", str(write_set(tmp_path / "c", RECORDS["caption"], True)))
    seen: list[list] = []

    def fake(prompts, images, **kw):
        seen.append([im[0].tobytes() for im in images])
        return [""] * len(prompts)

    monkeypatch.setattr(gen, "generate", fake)
    result = evaluate_set(
        gen, spec, decoding=Decoding(max_new_tokens=2), shuffle_images=True, java=False
    )
    unreadable = [r["id"] for r in result.records if r["unreadable"]]
    assert len(unreadable) == 1 and unreadable != ["c1"]  # c1's corrupt image went elsewhere
    assert result.metrics["unreadable"] == pytest.approx(1 / 3)
    assert result.metrics["empty"] == pytest.approx(2 / 3) and result.metrics["CIDEr"] == 0
    asked = [r["id"] for r in result.records if not r["unreadable"]]
    own = {f"c{i}": Image.open(io.BytesIO(png(i))).convert("RGB").tobytes() for i in (0, 2)}
    assert len(seen[0]) == 2 and all(own.get(k) != b for k, b in zip(asked, seen[0], strict=True))


def logprob_alone(gen: Generator, prompt: str, image: Image.Image, answer: str) -> float:
    """The answer's log-likelihood from one unpadded row (the reference for the batched one)."""
    pre = gen.pre
    crop = pre.policy(image)
    messages = [
        {"role": "user", "content": prompt_content(prompt, 1, 0)},
        {"role": "assistant", "content": answer},
    ]
    row = encode(gen.template.render(messages, pre.eos), pre.tokenizer, pre.image_token_id,
                 [pre.image_tokens(crop)])  # fmt: skip
    ids, labels = row["input_ids"][None], row["labels"]
    pixels, layouts = group_crops([crop])
    n = ids.shape[1]
    batch = VLMBatch(
        input_ids=ids,
        labels=labels[None],
        position_ids=torch.arange(n)[None],
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen=n,
        pixels=[normalize_images(p, pre.image.mean, pre.image.std) for p in pixels],
        images=layouts,
        num_samples=1,
    )
    with torch.no_grad():
        logp = gen.model(batch).logits[0, :-1].log_softmax(-1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, n) if labels[t] != -100)


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_option_likelihood_equals_each_option_alone(model, template):
    gen = Generator(model, template)
    image = Image.open(io.BytesIO(png(5))).convert("RGB")
    answers = ["red", "a big blue square", "green"]  # different lengths: padded rows
    got = option_logprobs(gen, "what color", image, answers)
    want = [logprob_alone(gen, "what color", image, a) for a in answers]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == 3


def test_choice_by_likelihood_and_circular(model, sets, monkeypatch):
    gen = Generator(model)
    spec = SetSpec("m", "choice", str(sets["choice"]), by="likelihood", circular=True)
    result = evaluate_set(gen, spec)
    assert len(result.records) == 9  # 3 questions x 3 rotations
    for r in result.records:
        best = max(r["logprobs"], key=r["logprobs"].get)
        assert r["choice"] == best and r["correct"] == (best == r["answer"])
    by_q = {}
    for r in result.records:
        by_q.setdefault(r["id"], []).append(r["correct"])
    assert result.metrics["circular_accuracy"] == sum(map(all, by_q.values())) / 3
    assert result.metrics["accuracy"] == sum(r["correct"] for r in result.records) / 9
    # by generation: the letter read from the text; a letter answer is right, prose is not
    spec = SetSpec("m", "choice", str(sets["choice"]), circular=True)
    answers = iter(["B", "The answer is C.", "no idea"] * 3)
    monkeypatch.setattr(gen, "generate", lambda prompts, *a, **k: [next(answers) for _ in prompts])
    result = evaluate_set(gen, spec, batch_size=4)
    assert [r["choice"] for r in result.records] == ["B", "C", None] * 3
    assert "A. red\nB. blue\nC. green" in result.records[0]["prompt"]
    assert "A. blue\nB. green\nC. red" in result.records[1]["prompt"]  # rotation 1
    assert result.metrics["unanswered"] == 3


def test_eval_all_writes_one_report(model, sets, tmp_path, capsys):
    export = model.export_mmpt(tmp_path / "export", template="plain")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "sets:\n"
        f"  - {{name: cap, task: caption, data: {sets['caption']}}}\n"
        f"  - {{name: qa, task: vqa, data: {sets['vqa']}, prompt: '{{question}}'}}\n"
        f"  - {{name: mc, task: choice, data: {sets['choice']}, by: likelihood}}\n"
    )
    assert [s.name for s in load_suite(suite)] == ["cap", "qa", "mc"]
    out = tmp_path / "report"
    argv = ["eval", "all", "--model", str(export), "--suite", str(suite), "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "3", "--max-samples", "2", "--no-java"]) == 0
    report = json.loads((out / "suite.json").read_text())
    assert set(report["metrics"]) == {"cap", "qa", "mc"}
    assert {"CIDEr", "vqa_accuracy", "accuracy"} <= {
        k for m in report["metrics"].values() for k in m
    }
    assert report["sets"]["qa"]["records"] == 2
    table = (out / "suite.md").read_text()
    assert table.count("\n") == 5 and "| cap | caption | 2 | CIDEr |" in table
    assert len((out / "suite_mc.jsonl").read_text().splitlines()) == 2
    assert "| qa | vqa |" in capsys.readouterr().out
    suite.write_text("sets:\n  - {name: x, task: caption, path: here}\n")
    assert main(argv) == 2 and "unknown field(s) ['path']" in capsys.readouterr().err


def test_every_suite_in_configs_loads_and_recipes_name_existing_suites():
    root = Path(__file__).resolve().parents[1]
    suites = sorted((root / "configs" / "eval").glob("*.yaml"))
    assert {p.name for p in suites} >= {"vlm_suite.yaml", "quickstart_suite.yaml"}
    for path in suites:
        assert load_suite(path)
    quickstart = load_suite(root / "configs" / "eval" / "quickstart_suite.yaml")
    named = 0
    for recipe in (root / "configs").rglob("vila_stage*.yaml"):
        # overlays (vila_stage3_lora.yaml) keep their base recipe's callbacks
        for cb in yaml.safe_load(recipe.read_text())["trainer"].get("callbacks", []):
            if cb["class_path"] == "mmpt.eval.VLMEvalCallback":
                suite = cb["init_args"]["suite"]
                if isinstance(suite, str):  # the real recipes: a suite file
                    named += (root / suite).is_file()
                else:  # the quickstarts: the quickstart suite inline (any working folder)
                    named += load_suite(suite, recipe.name) == quickstart
    assert named == 6  # the three stage recipes and the three quickstart stages


def test_inline_suite_is_checked_like_a_file():
    specs = load_suite([{"name": "a", "task": "vqa", "data": "d", "prompt": "{question}"}])
    assert [(s.name, s.task, s.prompt) for s in specs] == [("a", "vqa", "{question}")]
    with pytest.raises(ValueError, match=r"recipe: sets\[0\] has missing field\(s\) \['data'\]"):
        load_suite([{"name": "a", "task": "vqa"}], "recipe")
    with pytest.raises(ValueError, match="non-empty 'sets:' list"):
        load_suite([], "recipe")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_checkpoint_and_exported_llava_folder_give_the_same_numbers(tmp_path, monkeypatch):
    """~1.5 min: the quickstart suite from a checkpoint and from its ``mmpt export`` LLaVA."""
    from mmpt.cli import build_cli
    from mmpt.synth import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic("image-text", "data/shapes", train_samples=8, image_size=32)
    cfg = str(CONFIGS / "quickstart" / "vila_stage1.yaml")
    torch.manual_seed(3)
    model = build_cli(["-c", cfg, "--trainer.logger=false"], run=False).model
    torch.save({"state_dict": perturb(model).state_dict()}, "model.ckpt")
    assert (
        main(["export", "-c", cfg, "--ckpt", "model.ckpt", "--out", "hf", "--format", "llava"]) == 0
    )
    suite = str(CONFIGS / "eval" / "quickstart_suite.yaml")
    run = ["eval", "all", "--suite", suite, "--max-samples", "4", "--max-new-tokens", "6"]
    run += ["--no-java", "--device", "cpu"]
    assert main([*run, "-c", cfg, "--ckpt", "model.ckpt", "--out", "a"]) == 0
    assert main([*run, "--model", "hf", "--out", "b"]) == 0
    a, b = (json.loads(Path(d, "quickstart_suite.json").read_text()) for d in "ab")
    assert a["metrics"] == b["metrics"] and len(a["metrics"]) == 4
    for name in a["metrics"]:
        rows = [Path(d, f"quickstart_suite_{name}.jsonl").read_text() for d in "ab"]
        assert rows[0] == rows[1] and len(rows[0].splitlines()) in (4, 16)  # circular: x4
    outputs = [json.loads(line)["output"] for line in rows[0].splitlines()]
    assert any(outputs)  # the perturbed model says something: the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_callback_during_fit_logs_and_writes_the_history(tmp_path, monkeypatch):
    """~1-2 min: 3 steps of the stage-1 quickstart with the suite at step 2 and at the end."""
    import csv

    from mmpt.synth import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic("image-text", "data/shapes", train_samples=48, image_size=32)
    Path("cb.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, save_top_k: 0}\n"
        "    - class_path: mmpt.eval.VLMEvalCallback\n"
        f"      init_args: {{suite: {CONFIGS / 'eval' / 'quickstart_suite.yaml'}, "
        "every_n_steps: 2, max_samples: 3, max_new_tokens: 4}\n"
    )
    fast = ["--trainer.max_steps=3", "--trainer.val_check_interval=3"]
    fast += ["--trainer.limit_val_batches=1", "--data.init_args.num_workers=0"]
    cfg = str(CONFIGS / "quickstart" / "vila_stage1.yaml")
    assert main(["fit", "-c", cfg, "-c", "cb.yaml", *fast]) == 0
    run = sorted(Path("runs/vila_tiny").glob("version_*"))[-1]
    history = json.loads((run / "eval" / "vlm_eval.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 3]
    assert (run / "eval" / "vlm_eval.png").stat().st_size > 0
    assert (run / "eval" / "vlm_step3.md").is_file()
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("eval/shapes_vqa/vqa_accuracy")]
    assert [int(r["step"]) for r in logged] == [2, 3]
    assert (
        float(logged[-1]["eval/shapes_choice/circular_accuracy"])
        == (history[-1]["shapes_choice"]["circular_accuracy"])
    )


def test_circular_set_with_mmbench_rotated_rows_is_not_rotated_again(model, tmp_path, monkeypatch):
    """MMBench circular TSV rows: index + k * 1e6 are one question's rotated copies."""
    rows = [
        {"id": "7", "question": "q", "options": {"A": "red", "B": "blue"}, "answer": "A"},
        {"id": "1000007", "question": "q", "options": {"A": "blue", "B": "red"}, "answer": "B"},
        {"id": "8", "question": "q", "options": {"A": "red", "B": "blue"}, "answer": "B"},
        {"id": "1000008", "question": "q", "options": {"A": "blue", "B": "red"}, "answer": "A"},
    ]
    spec = SetSpec("mm", "choice", str(write_set(tmp_path / "mm", rows)), circular=True)
    gen = Generator(model)
    monkeypatch.setattr(
        gen, "generate", lambda prompts, *a, **k: ["A", "B", "B", "B"][: len(prompts)]
    )
    result = evaluate_set(gen, spec, batch_size=4)
    assert len(result.records) == 4 and {r["rotation"] for r in result.records} == {0}
    assert result.metrics["circular_accuracy"] == 0.5 and result.metrics["questions"] == 2
    assert result.metrics["accuracy"] == 0.75
