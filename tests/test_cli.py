"""The ``mmpt`` command end to end: help, config errors, a tiny ``fit`` with validation, then
``mmpt eval retrieval|zeroshot`` on its checkpoint, and the eval command's input errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmpt.cli import main
from tests.helpers import TINY_TEXT, TINY_VISION, write_shards

# `mmpt eval` and these tests pass argv to LightningCLI while pytest's own argv is set.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "clip_tiny.yaml"


def tiny_fit_config(shards: Path, root: Path) -> dict[str, Any]:
    """Like configs/quickstart/clip_tiny.yaml, shrunk to 3 CPU steps on the test shards."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 3,
            "val_check_interval": 3,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "", "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "save_last": True,
                        "save_top_k": 0,
                    },
                },
                {"class_path": "mmpt.eval.callback.ZeroShotEvalCallback"},
                {"class_path": "mmpt.callbacks.RunSummary"},
            ],
        },
        "model": {
            "class_path": "mmpt.models.contrastive.ContrastiveModule",
            "init_args": {"vision": TINY_VISION, "text": TINY_TEXT},
        },
        "data": {
            "class_path": "mmpt.datamodules.image_text.ImageTextDataModule",
            "init_args": {
                "train": {"urls": str(shards), "shuffle_buffer": 0},
                "val": {"urls": str(shards), "shuffle_buffer": 0, "shuffle_shards": False},
                "val_text_key": "json:captions",
                "batch_size": 8,
                "num_workers": 0,
            },
        },
    }


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One ``mmpt fit`` of 3 steps, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("fit")
    shards = write_shards(tmp / "shards", n=40, per_shard=5)
    run = tmp / "runs"
    cfg = write_yaml(tmp / "tiny.yaml", tiny_fit_config(shards, run))
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("COLUMNS", "300")  # rich: no wrapping of long paths in the summary table
        with contextlib.redirect_stdout(stdout):
            assert main(["fit", "-c", str(cfg)]) == 0
        (tmp / "stdout.txt").write_text(stdout.getvalue())
        yield {"tmp": tmp, "shards": shards, "run": run, "cfg": cfg}


# --- help and dispatch -------------------------------------------------------------------


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict"):
        assert f"  {command} " in out
    for command in ("data synth", "data build", "data inspect", "eval retrieval", "eval zeroshot"):
        assert command in out
    assert main([]) == 0  # bare `mmpt` shows the same help
    assert "eval zeroshot" in capsys.readouterr().out


def test_unknown_command_returns_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "fit" in err


# --- configuration errors and printing --------------------------------------------------


def test_misspelt_key_on_the_command_line_is_named(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml(tmp_path / "c.yaml", tiny_fit_config(shards, tmp_path / "runs"))
    assert main(["fit", "-c", str(cfg), "--model.init_args.visoin", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'visoin' is not accepted" in err
    assert "Traceback" not in err and "Namespace(" not in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_misspelt_key_in_yaml_is_named(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tiny_fit_config(shards, tmp_path / "runs")
    cfg["data"]["init_args"]["batch_sise"] = cfg["data"]["init_args"].pop("batch_size")
    assert main(["fit", "-c", str(write_yaml(tmp_path / "typo.yaml", cfg))]) == 2
    assert "batch_sise" in capsys.readouterr().err

    cfg = tiny_fit_config(shards, tmp_path / "runs")
    cfg["model"]["init_args"]["visoin"] = cfg["model"]["init_args"].pop("vision")
    assert main(["fit", "-c", str(write_yaml(tmp_path / "typo2.yaml", cfg))]) == 2
    assert "visoin" in capsys.readouterr().err


def test_print_config_of_the_quickstart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(QUICKSTART), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "mmpt.models.contrastive.ContrastiveModule"
    assert printed["data"]["init_args"]["train"]["urls"] == "data/shapes/train"
    assert not (tmp_path / "data").exists()  # printing generates no data


def test_short_override_without_init_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README/issue form ``--data.train.urls X`` (no ``init_args``) reaches the datamodule."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(QUICKSTART), "--data.train.urls", "x/{0..3}.tar", "--print_config"])
    assert exc.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["train"]["urls"] == "x/{0..3}.tar"
    assert data["train"]["shuffle_buffer"] == 2000  # the rest of the YAML's train block stays
    assert data["val"]["urls"] == "data/shapes/val"


# --- fit, then eval on its checkpoint ---------------------------------------------------


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r[k] not in ("", None)] for k in rows[0]}


def test_fit_writes_checkpoint_config_metrics_and_reports(fitted: dict[str, Path]) -> None:
    run = fitted["run"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["vision"]["init_args"]["embed_dim"] == 16
    assert saved["trainer"]["max_steps"] == 3

    metrics = read_metrics_csv(run / "metrics.csv")
    assert len(metrics["train/loss"]) == 3 and all(math.isfinite(x) for x in metrics["train/loss"])
    assert len(metrics["val/retrieval/t2i/R@1"]) == 1
    assert 0.0 <= metrics["val/retrieval/t2i/R@1"][0] <= 1.0
    assert metrics["data/skipped"][-1] == 0.0

    reports = sorted(p.name for p in (run / "eval").iterdir())
    assert reports == ["val_step3.json", "val_step3_recall.png"]
    report = json.loads((run / "eval" / "val_step3.json").read_text())
    assert report["num_images"] == 40 and report["num_texts"] == 80  # 2 captions per image
    assert report["step"] == 3
    assert report["metrics"]["retrieval/t2i/R@1"] == pytest.approx(
        metrics["val/retrieval/t2i/R@1"][0]
    )
    assert (run / "eval" / "val_step3_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_ends_with_a_run_summary(fitted: dict[str, Path]) -> None:
    summary = (fitted["tmp"] / "stdout.txt").read_text()
    assert "mmpt run outputs" in summary
    run = fitted["run"]
    for path in (run / "checkpoints" / "last.ckpt", run / "metrics.csv", run / "config.yaml"):
        assert str(path) in summary
    assert str(run / "eval" / "val_step3.json") in summary
    assert "val/retrieval/t2i/R@1" in summary


def test_eval_retrieval_matches_validation_during_fit(
    fitted: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out = fitted["tmp"] / "eval_retrieval"
    last = fitted["run"] / "checkpoints" / "last.ckpt"
    argv = ["retrieval", "-c", str(fitted["cfg"]), "--ckpt", str(last)]
    argv += ["--data", str(fitted["shards"]), "--out", str(out), "--num-workers", "0"]
    assert main(["eval", *argv, "--batch-size", "16", "--device", "cpu"]) == 0
    assert "retrieval/t2i/R@1" in capsys.readouterr().out

    report = json.loads((out / "retrieval.json").read_text())
    assert report["num_images"] == 40 and report["num_texts"] == 2 * report["num_images"]
    assert report["checkpoint"] == str(last) and report["data"] == str(fitted["shards"])
    for d in ("t2i", "i2t"):
        for k in ("R@1", "R@5", "R@10", "mean_rank", "median_rank"):
            assert f"retrieval/{d}/{k}" in report["metrics"]
    assert (out / "retrieval_recall.png").read_bytes()[:4] == b"\x89PNG"
    # Same weights and same data as the validation at step 3: same numbers.
    during_fit = json.loads((fitted["run"] / "eval" / "val_step3.json").read_text())["metrics"]
    for name, value in report["metrics"].items():
        assert value == pytest.approx(during_fit[name], abs=1e-6), name


def test_eval_zeroshot_with_classnames_and_templates(fitted: dict[str, Path]) -> None:
    tmp = fitted["tmp"]
    (tmp / "classes.txt").write_text("zero\none\ntwo\n")  # labels are i % 3 in the shards
    (tmp / "templates.txt").write_text("a photo of {}.\n\na picture of {}.\n")
    out = tmp / "eval_zeroshot"
    last = fitted["run"] / "checkpoints" / "last.ckpt"
    argv = ["eval", "zeroshot", "-c", str(fitted["cfg"]), "--ckpt", str(last)]
    argv += ["--data", str(fitted["shards"]), "--out", str(out), "--num-workers", "0"]
    argv += ["--classnames", str(tmp / "classes.txt"), "--templates", str(tmp / "templates.txt")]
    assert main(argv) == 0
    report = json.loads((out / "zeroshot.json").read_text())
    metrics = report["metrics"]
    assert 0.0 <= metrics["zeroshot/top1"] <= 1.0
    assert metrics["zeroshot/top5"] is None  # 3 classes < 5: NaN written as null
    assert not any(k.startswith("retrieval/") for k in metrics)
    assert (out / "zeroshot_confusion.png").is_file()


def test_eval_zeroshot_without_classnames_is_a_clear_error(
    fitted: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    last = fitted["run"] / "checkpoints" / "last.ckpt"
    argv = ["eval", "zeroshot", "-c", str(fitted["cfg"]), "--ckpt", str(last)]
    argv += ["--data", str(fitted["shards"]), "--num-workers", "0"]
    argv += ["--out", str(fitted["tmp"] / "never")]
    assert main(argv) == 2
    assert "--classnames" in capsys.readouterr().err
    assert not (fitted["tmp"] / "never").exists()


def test_eval_missing_checkpoint_returns_2(
    fitted: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    missing = fitted["tmp"] / "nope.ckpt"
    argv = ["eval", "retrieval", "-c", str(fitted["cfg"]), "--data", str(fitted["shards"])]
    assert main([*argv, "--ckpt", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt") and str(missing) in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # no --ckpt at all: argparse's usage error
        main(argv)
    assert exc.value.code == 2
    assert "--ckpt" in capsys.readouterr().err


def test_eval_missing_data_folder_returns_2(
    fitted: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    missing = fitted["tmp"] / "no_such_shards"
    last = fitted["run"] / "checkpoints" / "last.ckpt"
    argv = ["eval", "retrieval", "-c", str(fitted["cfg"]), "--ckpt", str(last)]
    assert main([*argv, "--data", str(missing), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data" in err and "Traceback" not in err


def test_test_and_predict_run_on_the_checkpoint(fitted: dict[str, Path]) -> None:
    """`mmpt test` logs test/ retrieval metrics on data.val; `mmpt predict` returns embeddings."""
    ckpt = str(fitted["run"] / "checkpoints" / "last.ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fitted["tmp"])
        assert main(["test", "-c", str(fitted["cfg"]), "--ckpt_path", ckpt]) == 0
        from mmpt.cli import build_cli

        cli = build_cli(["-c", str(fitted["cfg"]), "--trainer.logger=false"], run=False)
        out = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    assert sum(len(p["keys"]) for p in out) == 40
    assert out[0]["image_emb"].norm(dim=-1).allclose(torch.ones(len(out[0]["keys"])), atol=1e-5)
    reports = {p.name for p in (fitted["run"] / "eval").iterdir()}
    assert any(n.startswith("test_step") and n.endswith(".json") for n in reports)


def test_predict_writes_embeddings_whose_retrieval_equals_eval(fitted: dict[str, Path]) -> None:
    """`mmpt predict` writes keys + normalised embeddings; R@k from the files = `mmpt eval`'s."""
    from mmpt.eval.metrics import retrieval_metrics
    from mmpt.predict_writer import load_predictions

    tmp, ckpt = fitted["tmp"], str(fitted["run"] / "checkpoints" / "last.ckpt")
    out = tmp / "predictions"
    cb = {"class_path": "mmpt.predict_writer.EmbeddingWriter", "init_args": {"out_dir": str(out)}}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        argv = ["predict", "-c", str(fitted["cfg"]), "--ckpt_path", ckpt, "--trainer.logger=false"]
        assert main([*argv, f"--trainer.callbacks+={json.dumps(cb)}"]) == 0
    got = load_predictions(out)
    assert len(got["keys"]) == 40 and len(set(got["keys"])) == 40
    assert got["image_emb"].shape[0] == 40 and got["text_emb"].shape[0] == 80
    assert np.allclose(np.linalg.norm(got["image_emb"], axis=1), 1.0, atol=1e-5)
    from_files = retrieval_metrics(
        torch.from_numpy(got["image_emb"]),
        torch.from_numpy(got["text_emb"]),
        torch.from_numpy(got["text_to_image"]),
    )
    report_dir = tmp / "eval_for_predict"
    argv = ["retrieval", "-c", str(fitted["cfg"]), "--ckpt", ckpt, "--data", str(fitted["shards"])]
    argv += ["--out", str(report_dir), "--num-workers", "0", "--device", "cpu"]
    assert main(["eval", *argv]) == 0
    report = json.loads((report_dir / "retrieval.json").read_text())["metrics"]
    for name, value in from_files.items():
        assert value == pytest.approx(report[f"retrieval/{name}"], abs=1e-6), name
    manifest = json.loads((out / "rank000" / "manifest.json").read_text())
    assert manifest["items"] == 40 and manifest["model"] == "ContrastiveModule"


def test_predict_writes_under_the_run_folder_by_default(fitted: dict[str, Path]) -> None:
    tmp, ckpt = fitted["tmp"], str(fitted["run"] / "checkpoints" / "last.ckpt")
    cfg = yaml.safe_load(fitted["cfg"].read_text())
    cfg["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp / "pred_run"), "name": "p"}
    cfg["trainer"]["callbacks"] = []
    path = write_yaml(tmp / "predict.yaml", cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main(["predict", "-c", str(path), "--ckpt_path", ckpt]) == 0
    (manifest,) = (tmp / "pred_run").glob("p/version_*/predictions/rank000/manifest.json")
    keys = json.loads((manifest.parent / "keys.json").read_text())
    assert len(keys) == 40
