"""The quickstarts learn: CLIP R@1 far above chance; the VLM uses its images (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.cli import main
from mmpt.eval.translate_metrics import corpus_scores

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quickstart_reaches_recall_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CLIP quickstart, from scratch (data generated on the fly): R@1 >= 0.30 both ways,
    where chance is 1/192."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/clip_tiny.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/clip_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/retrieval/t2i/R@1")]
    final = rows[-1]
    assert float(final["val/retrieval/t2i/R@1"]) >= 0.30
    assert float(final["val/retrieval/i2t/R@1"]) >= 0.30


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vila_quickstart_uses_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`make demo`'s VLM run: held-out caption loss with the true images is clearly below the
    loss with the images shuffled across samples, and its greedy captions name the shapes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/vila_stage1.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/vila_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    final = rows[-1]
    true, shuffled = float(final["val/loss"]), float(final["val/loss_shuffled_images"])
    assert true < 0.75 * shuffled, (true, shuffled)
    # its captions name colour and shape far above chance, through mmpt generate and through
    # transformers' own classes on the exported LLaVA folder alike
    ckpt = "runs/vila_tiny/last/checkpoints/last.ckpt"
    script = ROOT / "scripts" / "quickstart_captions.py"
    argv = [sys.executable, str(script), "--ckpt", ckpt, "--out", "captions"]
    subprocess.run(argv, check=True)
    report = json.loads(Path("captions/report.json").read_text())
    chance = report["chance"]["color+shape"]
    for path in ("mmpt_generate", "transformers_export"):
        assert report[path]["color+shape"] > 5 * chance, report[path]
        assert report[path]["color"] > 0.9, report[path]
    assert report["identical_captions"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_egovlp_quickstart_learns_objects_and_actions(tmp_path: Path, monkeypatch):
    """Video-text R@1 far above chance (1/180), and synthetic EgoMCQ intra-video accuracy (which
    needs the action, visible only over time) above chance (0.2)."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    cfg = "configs/quickstart/egovlp_tiny.yaml"
    assert main(["fit", "-c", cfg]) == 0
    metrics = sorted(tmp_path.glob("runs/egovlp_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/retrieval/t2v/R@1")]
    assert float(rows[-1]["val/retrieval/t2v/R@1"]) >= 0.05
    assert float(rows[-1]["val/retrieval/v2t/R@1"]) >= 0.05
    ckpt = "runs/egovlp_tiny/last/checkpoints/last.ckpt"
    args = ["eval", "mcq", "-c", cfg, "--ckpt", ckpt, "--data", "data/video/mcq"]
    assert main([*args, "--num-frames", "4", "--out", "mcq"]) == 0
    acc = json.loads((tmp_path / "mcq" / "mcq.json").read_text())["metrics"]
    assert acc["intra_video_acc"] > 0.3 and acc["inter_video_acc"] > 0.5, acc


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ssl4eo_mae_quickstart_beats_random_init(tmp_path: Path, monkeypatch, capsys):
    """The 13-band MAE quickstart: the loss falls, reconstructions are drawn, and kNN (k=5) on
    the frozen MAE features beats the same tower at random initialisation."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/ssl4eo_mae_tiny.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/ssl4eo_mae_tiny/**/metrics.csv"))[-1]
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r["train/loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert sorted(metrics.parent.glob("reconstructions/epoch*.png"))
    ckpt = "runs/ssl4eo_mae_tiny/last/checkpoints/last.ckpt"
    args = ["eval", "probe", "--ckpt", ckpt, "--train", "data/landcover/train"]
    assert main([*args, "--test", "data/landcover/test", "--baseline", "--out", "probe"]) == 0
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())["metrics"]
    assert report["knn/top1"] > report["knn_random_init/top1"], report


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_speech_quickstarts_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Audio-text R@1 on the 300 held-out clips far above chance (1/300), then the BLSP adapter
    (frozen CLAP-trained encoder, frozen text-trained LLM, targets generated by that LLM with
    `mmpt data continue`) brings the held-out continuation loss clearly below the no-audio
    baseline on the same rows; `mmpt eval asr` reports its WER and `mmpt eval translate` scores
    its continuations of the clips above those of mismatched clips."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/speech_tiny.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/speech_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/retrieval/t2a/R@1")]
    assert float(rows[-1]["val/retrieval/t2a/R@1"]) >= 0.05
    assert float(rows[-1]["val/retrieval/a2t/R@1"]) >= 0.05

    assert main(["fit", "-c", "configs/quickstart/blsp_tiny_lm.yaml"]) == 0
    blsp_continue("blsp_tiny_lm")  # BLSP step 1: the trained LLM writes the targets
    assert main(["fit", "-c", "configs/quickstart/blsp_tiny.yaml"]) == 0
    metrics = sorted(tmp_path.glob("runs/blsp_tiny/**/metrics.csv"))[-1]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    speech, silent = float(rows[-1]["val/loss"]), float(rows[-1]["val/loss_no_audio"])
    assert speech < 0.75 * silent, (speech, silent)
    export("blsp_tiny")
    model = ["--model", "runs/blsp_tiny/export"]
    argv = ["eval", "asr", *model, "--data", "data/tones/val", "--prompt", "Transcribe the speech."]
    assert main(argv) == 0  # zero-shot ASR: the model was trained to continue, not transcribe
    report = json.loads(Path("runs/blsp_tiny/export/eval/asr.json").read_text())
    assert report["num_utterances"] == 300 and report["metrics"]["wer"] <= 1.5, report
    # its continuation of each clip against the LLM's continuation of the transcript (chrF),
    # above the same outputs scored against another clip's continuation
    argv = ["eval", "translate", *model, "--data", "data/tones-cont/val", "--target-lang", "en"]
    argv += ["--reference-key", "json:continuation", "--prompt", "", "--out", "cont"]
    assert main(argv) == 0
    with open("cont/translate.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    hyps, refs = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
    matched = corpus_scores(hyps, refs)["chrf"]
    assert matched > corpus_scores(hyps, refs[1:] + refs[:1])["chrf"] + 5, matched


def export(run: str) -> None:
    """``mmpt export --format mmpt`` of a quickstart run to ``runs/<run>/export``."""
    ckpt = f"runs/{run}/last/checkpoints/last.ckpt"
    argv = ["export", "-c", f"configs/quickstart/{run}.yaml", "--format", "mmpt", "--ckpt", ckpt]
    assert main([*argv, "--out", f"runs/{run}/export"]) == 0


def blsp_continue(run: str) -> None:
    """``mmpt data continue`` with the text-trained tiny LLM over data/tones -> data/tones-cont;
    having learned the text task, it writes the synthetic continuations back word for word."""
    import tarfile

    export(run)
    for split in ("train", "val"):
        argv = ["data", "continue", "--llm", f"runs/{run}/export", "--chat-template", "plain"]
        argv += ["--prompt-template", "{text}", "--batch-size", "64", "--max-new-tokens", "16"]
        assert (
            main([*argv, "--from", f"data/tones/{split}", "--out", f"data/tones-cont/{split}"]) == 0
        )
    same = total = 0
    for new in sorted(Path("data/tones-cont/val").glob("*.tar")):
        with tarfile.open(new) as a, tarfile.open(Path("data/tones/val") / new.name) as b:
            old = {m.name: json.load(b.extractfile(m)) for m in b if m.name.endswith(".json")}
            for m in a:
                if m.name.endswith(".json"):
                    got = json.load(a.extractfile(m))["continuation"]
                    same, total = same + (got == old[m.name]["continuation"]), total + 1
    assert total == 300 and same >= 0.9 * total, (same, total)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_continual_quickstart_replay_reduces_forgetting(tmp_path: Path, monkeypatch):
    """Domain A -> B with and without 20% replay of A: A's retrieval drops less with replay,
    and both runs learn B."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["fit", "-c", "configs/quickstart/clip_tiny.yaml"]) == 0
    cfg = "configs/quickstart/continual_tiny.yaml"
    assert main(["fit", "-c", cfg]) == 0
    assert main(["fit", "-c", cfg, "-c", "configs/continual/no_replay.yaml"]) == 0

    def final(run: str) -> dict:
        path = sorted(tmp_path.glob(f"runs/{run}/**/eval/forgetting.json"))[-1]
        report = json.loads(path.read_text())
        return {s: m["retrieval/t2i/R@1"]["last"] for s, m in report["metrics"].items()}

    replay, plain = final("continual_tiny"), final("continual_tiny_no_replay")
    assert replay["A"] > plain["A"] + 0.1, (replay, plain)
    assert min(replay["B"], plain["B"]) > 0.2, (replay, plain)
