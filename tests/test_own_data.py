"""A recipe pointed at the user's own img2dataset shards (issue 16): keys, runs, eval, zero-shot.

The shards are written with webdataset's ``TarWriter`` in img2dataset's layout (``jpg``, ``txt``,
``json``; no ``index.json``), as a user has them.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmpt.cli import main
from tests.helpers import TINY_TEXT, TINY_VISION, write_img2dataset_shards

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def recipe_config(shards: Path, **data: Any) -> dict[str, Any]:
    """Like a recipe in configs/: no checkpoint ``dirpath``, no logger ``save_dir``, 1 step."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "val_check_interval": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "runs/recipe_default",
            "logger": {"class_path": "mmpt.loggers.CSVLogger", "init_args": {"name": ""}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0},
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
                "batch_size": 8,
                "num_workers": 0,
                **data,
            },
        },
    }


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_main(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` and its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two 1-step fits of one recipe from one folder, moved by ``--trainer.default_root_dir``."""
    tmp = tmp_path_factory.mktemp("own")
    shards = write_img2dataset_shards(
        tmp / "shards", n=24, per_shard=8, label=lambda i: "ab"[i % 2]
    )
    cfg = write_yaml(tmp / "recipe.yaml", recipe_config(shards))
    root = tmp / "mine"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("COLUMNS", "300")
        outs = []
        for _ in range(2):
            code, out = run_main(["fit", "-c", str(cfg), f"--trainer.default_root_dir={root}"])
            assert code == 0
            outs.append(out)
        yield {"tmp": tmp, "shards": shards, "cfg": cfg, "root": root, "stdout": outs}


# --- 6: runs, checkpoints and saved configs ---------------------------------------------------


def test_each_run_gets_its_own_version_folder_under_default_root_dir(runs: dict) -> None:
    root = runs["root"]
    first = root / "version_0" / "checkpoints" / "last.ckpt"
    second = root / "version_1" / "checkpoints" / "last.ckpt"
    assert first.is_file() and second.is_file()
    assert (root / "version_1" / "config.yaml").is_file()
    assert not (runs["tmp"] / "runs").exists()  # the recipe's default_root_dir was overridden
    # The stable pointer names the latest run.
    assert (root / "last").resolve() == (root / "version_1").resolve()
    assert (root / "last" / "checkpoints" / "last.ckpt").is_file()


def test_run_summary_prints_the_checkpoint_and_the_stable_path(runs: dict) -> None:
    root = runs["root"]
    out = runs["stdout"][1]
    assert str(root / "version_1" / "checkpoints" / "last.ckpt") in out
    assert str(root / "last" / "checkpoints" / "last.ckpt") in out


def test_eval_takes_the_saved_config_and_its_val_set(runs: dict) -> None:
    root = runs["root"]
    saved = root / "version_1" / "config.yaml"
    assert "ckpt_path" in yaml.safe_load(saved.read_text())  # what used to be refused
    ckpt = root / "last" / "checkpoints" / "last.ckpt"
    argv = ["eval", "retrieval", "-c", str(saved), "--ckpt", str(ckpt)]
    code, _ = run_main([*argv, "--num-workers", "0", "--device", "cpu"])
    assert code == 0
    report = json.loads((ckpt.resolve().parent / "eval" / "retrieval.json").read_text())
    assert report["num_images"] == 24 and report["data"] == str(runs["shards"])


def test_validate_takes_the_saved_config(runs: dict) -> None:
    root = runs["root"]
    ckpt = str(root / "last" / "checkpoints" / "last.ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(runs["tmp"])
        code, out = run_main(
            ["validate", "-c", str(root / "version_0" / "config.yaml"), "--ckpt_path", ckpt]
        )
    assert code == 0 and "val/retrieval/t2i/R@1" in out


# --- 3: zero-shot classification on labels that are class names ---------------------------------


def test_zeroshot_takes_class_names_from_string_labels(runs: dict) -> None:
    ckpt = runs["root"] / "last" / "checkpoints" / "last.ckpt"
    out = runs["tmp"] / "zs_labels"
    argv = ["eval", "zeroshot", "-c", str(runs["cfg"]), "--ckpt", str(ckpt), "--out", str(out)]
    code, _ = run_main([*argv, "--label-key", "json:class", "--num-workers", "0"])
    assert code == 0
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["classnames"] == ["a", "b"]
    assert 0.0 <= report["metrics"]["zeroshot/top1"] <= 1.0


def test_zeroshot_takes_classnames_without_templates(runs: dict) -> None:
    tmp = runs["tmp"]
    (tmp / "classes.txt").write_text("b\na\n")
    ckpt = runs["root"] / "last" / "checkpoints" / "last.ckpt"
    out = tmp / "zs_names"
    argv = ["eval", "zeroshot", "-c", str(runs["cfg"]), "--ckpt", str(ckpt), "--out", str(out)]
    argv += ["--label-key", "json:class", "--classnames", str(tmp / "classes.txt")]
    code, _ = run_main([*argv, "--num-workers", "0"])
    assert code == 0
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["classnames"] == ["b", "a"] and report["num_labelled"] == 24


def test_zeroshot_without_labels_fails_before_embedding(
    runs: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import mmpt.eval.cli as eval_cli

    def embedded(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the embedding pass ran before the label check")

    monkeypatch.setattr(eval_cli.EmbeddingAccumulator, "add", embedded)
    ckpt = runs["root"] / "last" / "checkpoints" / "last.ckpt"
    (runs["tmp"] / "c.txt").write_text("a\nb\n")
    argv = ["eval", "zeroshot", "-c", str(runs["cfg"]), "--ckpt", str(ckpt)]
    argv += ["--classnames", str(runs["tmp"] / "c.txt"), "--num-workers", "0"]
    assert main(argv) == 2  # the default label key json:label is in no sample
    err = capsys.readouterr().err
    assert "json:label" in err and "--label-key" in err and "json:class" in err


# --- 4: validation that sees nothing is an error -------------------------------------------------


def test_val_text_key_absent_from_the_shards_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    shards = write_img2dataset_shards(tmp_path / "shards", n=16, per_shard=8)
    cfg = write_yaml(tmp_path / "c.yaml", recipe_config(shards, val_text_key="json:captions"))
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "json:captions" in err and "data.val_text_key" in err
    assert "txt" in err and "json:caption" in err  # what the shards do have


def test_eval_names_an_absent_text_key(runs: dict, capsys: pytest.CaptureFixture) -> None:
    ckpt = runs["root"] / "last" / "checkpoints" / "last.ckpt"
    argv = ["eval", "retrieval", "-c", str(runs["cfg"]), "--ckpt", str(ckpt)]
    argv += ["--text-key", "json:captions", "--num-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "json:captions" in err and "--text-key" in err and "txt" in err


def test_validation_where_every_sample_is_skipped_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    shards = write_img2dataset_shards(tmp_path / "shards", n=16, per_shard=8, bad_images=True)
    cfg = write_yaml(tmp_path / "c.yaml", recipe_config(shards))
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.val" in err and "16" in err and "skipped" in err


# --- 5: synthetic data only for the urls that read it --------------------------------------------


def test_synthetic_block_writes_nothing_when_urls_point_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmpt.cli import build_cli

    monkeypatch.chdir(tmp_path)
    shards = write_img2dataset_shards(tmp_path / "shards", n=8, per_shard=8)
    synthetic = {"kind": "image-text", "out": "data/shapes", "train_samples": 16, "image_size": 32}
    cfg = write_yaml(tmp_path / "c.yaml", recipe_config(shards, synthetic=synthetic))
    cli = build_cli(["-c", str(cfg), "--trainer.logger=false"], run=False)
    cli.datamodule.prepare_data()
    assert not (tmp_path / "data").exists()


def test_synthetic_block_renders_when_urls_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmpt.cli import build_cli

    monkeypatch.chdir(tmp_path)
    synthetic = {"kind": "image-text", "out": "data/shapes", "train_samples": 16, "image_size": 32}
    cfg = recipe_config(Path("data/shapes/train"), synthetic=synthetic)
    cfg["data"]["init_args"]["val"]["urls"] = "data/shapes/val"
    build_cli(
        ["-c", str(write_yaml(tmp_path / "c.yaml", cfg)), "--trainer.logger=false"], run=False
    )
    assert (tmp_path / "data" / "shapes" / "train" / "index.json").is_file()


def test_synthetic_is_read_by_folders_patterns_and_files_inside_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmpt.datamodules.synthetic import SyntheticData, config_urls

    monkeypatch.chdir(tmp_path)
    spec = SyntheticData(out="data/shapes")
    assert spec.read_by(["data/shapes/train/{000000..000003}.tar"])
    assert spec.read_by(["./data/shapes/val", "elsewhere"])
    assert spec.read_by([str(tmp_path / "data" / "shapes" / "train" / "shard-000000.tar")])
    assert not spec.read_by(["data/shapes2/train", "data/*.tar"])
    assert not spec.read_by(["s3://bucket/data/shapes/x.tar", "pipe:cat data/shapes/a.tar"])
    nested = {
        "train": {"urls": ["a", "b"], "replay": {"urls": "c"}},
        "eval_sets": {"x": {"urls": "d"}},
    }
    assert sorted(config_urls(nested)) == ["a", "b", "c", "d"]
