"""``mmpt data score``: CLIP scores as a Lightning predict job; resume; 1 and 2 ranks agree."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mmpt.cli import main
from mmpt.data_cli import main as data_main
from tests.helpers import write_shards
from tests.test_cli import tiny_fit_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP trained 2 steps, and 5 shards of 4 samples to score."""
    tmp = tmp_path_factory.mktemp("score")
    train = write_shards(tmp / "train", n=16, per_shard=8)
    raw = write_shards(tmp / "raw", n=20, per_shard=4, prefix="raw")
    cfg = tiny_fit_config(train, tmp / "run")
    cfg["trainer"] |= {"max_steps": 2, "val_check_interval": None, "limit_val_batches": 0}
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]
    cfg["data"]["init_args"]["val"] = None
    path = tmp / "clip.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main(["fit", "-c", str(path)]) == 0
    return {"tmp": tmp, "cfg": path, "ckpt": tmp / "run" / "checkpoints" / "last.ckpt", "raw": raw}


def _score(clip: dict, out: Path, *extra: str) -> list[dict]:
    argv = ["score", "-c", str(clip["cfg"]), "--ckpt", str(clip["ckpt"]), "--from"]
    argv += [str(clip["raw"]), "--out", str(out), "--batch-size", "3"]
    assert data_main([*argv, "--accelerator", "cpu", "--text-key", "txt", *extra]) == 0
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: (r["shard"], r["key"]))


def _reference(clip: dict) -> dict[str, float]:
    """The model's own cosine of each image and its caption, one sample at a time."""
    from mmpt.batch import ImageTextBatch
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.transforms import ImageReader
    from mmpt.models.module import load_checkpoint
    from mmpt.run_config import build_from_config

    cli = build_from_config([str(clip["cfg"])], [])
    model = cli.model.eval()
    load_checkpoint(model, str(clip["ckpt"]))
    pre = model.preprocess
    read = ImageReader(pre.image, False, None, pre.image.size, flip=False)
    out = {}
    urls = sorted(str(p) for p in clip["raw"].glob("*.tar"))
    for sample in read_shards(urls, SkipCounter()):
        batch = ImageTextBatch(
            images=read(sample)[None],
            text_tokens=pre.tokenizer([sample["txt"].decode()]),
            text_to_image=torch.zeros(1, dtype=torch.long),
        )
        batch = cli.datamodule.normalize(batch)
        with torch.no_grad():
            img, txt = model(batch)
        out[sample["__key__"]] = float((img * txt).sum())
    return out


def test_scores_equal_the_models_cosine(clip: dict, capsys) -> None:
    rows = _score(clip, clip["tmp"] / "scores", "--num-workers", "2")  # 2 workers split shards
    rate = r"rank 0 scored 20 samples \([\d.]+ samples/s, [\d.]+ after the first batch\)"
    assert re.search(rate, capsys.readouterr().out)
    assert len(rows) == 20 and len({(r["shard"], r["key"]) for r in rows}) == 20
    assert (
        sorted(p.name for p in (clip["tmp"] / "scores").glob("*.parquet"))[0]
        == "raw-000000.parquet"
    )
    ref = _reference(clip)
    for r in rows:
        assert r["clip"] == pytest.approx(ref[r["key"]], abs=1e-6), r
        assert r["shard"] == f"raw-{int(r['key']) // 4:06d}.tar"


def test_resume_scores_only_the_missing_shards(clip: dict, capsys) -> None:
    out = clip["tmp"] / "resume"
    full = _score(clip, out, "--num-workers", "0")
    (out / "raw-000002.parquet").unlink()  # a job killed before this shard was written
    stamp = (out / "raw-000000.parquet").stat().st_mtime_ns
    again = _score(clip, out, "--num-workers", "0")
    assert [(r["shard"], r["key"]) for r in again] == [(r["shard"], r["key"]) for r in full]
    assert [r["clip"] for r in again] == pytest.approx([r["clip"] for r in full], abs=1e-6)
    assert (out / "raw-000000.parquet").stat().st_mtime_ns == stamp  # not scored again
    assert "rank 0 scored 4 samples" in capsys.readouterr().out
    _score(clip, out, "--num-workers", "0")
    assert "already scored" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_under_torchrun_give_the_same_scores(clip: dict, ranks: int) -> None:
    """2 and 4 processes (torchrun, gloo): every shard scored once, the same numbers as one.

    5 shards over 4 ranks: rank 0 reads two, the others one each (uneven ranks finish apart).
    """
    one = _score(clip, clip["tmp"] / f"one{ranks}", "--num-workers", "0")
    out = clip["tmp"] / f"ranks{ranks}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    cmd += ["--master-port", str(_free_port()), "-m", "mmpt.cli", "data", "score"]
    cmd += ["-c", str(clip["cfg"]), "--ckpt", str(clip["ckpt"]), "--from", str(clip["raw"])]
    cmd += ["--out", str(out), "--num-workers", "1", "--batch-size", "3", "--accelerator", "cpu"]
    cmd += ["--text-key", "txt"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, cwd=clip["tmp"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = sorted(pq.read_table(out).to_pylist(), key=lambda r: (r["shard"], r["key"]))
    assert [(r["shard"], r["key"]) for r in got] == [(r["shard"], r["key"]) for r in one]
    for a, b in zip(one, got, strict=True):
        assert a["clip"] == pytest.approx(b["clip"], abs=1e-6)
    for rank in range(ranks):
        want = 4 * len(range(rank, 5, ranks))  # shard i is rank i % ranks's, 4 samples each
        assert f"rank {rank} scored {want} samples" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_two_nodes_under_torchrun_give_the_same_scores(clip: dict) -> None:
    """Two torchrun "nodes" (``--nnodes 2``, node ranks 0/1, localhost rendezvous, gloo), one
    process each: every shard scored once, by rank ``i % 2``, the same numbers as one rank."""
    one = _score(clip, clip["tmp"] / "one-nodes", "--num-workers", "0")
    out, port = clip["tmp"] / "nodes", str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node-rank", str(node), "--nproc-per-node", "1"]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", port]
        cmd += ["-m", "mmpt.cli", "data", "score", "-c", str(clip["cfg"])]
        cmd += ["--ckpt", str(clip["ckpt"]), "--from", str(clip["raw"]), "--out", str(out)]
        cmd += ["--num-workers", "1", "--batch-size", "3", "--accelerator", "cpu"]
        cmd += ["--text-key", "txt"]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=clip["tmp"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    got = sorted(pq.read_table(out).to_pylist(), key=lambda r: (r["shard"], r["key"]))
    assert [(r["shard"], r["key"]) for r in got] == [(r["shard"], r["key"]) for r in one]
    for a, b in zip(one, got, strict=True):
        assert a["clip"] == pytest.approx(b["clip"], abs=1e-6)
    assert "rank 0 scored 12 samples" in logs[0], logs[0][-2000:]  # shards 0, 2, 4
    assert "rank 1 scored 8 samples" in logs[1], logs[1][-2000:]  # shards 1, 3
