"""User errors of `mmpt fit`/`eval`/`data`: one short `error:` block, the traceback on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.cli import main
from mmpt.cli_args import join_negative_numbers, unknown_option_hint
from mmpt.preflight import cpu_overrides, missing_weights, preflight
from mmpt.user_errors import UserError

ROOT = Path(__file__).resolve().parents[2]
VILA = str(ROOT / "configs" / "vila_stage1.yaml")
CLIP_TINY = str(ROOT / "configs" / "quickstart" / "clip_tiny.yaml")
CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.precision",
    "32-true",
]


def error_block(capsys: pytest.CaptureFixture) -> str:
    """stderr from the `error:` line on (Lightning may log a line such as 'Seed set' first)."""
    err = capsys.readouterr().err
    assert "error: " in err, err
    block = err[err.index("error: ") :]
    assert "Traceback" not in err and "Namespace(" not in err, err
    assert block.count("\n") <= 25, block
    return block


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpu_recipe_without_weights_reports_devices_and_every_missing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, no_cuda
) -> None:
    monkeypatch.chdir(tmp_path)
    llm, vision = tmp_path / "Qwen2.5-1.5B", tmp_path / "siglip"
    argv = ["fit", "-c", VILA, "--model.llm.pretrained", str(llm)]
    assert main([*argv, "--model.vision.pretrained", str(vision)]) == 2
    block = error_block(capsys)
    assert "no CUDA GPU" in block and "trainer.devices: 8" in block
    assert " ".join(CPU[i] + " " + CPU[i + 1] for i in range(0, len(CPU), 2)) in block
    # both folders at once, each with its flag and the recipe's repo id (never the local path)
    assert f"--model.llm.pretrained {llm}\n" in block
    assert f"hf download Qwen/Qwen2.5-1.5B --local-dir {llm}\n" in block
    assert f"--model.vision.pretrained {vision}\n" in block
    assert f"hf download google/siglip-so400m-patch14-384 --local-dir {vision}" in block
    assert f"hf download {tmp_path}" not in block
    assert not (tmp_path / "runs").exists()  # nothing was built or run

    monkeypatch.setenv("MMPT_DEBUG", "1")  # the traceback on request: the error is raised
    with pytest.raises(UserError, match="hf download Qwen/Qwen2.5-1.5B"):
        main([*argv, "--model.vision.pretrained", str(vision)])


def test_component_error_inside_jsonargparse_is_shown_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A folder that holds no model passes the preflight (it is not empty); the LLM's own error
    (flag and repo id) is printed, not jsonargparse's union error with the config dump."""
    monkeypatch.chdir(tmp_path)
    for name in ("llm", "vision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text("download interrupted")
    argv = ["fit", "-c", VILA, *CPU, "--model.llm.pretrained", str(tmp_path / "llm")]
    argv += ["--model.vision.pretrained", str(tmp_path / "vision")]
    assert main(argv) == 2
    block = error_block(capsys)
    assert block.startswith(f"error: LLM weights not found at '{tmp_path / 'llm'}'")
    assert f"hf download Qwen/Qwen2.5-1.5B --local-dir {tmp_path / 'llm'}" in block
    assert "--model.init_args.llm.init_args.pretrained" in block
    assert "Does not validate" not in block and block.count("\n") == 1


def test_abbreviated_flag_is_refused_with_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", CLIP_TINY, "--trainer.max_epoch", "3"]) == 2
    block = error_block(capsys)
    hint = "unknown option --trainer.max_epoch; did you mean --trainer.max_epochs?"
    assert block == f"error: {hint}\n"
    # argparse subcommands too: `--chec` is not read as `--check`
    assert main(["data", "inspect", str(tmp_path), "--chec"]) == 2
    assert "unknown option --chec; did you mean --check?" in capsys.readouterr().err


def test_negative_number_in_exponent_form_is_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", CLIP_TINY, "--model.optimizer.init_args.lr", "-1e-3", "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == -1e-3


def test_join_negative_numbers_and_option_hints() -> None:
    assert join_negative_numbers(["--lr", "-1e-3", "--x", "-2", "-c", "-1E5"]) == [
        "--lr=-1e-3",
        "--x",
        "-2",  # argparse reads plain negatives itself
        "-c",
        "-1E5",  # after a short flag: left alone
    ]
    assert join_negative_numbers(["--lr=-1e-3", "-1e-3"]) == ["--lr=-1e-3", "-1e-3"]
    known = ["--trainer.max_epochs", "--trainer.max_steps", "--check"]
    assert unknown_option_hint("unrecognized arguments: fit --trainer.max_step=3", known) == (
        "unknown option --trainer.max_step; did you mean --trainer.max_steps?"
    )
    assert "did you mean" not in unknown_option_hint("unrecognized arguments: --zzz", known)
    assert unknown_option_hint("argument --model: expected one argument", known) is None


def test_missing_weights_walks_every_class_node(tmp_path: Path) -> None:
    there = tmp_path / "there"
    there.mkdir()
    (there / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()  # an empty folder: a download that never happened
    llm = {"class_path": "mmpt.models.llm.CausalLM", "init_args": {"repo_id": "Qwen/Qwen2.5-0.5B"}}
    config = {
        "model": {
            "class_path": "mmpt.models.vlm.VLMModule",
            "init_args": {
                "llm": {**llm, "init_args": {**llm["init_args"], "pretrained": str(there)}},
                "vision": {
                    "class_path": "mmpt.models.encoders.HFVisionTower",
                    "init_args": {"pretrained": "/nowhere/siglip"},  # no repo_id
                },
                "audio": {
                    "class_path": "mmpt.models.encoders.Wav2Vec2Tower",
                    "init_args": {"pretrained": "mmpt-test/not-cached"},
                },
                "init_from": ["/nowhere/stage1.ckpt", "/nowhere/stage1.ckpt"],
                "towers": [  # a class without repo_id: no download command, no repo_id hint
                    {
                        "class_path": "mmpt.models.encoders.TimmVisionTower",
                        "init_args": {"pretrained": "/nowhere/vit.safetensors"},
                    }
                ],
            },
        },
        "data": {"class_path": "mmpt.datamodules.vlm.VLMDataModule", "init_args": {}},
        "trainer": {"callbacks": [{"class_path": "mmpt.models.encoders.HFTextTower"}]},
    }
    config["trainer"]["callbacks"][0]["init_args"] = {"path": str(tmp_path / "empty")}
    missing = missing_weights(config)
    assert [(m.flag, m.path) for m in missing] == [
        ("--model.init_from", "/nowhere/stage1.ckpt"),  # listed once
        ("--model.vision.pretrained", "/nowhere/siglip"),
        ("--model.audio.pretrained", "mmpt-test/not-cached"),
        ("--model.towers.0.pretrained", "/nowhere/vit.safetensors"),
        ("--trainer.callbacks.0.path", str(tmp_path / "empty")),
    ]
    assert ("--model.init_from", "/nowhere/stage1.ckpt") not in [  # eval/export: not read
        (m.flag, m.path) for m in missing_weights(config, model_init_from=False)
    ]
    lines = [m.lines()[1].strip() for m in missing]
    assert lines[0].startswith("no such checkpoint")
    assert lines[1] == "the config names no repo for it: set --model.vision.repo_id"
    assert lines[2] == "hf download mmpt-test/not-cached"  # a repo id: into the HF cache
    assert lines[3] == "not found: point the flag at your local copy"
    assert lines[4] == "the config names no repo for it: set --trainer.callbacks.0.repo_id"


def test_cpu_overrides() -> None:
    recipe = {"accelerator": "gpu", "devices": 8, "strategy": "ddp", "precision": "bf16-mixed"}
    assert cpu_overrides(recipe, cuda_available=True) == []
    assert cpu_overrides(recipe, cuda_available=False) == [
        "--trainer.accelerator cpu",
        "--trainer.devices 1",
        "--trainer.strategy auto",
        "--trainer.precision 32-true",
    ]
    fsdp = {"strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "num_nodes": 2}
    assert cpu_overrides(fsdp, cuda_available=False) == [
        "--trainer.accelerator cpu",
        "--trainer.devices 1",
        "--trainer.strategy auto",
        "--trainer.num_nodes 1",
    ]
    assert cpu_overrides({"accelerator": "auto", "devices": 1}, cuda_available=False) == []
    fsdp2 = {"accelerator": "cpu", "strategy": {"class_path": "mmpt.strategies.FSDP2"}}
    assert cpu_overrides(fsdp2, cuda_available=False) == []  # fully_shard runs on gloo
    preflight({"trainer": {"accelerator": "auto"}}, training=True)  # nothing to report


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_eval_retrieval_on_a_vlm_checkpoint_names_its_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mmpt.synth import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic("image-text", "data/shapes", train_samples=8, image_size=32)
    torch.save({"state_dict": {}}, "vlm.ckpt")
    cfg = str(ROOT / "configs" / "quickstart" / "vila_stage1.yaml")
    assert main(["eval", "retrieval", "-c", cfg, "--ckpt", "vlm.ckpt"]) == 2
    block = error_block(capsys)
    assert block.startswith("error: --ckpt vlm.ckpt: a VLM model (VLMModule) has no ")
    assert "encode_media/encode_text" in block and "`mmpt generate`" in block
    assert "`mmpt eval retrieval`" not in block.split("Commands for this checkpoint:")[1]


@pytest.mark.slow
def test_the_console_script_hides_the_traceback_unless_asked(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "mmpt.cli", "fit", "-c", VILA, *CPU]
    argv += ["--model.llm.pretrained", str(tmp_path / "none")]
    argv += ["--model.vision.pretrained", str(tmp_path / "none2")]
    env = {**os.environ, "MMPT_DEBUG": ""}
    quiet = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert "hf download Qwen/Qwen2.5-1.5B" in quiet.stderr
    loud = subprocess.run(
        argv, cwd=tmp_path, env={**env, "MMPT_DEBUG": "1"}, capture_output=True, text=True
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "UserError" in loud.stderr


def test_mmpt_debug_raises_in_the_argparse_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    commands = [
        ["data", "inspect", str(tmp_path / "nope")],
        ["merge", "--ckpt", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--out", "m"],
        ["eval", "retrieval", "-c", CLIP_TINY, "--ckpt", str(tmp_path / "none.ckpt")],
    ]
    for argv in commands:
        assert main(argv) == 2
        assert str(tmp_path) in error_block(capsys)
    monkeypatch.setenv("MMPT_DEBUG", "1")
    for argv in commands:
        with pytest.raises((OSError, ValueError)):
            main(argv)


def test_download_command_never_takes_a_local_path_for_a_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmpt.preflight import download_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert download_command("data/tokenizer", None) is None  # `data` is a folder here
    assert download_command("/models/bert", None) is None
    assert download_command("org/bert", None) == "hf download org/bert"
    assert download_command("org/bert", "org/bert") == "hf download org/bert"
    assert download_command("/m/bert", "org/bert") == "hf download org/bert --local-dir /m/bert"
    assert download_command("/m/vit/model.safetensors", "timm/vit") == (
        "hf download timm/vit --local-dir /m/vit"
    )
