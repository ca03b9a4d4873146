"""Multi-node rehearsal on one machine: two torchrun "nodes" (``--nnodes 2``, node ranks 0/1,
localhost rendezvous, gloo) run the README's launcher, ``scripts/torchrun_fit.sh``.

Checked: every training sample is read by exactly one node/rank/worker in an epoch; the ranks
stay in lockstep; and a kill of one node followed by a resume of both (``--ckpt_path``) trains
exactly the batches the uninterrupted run trains: nothing lost, nothing repeated.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_shards
from tests.test_cli import tiny_fit_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, shards: Path, logs: Path, tag: str, kill_at: int = -1) -> Path:
    cfg = tiny_fit_config(shards, tmp / "run")
    cfg["trainer"] |= {"max_steps": -1, "max_epochs": 1, "limit_val_batches": 0}
    cfg["trainer"].pop("val_check_interval")
    probe = {"out": str(logs), "tag": tag, "kill_rank": 1, "kill_at": kill_at}
    ckpt = cfg["trainer"]["callbacks"][0]["init_args"]
    ckpt |= {"every_n_train_steps": 2, "save_top_k": 0, "save_last": True}
    cfg["trainer"]["callbacks"] = [
        cfg["trainer"]["callbacks"][0],
        {"class_path": "tests.rehearsal_probe.KeysLog", "init_args": probe},
    ]
    cfg["data"]["init_args"] |= {"val": None, "batch_size": 3, "num_workers": 2}
    cfg["data"]["init_args"]["train"] = {"urls": str(shards), "shuffle_buffer": 4}
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _two_nodes(config: Path, cwd: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """The README's torchrun launcher on node ranks 0 and 1 at once, on CPU."""
    port = str(_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env |= {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GPUS_PER_NODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = ["bash", str(ROOT / "scripts" / "torchrun_fit.sh"), "-c", str(config)]
    cmd += ["--trainer.accelerator", "cpu", *extra]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env | {"NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, ""))
    return done


def _log(logs: Path, tag: str, rank: int) -> list[dict]:
    path = logs / f"{tag}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 shards of 6 samples: 4 shards per node, 2 per worker; 8 steps of 3 per rank."""
    return write_shards(tmp_path_factory.mktemp("mn") / "shards", n=48, per_shard=6)


def test_two_nodes_read_every_sample_once_in_lockstep(shards: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    runs = _two_nodes(_config(tmp_path, shards, logs, "full"), tmp_path)
    for r in runs:
        assert r.returncode == 0, r.stdout[-4000:]
    by_rank = [_log(logs, "full", rank) for rank in (0, 1)]
    keys = [k for rows in by_rank for row in rows for k in row["keys"]]
    assert len(keys) == len(set(keys)) == 48  # every sample once, over nodes/ranks/workers
    assert [row["step"] for row in by_rank[0]] == [row["step"] for row in by_rank[1]]
    assert len(by_rank[0]) == 8
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_kill_one_node_then_resume_both_loses_and_repeats_nothing(
    shards: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    full = tmp_path / "full"
    full.mkdir()
    runs = _two_nodes(_config(full, shards, logs, "ref"), full)
    assert all(r.returncode == 0 for r in runs), runs[0].stdout[-3000:]

    work = tmp_path / "killed"
    work.mkdir()
    first = _two_nodes(_config(work, shards, logs, "first", kill_at=5), work)
    assert first[1].returncode != 0  # node 1 was killed at step 5 (last checkpoint: step 4)
    assert first[0].returncode != 0  # node 0 lost its peer
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    second = _two_nodes(_config(work, shards, logs, "second"), work, "--ckpt_path", str(ckpt))
    for r in second:
        assert r.returncode == 0, r.stdout[-4000:]
    for rank in (0, 1):
        ref = [row["keys"] for row in _log(logs, "ref", rank)]
        before = [row["keys"] for row in _log(logs, "first", rank) if row["step"] <= 4]
        after = [row["keys"] for row in _log(logs, "second", rank)]
        assert before + after == ref, f"rank {rank}"
