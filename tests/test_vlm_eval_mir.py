"""mmpt eval mir: the relevancy file read without running code, metrics, the command end to end."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset import TarWriter

from mmpt.eval.mir_cli import load_relevancy, load_sentences, mir_metrics
from mmpt.eval.video_metrics import multi_instance_retrieval

ROOT = Path(__file__).resolve().parents[1]


def test_relevancy_formats_and_refusals(tmp_path):
    rel = np.random.default_rng(0).random((4, 3))
    np.save(tmp_path / "r.npy", rel)
    np.savez(tmp_path / "r.npz", relevancy=rel)
    (tmp_path / "r.pkl").write_bytes(pickle.dumps(rel))  # EPIC's file: a pickled array
    for name in ("r.npy", "r.npz", "r.pkl"):
        got = load_relevancy(tmp_path / name)
        assert got.dtype == torch.float64 and torch.equal(got, torch.from_numpy(rel))
    marker = tmp_path / "ran"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # a pickle that runs a command
    frame = b"\x80\x04cpandas.core.frame\nDataFrame\n)\x81."  # a pandas DataFrame pickle
    for name, data, message in (
        ("evil.pkl", evil, "refused to unpickle os.system"),
        ("frame.pkl", frame, "pandas.core.frame.DataFrame"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message) as err:
            load_relevancy(tmp_path / name)
        assert "np.save" in str(err.value)
    assert not marker.exists()
    np.save(tmp_path / "v.npy", np.zeros(3))
    with pytest.raises(ValueError, match="2-D numeric"):
        load_relevancy(tmp_path / "v.npy")
    with pytest.raises(FileNotFoundError, match="--relevancy: no relevancy file"):
        load_relevancy(tmp_path / "none.pkl")
    (tmp_path / "s.csv").write_text("narration_id,narration\nP01_1,open door\nP01_2,take cup\n")
    assert load_sentences(tmp_path / "s.csv") == ["open door", "take cup"]


def test_mir_metrics_on_normalised_similarity():
    gen = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    rel = (torch.rand(6, 5, generator=gen) * 4).floor() / 3  # graded, some exactly 1
    sim = (
        torch.nn.functional.normalize(video, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    )
    assert mir_metrics(video * 3, text, rel) == multi_instance_retrieval(sim, rel)
    with pytest.raises(ValueError, match=r"--relevancy is \(5, 5\).*6 clips and 5 captions"):
        mir_metrics(video, text, rel[:5])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_eval_mir_end_to_end(tmp_path, monkeypatch, capsys):
    """~1 min: a synthetic video set; captions from the shards == the same as --sentences."""
    from mmpt.cli import build_cli, main
    from mmpt.synth import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic("video-text", "data/video", train_samples=8, image_size=32)
    Path("mir").mkdir()
    captions = []
    with TarWriter("mir/shard-000000.tar") as w:
        for i, sample in enumerate(
            wds.WebDataset("data/video/val/shard-000000.tar", shardshuffle=False)
        ):
            if i == 10:
                break
            captions.append(sample["txt"].decode())
            w.write({k: v for k, v in sample.items() if k in ("__key__", "json", "mp4", "txt")})
    Path("sentences.txt").write_text("\n".join(captions) + "\n")
    rel = np.eye(10) + 0.5 * np.roll(np.eye(10), 1, axis=1)
    np.save("rel.npy", rel)
    cfg = str(ROOT / "configs" / "quickstart" / "egovlp_tiny.yaml")
    torch.manual_seed(0)
    torch.save(
        {
            "state_dict": build_cli(
                ["-c", cfg, "--trainer.logger=false"], run=False
            ).model.state_dict()
        },
        "m.ckpt",
    )
    base = ["eval", "mir", "-c", cfg, "--ckpt", "m.ckpt", "--data", "mir", "--relevancy", "rel.npy"]
    base += ["--device", "cpu", "--text-key", "txt"]
    assert main([*base, "--out", "a"]) == 0
    assert main([*base, "--out", "b", "--sentences", "sentences.txt"]) == 0
    a, b = (json.loads(Path(d, "mir.json").read_text())["metrics"] for d in "ab")
    assert set(a) == {f"{d}/{m}" for d in ("v2t", "t2v", "avg") for m in ("mAP", "nDCG")}
    assert a == pytest.approx(b, abs=1e-6) and Path("a/mir.png").is_file()
    np.save("bad.npy", rel[:9])
    assert main([*base[:-6], "--relevancy", "bad.npy", *base[-4:], "--out", "c"]) == 2
    assert "(9, 10)" in capsys.readouterr().err
