"""``mmpt eval mcq``: EgoMCQ scoring with a fake model, the type mapping, corrupt clips and the
command end to end on synthetic multiple-choice shards with a tiny untrained VideoTextModule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmpt.cli import main
from mmpt.datamodules.stages import SkipCounter, read_shards
from mmpt.eval.mcq import MCQBatch, egovlp_type_names, evaluate_mcq, parse_type_names
from mmpt.eval.video_metrics import egomcq_accuracy
from mmpt.models.encoders import OpenCLIPTextTower, VideoViTTower
from mmpt.models.video_text import VideoTextModule
from mmpt.preprocess import ImagePreprocess
from mmpt.shards import ShardWriter
from mmpt.synth import make_synthetic
from tests.helpers import TINY_TEXT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

TINY_VIDEO = {
    "model_name": "vit_tiny_patch16_224",
    "embed_dim": 16,
    "image_size": 64,
    "num_frames": 4,
    "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


# --- scoring with a fake model --------------------------------------------------------------


class OneHotModel(torch.nn.Module):
    """Clip k (first pixel k) and query token k both embed as the k-th unit vector."""

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        return F.one_hot(videos[:, 0, 0, 0, 0].long(), 8).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], 8).float()


def fake_batch(answers: list[int], said: list[int], types: list[int]) -> MCQBatch:
    """Questions whose candidate j shows id j and whose query describes candidate ``said``."""
    q = len(answers)
    videos = torch.zeros(q, 5, 2, 3, 4, 4)
    videos[:, :, 0, 0, 0, 0] = torch.arange(5, dtype=torch.float32)  # float: used as is
    tokens = torch.zeros(q, 3, dtype=torch.long)
    tokens[:, 0] = torch.tensor(said)
    return MCQBatch(videos, tokens, torch.tensor(answers), torch.tensor(types), [""] * q)


def test_scores_pick_the_described_clip() -> None:
    batches = [fake_batch([0, 3, 4], [0, 3, 4], [1, 2, 1]), fake_batch([2], [2], [2])]
    batches[1].skipped = 2
    result = evaluate_mcq(OneHotModel(), batches, {1: "inter", 2: "intra"}, ImagePreprocess())
    assert result.scores.shape == (4, 5)
    assert result.metrics["overall_acc"] == 1.0
    assert result.metrics["inter_video_acc"] == result.metrics["intra_video_acc"] == 1.0
    assert result.metrics["count"] == 4 and result.metrics["skipped"] == 2


def test_swapped_type_mapping_swaps_the_results() -> None:
    # type 1 questions answered right, type 2 wrong (the query describes another clip)
    batch = fake_batch([0, 1, 2, 3], [0, 2, 2, 4], [1, 2, 1, 2])
    right = evaluate_mcq(OneHotModel(), [batch], {1: "inter", 2: "intra"}, ImagePreprocess())
    swapped = evaluate_mcq(OneHotModel(), [batch], {1: "intra", 2: "inter"}, ImagePreprocess())
    assert (right.metrics["inter_video_acc"], right.metrics["intra_video_acc"]) == (1.0, 0.0)
    assert (swapped.metrics["inter_video_acc"], swapped.metrics["intra_video_acc"]) == (0.0, 1.0)
    assert right.metrics["overall_acc"] == swapped.metrics["overall_acc"] == 0.5


def test_parse_type_names() -> None:
    meta = {"mcq_types": {"1": "inter", "2": "intra"}}
    assert parse_type_names(None, meta) == {1: "inter", 2: "intra"}
    assert parse_type_names('{"1": "intra", "2": "inter"}', meta) == {1: "intra", 2: "inter"}
    with pytest.raises(ValueError, match="no EgoMCQ type mapping"):
        parse_type_names(None, {})
    with pytest.raises(ValueError, match="not JSON"):
        parse_type_names("{1: inter}", {})
    with pytest.raises(ValueError, match="among"):
        parse_type_names('{"1": "outer"}', {})


def egovlp_reference(scores, answers, types) -> dict[str, float]:
    """EgoVLP's egomcq_accuracy_metrics, restated: sorted ids zipped with Intra, Inter; argmax."""
    out = {}
    for type_i, group in zip(torch.unique(types), ["Intra-video", "Inter-video"], strict=False):
        hits = [
            int(torch.argmax(s)) == int(a)
            for s, a, t in zip(scores, answers, types, strict=True)
            if t == type_i
        ]
        out[group] = 100 * sum(hits) / len(hits)
    return out


def test_egovlp_type_names_and_tie_rule_against_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 5, generator=g)  # continuous: no ties
    answers = torch.randint(0, 5, (40,), generator=g)
    types = torch.randint(3, 5, (40,), generator=g)  # ids 3 and 4
    assert egovlp_type_names(types.tolist()) == {3: "intra", 4: "inter"}
    ours = egomcq_accuracy(scores, answers, types, egovlp_type_names(types.tolist()))
    ref = egovlp_reference(scores, answers, types)
    assert 100 * ours["intra_video_acc"] == pytest.approx(ref["Intra-video"])
    assert 100 * ours["inter_video_acc"] == pytest.approx(ref["Inter-video"])
    assert ref["Intra-video"] != ref["Inter-video"]  # the naming is visible in the numbers
    # ties: argmax takes the first candidate, mmpt's strict rule counts a miss
    tied = torch.zeros(4, 5)
    zeros = torch.zeros(4, dtype=torch.long)
    ref = egovlp_reference(tied, zeros, torch.tensor([1, 1, 2, 2]))
    assert ref == {"Intra-video": 100.0, "Inter-video": 100.0}
    ours = egomcq_accuracy(tied, zeros, torch.tensor([1, 1, 2, 2]), {1: "intra", 2: "inter"})
    assert ours["overall_acc"] == 0.0
    with pytest.raises(ValueError, match="two question types"):
        egovlp_type_names([1, 1])


# --- the command end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mcq_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    made = make_synthetic(
        "video-text", out, train_samples=1, val_samples=1, mcq_samples=6, image_size=64
    )
    return Path(made["mcq"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny VideoTextModule config and a checkpoint of the untrained model."""
    root = tmp_path_factory.mktemp("run")
    cfg: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1},
        "model": {
            "class_path": "mmpt.models.video_text.VideoTextModule",
            "init_args": {
                "vision": {
                    "class_path": "mmpt.models.encoders.VideoViTTower",
                    "init_args": TINY_VIDEO,
                },
                "text": TINY_TEXT,
            },
        },
        "data": {
            "class_path": "mmpt.datamodules.image_text.ImageTextDataModule",
            "init_args": {"num_workers": 0},
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    text = OpenCLIPTextTower(**TINY_TEXT["init_args"])
    model = VideoTextModule(VideoViTTower(**TINY_VIDEO), text)
    ckpt = root / "untrained.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return {"cfg": path, "ckpt": ckpt}


def run_mcq(checkpoint: dict[str, Path], data: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "mcq", "-c", str(checkpoint["cfg"]), "--ckpt", str(checkpoint["ckpt"])]
    argv += ["--data", str(data), "--out", str(out), "--num-frames", "4", "--device", "cpu"]
    return main([*argv, "--num-workers", "0", "--batch-size", "4", *extra])


def test_eval_mcq_end_to_end(
    checkpoint: dict[str, Path], mcq_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_mcq(checkpoint, mcq_shards, tmp_path) == 0
    report = json.loads((tmp_path / "mcq.json").read_text())
    m = report["metrics"]
    for name in ("overall_acc", "inter_video_acc", "intra_video_acc"):
        assert 0.0 <= m[name] <= 1.0 and math.isfinite(m[name])
    assert (m["count"], m["inter_video_count"], m["intra_video_count"]) == (6, 3, 3)
    assert m["skipped"] == 0
    assert report["type_names"] == {"1": "inter", "2": "intra"}  # from the shards' meta
    assert (tmp_path / "mcq_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mmpt eval mcq" in printed and "inter_video_acc" in printed


def corrupt_copy(src: Path, out: Path) -> Path:
    """The shards again, without index meta, and with question 2's clip 3 made undecodable."""
    samples = list(read_shards(sorted(str(p) for p in src.glob("*.tar")), SkipCounter()))
    with ShardWriter(out, samples_per_shard=100, modalities=["video", "text"]) as w:
        for i, s in enumerate(samples):
            sample = {k: v for k, v in s.items() if not k.startswith("__")}
            if i == 2:
                sample["3.mp4"] = b"not a video"
            w.write({"__key__": s["__key__"], **sample})
    return out


def test_eval_mcq_skips_corrupt_clips_and_needs_a_type_mapping(
    checkpoint: dict[str, Path], mcq_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = corrupt_copy(mcq_shards, tmp_path / "corrupt")
    assert run_mcq(checkpoint, data, tmp_path / "a") == 2
    assert "--type-names" in capsys.readouterr().err

    swapped = '{"1": "intra", "2": "inter"}'
    extra = ("--type-names", swapped, "--backend", "pyav")
    assert run_mcq(checkpoint, data, tmp_path / "b", *extra) == 0
    report = json.loads((tmp_path / "b" / "mcq.json").read_text())
    m = report["metrics"]
    assert (m["count"], m["skipped"]) == (5, 1)
    # question 2 (type 1, now named intra) was skipped
    assert (m["intra_video_count"], m["inter_video_count"]) == (2, 3)
    assert report["type_names"] == {"1": "intra", "2": "inter"}


def test_help_lists_mcq(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "eval mcq" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["eval", "mcq", "--help"])
    assert exc.value.code == 0
    assert "--type-names" in capsys.readouterr().out
