"""``mmpt data score --model DIR``: an open_clip folder scores as open_clip's own model does."""

from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from safetensors.torch import save_file

from mmpt.curation.clip_model import CONFIG_FILE, open_clip_folder
from mmpt.data_cli import main as data_main
from mmpt.datamodules.stages import SkipCounter, read_shards
from tests.helpers import write_shards

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

MODEL_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}


def write_open_clip_folder(out: Path, weights: str) -> Path:
    """A folder as an OpenCLIP hub repo holds it, written with open_clip's own ``CLIP``."""
    torch.manual_seed(0)
    model = CLIP(**MODEL_CFG)
    with torch.no_grad():  # off the init, so a weight left unloaded shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out.mkdir(parents=True)
    cfg = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(out / weights))
    else:
        torch.save(state, out / weights)
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards of 2 samples (24 px JPEGs, upscaled to the model's 32 px)."""
    return write_shards(tmp_path_factory.mktemp("raw") / "raw", n=6, per_shard=2, prefix="raw")


def open_clip_scores(folder: Path, raw: Path) -> dict[str, float]:
    """open_clip's own cosine: its model, transform and tokenizer from ``local-dir:``."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    out = {}
    for sample in read_shards(sorted(str(p) for p in raw.glob("*.tar")), SkipCounter()):
        image = preprocess(Image.open(io.BytesIO(sample["jpg"])))[None]
        with torch.no_grad():
            img = model.encode_image(image, normalize=True)
            txt = model.encode_text(tokenizer([sample["txt"].decode()]), normalize=True)
        out[sample["__key__"]] = float((img * txt).sum())
    return out


@pytest.mark.parametrize(
    "weights",
    [
        "open_clip_model.safetensors",
        pytest.param("open_clip_pytorch_model.bin", marks=pytest.mark.slow),  # torch weights_only
    ],
)
def test_scores_equal_open_clips_cosine(tmp_path: Path, raw: Path, weights: str) -> None:
    folder = write_open_clip_folder(tmp_path / "my-clip", weights)
    out = tmp_path / "scores"
    argv = ["score", "--model", str(folder), "--from", str(raw), "--out", str(out)]
    argv += ["--batch-size", "3", "--num-workers", "0", "--accelerator", "cpu"]
    assert data_main(argv) == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        f"raw-{i:06d}.parquet" for i in range(3)
    ]
    ref = open_clip_scores(folder, raw)
    assert sorted(r["key"] for r in rows) == sorted(ref)
    assert len({round(v, 4) for v in ref.values()}) == len(ref)  # samples differ
    for r in rows:
        assert r["clip"] == pytest.approx(ref[r["key"]], abs=1e-5), r


def _error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert data_main(["score", *argv, "--from", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = str(tmp_path / "nope")
    assert "--model: no folder" in _error(capsys, "--model", missing)
    (tmp_path / "empty").mkdir()
    err = _error(capsys, "--model", str(tmp_path / "empty"))
    assert CONFIG_FILE in err and "mmpt export --format open_clip" in err
    (tmp_path / "empty" / CONFIG_FILE).write_text(json.dumps({"model_cfg": MODEL_CFG}))
    assert "no weights" in _error(capsys, "--model", str(tmp_path / "empty"))
    both = _error(capsys, "--model", str(tmp_path), "-c", "a.yaml", "--ckpt", "b.ckpt")
    assert "not both" in both
    neither = _error(capsys)
    assert "--model DIR" in neither and "-c CONFIG --ckpt CKPT" in neither


def test_other_open_clip_transform_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    pre = {**PREPROCESS_CFG, "resize_mode": "squash"}
    cfg = {"model_cfg": MODEL_CFG, "preprocess_cfg": pre}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        open_clip_folder(str(tmp_path))
    assert "'resize_mode': 'squash'" in caplog.text
    caplog.clear()
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "preprocess_cfg": PREPROCESS_CFG}))
    with caplog.at_level("WARNING"):
        open_clip_folder(str(tmp_path))
    assert caplog.text == ""
