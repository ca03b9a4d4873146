"""``mmpt export`` end to end: recipe + checkpoint -> the format each family defaults to, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from transformers import CLIPModel

from mmpt.bands import S2_L1C
from mmpt.cli import build_cli, main
from mmpt.models.module import load_checkpoint
from tests.test_audio_encoders import hf_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIP = [
    "-c",
    str(CONFIGS / "quickstart" / "clip_tiny.yaml"),
    "--data.init_args.synthetic.train_samples=16",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=8",
]
# the quickstart's timm tower has model_kwargs open_clip cannot pass: an open_clip ViT instead
OPEN_CLIP_VIT = {
    "class_path": "mmpt.models.encoders.OpenCLIPVisionTower",
    "init_args": {
        "model_name": "ViT-B-16",
        "embed_dim": 64,
        "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "image_size": 32},
    },
}
MAE = [
    "-c",
    str(CONFIGS / "quickstart" / "ssl4eo_mae_tiny.yaml"),
    "--data.init_args.synthetic.train_samples=16",
    "--model.init_args.encoder.init_args.model_kwargs="
    "{patch_size: 4, embed_dim: 96, depth: 2, num_heads: 3}",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One folder for the module: the recipes' synthetic data is generated once."""
    path = tmp_path_factory.mktemp("export_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield path


def open_clip_args(workdir: Path) -> list[str]:
    overlay = {"model": {"init_args": {"vision": OPEN_CLIP_VIT}}}
    (workdir / "oc.yaml").write_text(yaml.safe_dump(overlay))
    return [*CLIP, "-c", "oc.yaml"]


def checkpoint(args: list[str], path: str) -> torch.nn.Module:
    """The recipe's model with weights moved off their init, saved as a Lightning checkpoint."""
    model = build_cli([*args, "--trainer.logger=false"], run=False).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval()


def test_contrastive_auto_exports_open_clip(workdir: Path) -> None:
    args = open_clip_args(workdir)
    model = checkpoint(args, "clip.ckpt")
    assert main(["export", *args, "--ckpt", "clip.ckpt", "--out", "my-clip"]) == 0
    clip, _, _ = open_clip.create_model_and_transforms("local-dir:my-clip")
    tokens = open_clip.get_tokenizer("local-dir:my-clip")(["a red circle"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            clip.eval().encode_image(images, normalize=True),
            model.encode_image(images),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            clip.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-5, rtol=0
        )
    assert main(["export", *args, "--ckpt", "clip.ckpt", "--out", "hf-clip", "--format", "hf"]) == 0
    hf = CLIPModel.from_pretrained("hf-clip").eval()
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=images)
        out = out if torch.is_tensor(out) else out.pooler_output
        torch.testing.assert_close(
            F.normalize(out, dim=-1), model.encode_image(images), atol=1e-5, rtol=0
        )


def test_quickstart_clip_exports_its_timm_tower_not_open_clip(workdir: Path, capsys) -> None:
    model = checkpoint(CLIP, "timm-clip.ckpt")
    args = [*CLIP, "--ckpt", "timm-clip.ckpt"]
    assert main(["export", *args, "--out", "not-oc", "--format", "open_clip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: open_clip cannot express") and "model_kwargs" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert main(["export", *args, "--out", "vis", "--format", "timm"]) == 0
    tower = timm.create_model("local-dir:vis", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), model.vision(images), atol=1e-5, rtol=0)


def test_mae_auto_exports_timm_with_bands(workdir: Path) -> None:
    model = checkpoint(MAE, "mae.ckpt")
    assert main(["export", *MAE, "--ckpt", "mae.ckpt", "--out", "mae"]) == 0
    sidecar = json.loads(Path("mae/mmpt_bands.json").read_text())
    assert sidecar["bands"] == list(S2_L1C) and sidecar["scale"] == pytest.approx(1e-4)
    assert sidecar["mean"] == pytest.approx(list(model.encoder.image_preprocess.mean))
    tower = timm.create_model("local-dir:mae", pretrained=True).eval()
    tiles = torch.randn(2, 13, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(tiles), model.encoder(tiles), atol=1e-5, rtol=0)


def test_continued_wav2vec2_auto_exports_hf(workdir: Path) -> None:
    from transformers import Wav2Vec2Model

    cfg = yaml.safe_load((CONFIGS / "wav2vec2_continued.yaml").read_text())
    encoder = cfg["model"]["init_args"]["encoder"]["init_args"]
    encoder.update(pretrained=None, config=hf_config("layer"), gradient_checkpointing=False)
    cfg["trainer"].update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    model = checkpoint(["-c", "tiny.yaml"], "w2v.ckpt")
    assert main(["export", "-c", "tiny.yaml", "--ckpt", "w2v.ckpt", "--out", "w2v"]) == 0
    hf = Wav2Vec2Model.from_pretrained("w2v").eval()
    audio, lengths = torch.randn(1, 2000), torch.tensor([2000])
    with torch.no_grad():
        want, _ = model.encoder.frame_features(audio, lengths)
        torch.testing.assert_close(hf(audio).last_hidden_state, want, atol=1e-5, rtol=0)


def test_bad_input_is_one_line_and_exit_2(workdir: Path, capsys) -> None:
    assert main(["export", "-c", "nope.yaml", "--ckpt", "x.ckpt", "--out", "o"]) == 2
    assert "error: -c: no config file at 'nope.yaml'" in capsys.readouterr().err
    assert main(["export", *CLIP, "--ckpt", "nope.ckpt", "--out", "o"]) == 2
    assert "no checkpoint at 'nope.ckpt'" in capsys.readouterr().err
    Path("empty.ckpt").write_bytes(b"")
    assert main(["export", *CLIP, "--ckpt", "empty.ckpt", "--out", "o", "--format", "mmpt"]) == 2
    err = capsys.readouterr().err
    assert (
        "--format mmpt does not apply to ContrastiveModule; it exports to open_clip, timm, hf"
        in err
    )
    assert not Path("o").exists()


@pytest.mark.slow
def test_fit_two_steps_then_export(workdir: Path) -> None:
    """The real chain: `mmpt fit` writes last.ckpt after two steps, `mmpt export` reads it."""
    args = open_clip_args(workdir)
    fit = ["--trainer.max_epochs=1", "--trainer.logger=false"]
    fit += ["--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint"]
    fit += ["--trainer.callbacks.dirpath=ck", "--trainer.callbacks.save_last=true"]
    assert main(["fit", *args, *fit, "--trainer.enable_progress_bar=false"]) == 0
    assert main(["export", *args, "--ckpt", "ck/last.ckpt", "--out", "fitted"]) == 0
    model = build_cli([*args, "--trainer.logger=false"], run=False).model
    load_checkpoint(model, "ck/last.ckpt")
    clip, _, _ = open_clip.create_model_and_transforms("local-dir:fitted")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            clip.eval().encode_image(images, normalize=True),
            model.eval().encode_image(images),
            atol=1e-5,
            rtol=0,
        )
