"""The export targets wired together: ``mmpt export`` picks LLaVA or mmpt's format, ``mmpt.load``
reads both, ``init_from`` takes both folders, ``mmpt generate --model`` runs on a LLaVA folder."""

from __future__ import annotations

import io
import logging

import torch
import yaml
from PIL import Image

import mmpt
from mmpt.cli import build_cli, main
from mmpt.export.hf_llava import export_llava
from mmpt.generate import Generator
from mmpt.models.encoders import HFVisionTower
from mmpt.models.init_from import load_init_from
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from tests.test_export_llava import TEXT, VISION, mmpt_batch, png, tiny_vlm, transformers_llava
from tests.test_export_llava import tok as tok  # noqa: F401 - the module fixture
from tests.test_export_mmpt import perturb


def _logits(model: VLMModule, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


def test_mmpt_load_reads_llava_and_mmpt_folders(tok, tmp_path):  # noqa: F811
    model = tiny_vlm(tok, "siglip", "qwen2")
    batch = mmpt_batch(model, png(32, 32, seed=1), "chatml")
    want = _logits(model, batch)
    llava = export_llava(model, tmp_path / "llava", template="chatml")
    own = model.export_mmpt(tmp_path / "own", template="chatml")
    for folder in (llava, own):
        back = mmpt.load(folder)
        assert isinstance(back, VLMModule)
        assert (_logits(back, batch) - want).abs().max() < 1e-5, folder


def test_init_from_takes_a_transformers_llava_and_an_export_folder(tok, tmp_path, caplog):  # noqa: F811
    hf_folder = tmp_path / "hf"
    hf = transformers_llava(tok, hf_folder, "siglip", tie=False, layout="saved")
    vocab = hf.config.text_config.vocab_size

    def fresh_vlm(seed: int) -> VLMModule:
        torch.manual_seed(seed)
        text = {**TEXT["llama"], "vocab_size": vocab, "tie_word_embeddings": False}
        llm = CausalLM(config=text, tokenizer=str(hf_folder))
        return VLMModule(llm, HFVisionTower(config=VISION["siglip"])).eval()

    fresh = fresh_vlm(5)
    with caplog.at_level(logging.INFO, logger="mmpt"):
        (report,) = load_init_from(fresh, [str(hf_folder)])
    assert report.format == "transformers LLaVA folder" and not report.missing
    batch = mmpt_batch(fresh, png(32, 32, seed=2), "chatml")
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, pixel_values=batch.pixels[0]).logits
    assert (_logits(fresh, batch) - theirs).abs().max() < 1e-4
    # the same model exported in mmpt's format initialises another copy exactly
    own = fresh.export_mmpt(tmp_path / "own")
    other = fresh_vlm(6)
    (report,) = load_init_from(other, [str(own)])
    assert report.format == "mmpt export folder" and not report.missing
    assert torch.equal(_logits(other, batch), _logits(fresh, batch))


def _config(tmp_path, tok, vision: dict) -> str:  # noqa: F811
    """A VLM training config (no data needed to export) with the given vision tower."""
    cfg = {
        "model": {
            "class_path": "mmpt.models.vlm.VLMModule",
            "init_args": {
                "llm": {
                    "class_path": "mmpt.models.llm.CausalLM",
                    "init_args": {"config": TEXT["qwen2"], "tokenizer": str(tok)},
                },
                "vision": vision,
            },
        },
        "data": {
            "class_path": "mmpt.datamodules.vlm.VLMDataModule",
            "init_args": {"train": {"urls": str(tmp_path / "none")}, "template": "chatml"},
        },
    }
    path = tmp_path / "vlm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_export_cli_auto_picks_llava_or_mmpt_and_generate_runs_on_both(tok, tmp_path, capsys):  # noqa: F811
    hf_tower = {
        "class_path": "mmpt.models.encoders.HFVisionTower",
        "init_args": {"config": VISION["siglip"]},
    }
    timm_tower = {
        "class_path": "mmpt.models.encoders.TimmVisionTower",
        "init_args": {
            "model_name": "vit_tiny_patch16_224",
            "image_size": 32,
            "embed_dim": 0,
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        },
    }
    img = tmp_path / "a.png"
    Image.open(io.BytesIO(png(32, 32, seed=3))).save(img)
    for name, tower, kind in (("hf", hf_tower, "llava"), ("timm", timm_tower, "mmpt")):
        (tmp_path / name).mkdir()
        cfg = _config(tmp_path / name, tok, tower)
        model = build_cli(["-c", cfg, "--trainer.logger=false"], run=False).model
        perturb(model)  # trained-looking weights: greedy decoding has clear winners
        ckpt = tmp_path / name / "last.ckpt"
        torch.save({"state_dict": model.state_dict()}, ckpt)
        out = tmp_path / name / "export"
        assert main(["export", "-c", cfg, "--ckpt", str(ckpt), "--out", str(out)]) == 0
        marker = "config.json" if kind == "llava" else "mmpt_vlm.json"
        assert (out / marker).is_file(), kind
        capsys.readouterr()
        argv = ["generate", "--model", str(out), "--image", str(img), "--max-new-tokens", "4"]
        assert main([*argv, "--device", "cpu"]) == 0
        want = Generator(model.eval(), template="chatml").generate(
            [""], [[Image.open(img)]], max_new_tokens=4
        )[0]
        assert capsys.readouterr().out == want + "\n", kind
    # a target the model cannot take names what it can
    argv = ["export", "-c", cfg, "--ckpt", str(ckpt), "--out", str(out), "--format", "llava"]
    assert main(argv) == 2
    assert "--format llava" in capsys.readouterr().err
