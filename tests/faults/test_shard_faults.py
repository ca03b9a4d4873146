"""Shards that cannot be read: one counted fault per shard and epoch, with the samples lost.

Each bad shard of a set of 8 x 5 samples (not a tar, truncated mid-member, empty, permission
denied, missing) is named with what is wrong with it, counted once per epoch however many
workers, passes or members fail, and its lost samples (from ``index.json``) are reported; every
good sample is still read exactly once. ``max_skipped_fraction`` stops the run with the list of
bad files, in the worker, over workers in the main process, and at start-up without an index.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.shard_datamodule import ShardDataModule
from mmpt.datamodules.shard_faults import ShardFault, header_problem
from mmpt.datamodules.skip_log import SkipLog
from mmpt.datamodules.stages import DataError
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.user_errors import run_reporting_errors
from tests.helpers import write_shards

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore:Total length of .list. across ranks is zero"),
]

ALL_KEYS = {f"{i:06d}" for i in range(40)}


class Keys:
    """A minimal batch: the keys of its samples and the skips the stream adds."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = keys, 0


def complete(sample: dict[str, Any]) -> str:
    """The sample's key, if it has its image and caption (a truncated one may not)."""
    if "jpg" not in sample or "txt" not in sample:
        raise KeyError(f"incomplete sample {sample['__key__']}")
    return sample["__key__"]


def stream_of(
    urls: str, limit: float = 1.0, partial: bool = True, bs: int = 4, workers: int = 0
) -> ShardStream:
    cfg = StreamConfig(urls=urls, shuffle_buffer=0, shuffle_shards=False)
    stream = ShardStream(
        cfg.sources("data.train"), cfg, complete, Keys, batch_size=bs, partial=partial,
        num_workers=workers,
    )  # fmt: skip
    stream.max_skipped_fraction = limit
    return stream


def faults_of(batches: list[Keys]) -> list[ShardFault]:
    return [f for b in batches for f in b.shard_faults]


def truncate_mid_member(path: Path, member: str = "000012.jpg") -> None:
    """Cut the shard 100 bytes into ``member``'s data (shard 2 holds samples 10..14)."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(member.encode()) + 512 + 100])


def break_shard(shards: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make shard 2 bad in the given way; returns it."""
    bad = shards / "shard-000002.tar"
    if kind == "not_a_tar":
        bad.write_bytes(b"<html>403 Forbidden</html>\n" * 100)
    elif kind == "truncated":  # sample 12 keeps its image and loses its caption
        truncate_mid_member(bad, "000012.json")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "missing":
        bad.unlink()
    elif kind == "permission":  # tests run as root, where chmod 000 does not deny reads
        import mmpt.datamodules.stages as stages

        real = stages.open_url

        def denied(url: str) -> Any:
            if url == str(bad):
                raise PermissionError(13, "Permission denied", url)
            return real(url)

        monkeypatch.setattr(stages, "open_url", denied)
    return bad


CASES = {
    "not_a_tar": ("not a tar archive (invalid header)", 0),
    "truncated": ("truncated after 3 samples", 3),  # 10, 11 and the cut 12 (skipped on decode)
    "empty": ("empty file (0 bytes)", 0),
    "permission": ("permission denied", 0),
    "missing": ("missing (no such file)", 0),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_bad_shard_is_one_fault_with_its_lost_samples(
    shards: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = stream_of(str(shards))  # resolved while every shard is there
    bad = break_shard(shards, kind, monkeypatch)
    reason, read = CASES[kind]
    batches = list(stream)
    faults = faults_of(batches)
    assert len(faults) == 1
    fault = faults[0]
    assert (fault.url, fault.read, fault.expected, fault.lost) == (str(bad), read, 5, 5 - read)
    assert fault.reason.startswith(reason), fault.reason
    assert fault.describe().startswith(f"{bad}: {reason}")
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(set(keys))  # nothing twice
    kept = {"000010", "000011"} if kind == "truncated" else set()
    assert set(keys) == ALL_KEYS - {f"{i:06d}" for i in range(10, 15)} | kept  # nothing else lost
    skipped = sum(b.skipped for b in batches)
    # every expected sample is read or counted: the lost ones, and the cut one on decode
    assert len(keys) + skipped == 40
    assert skipped == fault.lost + (1 if kind == "truncated" else 0)


def test_a_shard_shorter_than_its_index_says_loses_the_rest(shards: Path) -> None:
    """A tar cut exactly between members ends without an error: the index knows it is short."""
    bad = shards / "shard-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"000012.jpg")])  # samples 10 and 11, then the end
    batches = list(stream_of(str(shards)))
    (fault,) = faults_of(batches)
    assert fault.reason == "ends after 2 of the 5 samples its index lists"
    assert (fault.read, fault.lost) == (2, 3)
    assert sum(b.skipped for b in batches) == 3
    assert sum(len(b.keys) for b in batches) == 37


def test_garbage_after_good_samples_is_caught_by_the_index(shards: Path) -> None:
    """tarfile takes a bad header after the first member for the end of the archive (no error):
    only the index's count shows that the shard lost its last samples."""
    bad = shards / "shard-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"000012.jpg")] + b"\x07" * 2048)  # 10 and 11, then junk
    (fault,) = faults_of(list(stream_of(str(shards))))
    assert (fault.reason, fault.lost) == ("ends after 2 of the 5 samples its index lists", 3)


def test_five_bad_files_are_five_faults_per_epoch_over_workers_and_top_ups(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: 5 bad files gave 7 and 8 skips (a truncated tar counted twice, top-up
    passes re-reading bad shards). Training mode, 2 workers, 2 epochs: 5 faults an epoch."""
    stream = stream_of(str(shards), partial=False, bs=5, workers=2)
    bad = [shards / f"shard-{i:06d}.tar" for i in (1, 2, 3, 5, 6)]
    bad[0].write_bytes(b"not a tar" * 200)
    truncate_mid_member(bad[1])
    bad[2].write_bytes(b"")
    bad[3].unlink()
    bad[4].write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    loader = make_loader(stream, num_workers=2)
    skip_log = SkipLog()
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 8  # the quota is kept by topping up good shards
        new = [f for b in batches for f in skip_log.record("train", epoch, b)]
        assert sorted(f.url for f in new) == sorted(map(str, bad))  # each once, this epoch
        assert sorted(f.url for f in faults_of(batches)) == sorted(map(str, bad))  # 1 worker each
        assert sum(f.lost for f in new) == 25 - 2  # the truncated one gave 10 and 11
    assert [stream.shards_for(s) for s in _slots(2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def _slots(workers: int) -> list:
    from mmpt.datamodules.stages import Slot

    return [Slot(0, 1, w, workers) for w in range(workers)]


def test_over_the_limit_the_worker_stops_with_the_bad_files(shards: Path) -> None:
    stream = stream_of(str(shards), limit=0.01)
    bad = shards / "shard-000004.tar"
    bad.write_bytes(b"")
    with pytest.raises(DataError) as err:
        list(stream)
    message = str(err.value)
    assert f"{bad}: empty file (0 bytes) (lost 5 samples)" in message
    assert "losing 5 of 40 samples (12.5%), over max_skipped_fraction=0.01" in message
    assert "max_skipped_fraction (1.0 never stops)" in message


def test_the_limit_allows_what_it_allows(tmp_path: Path) -> None:
    """1 of 20 shards of 5 = 5% lost: over 0.01, within 0.05."""
    shards = write_shards(tmp_path / "s", n=100, per_shard=5)
    (shards / "shard-000007.tar").write_bytes(b"junk" * 300)
    assert sum(len(b.keys) for b in stream_of(str(shards), limit=0.05)) == 95
    with pytest.raises(DataError, match="shard-000007.tar: not a tar archive"):
        list(stream_of(str(shards), limit=0.01))


def test_the_main_process_sums_the_workers_against_the_limit(shards: Path) -> None:
    """Two workers each lose 5 of the rank's 40 samples (12.5%, under 0.2); together 25%."""
    stream = stream_of(str(shards), limit=0.2, workers=2)
    for i in (0, 1):  # one shard of each worker
        (shards / f"shard-{i:06d}.tar").write_bytes(b"nope" * 300)
    skip_log = SkipLog()
    with pytest.raises(DataError, match=r"2 shard\(s\) could not be read, losing 10 of 40"):
        for batch in make_loader(stream, num_workers=2):
            skip_log.record("train", 0, batch, stream.skip_budget())


class KeyData(ShardDataModule):
    """A shard datamodule whose batches are the sample keys."""

    def __init__(self, urls: str, max_skipped_fraction: float) -> None:
        cfg = StreamConfig(urls=urls, shuffle_buffer=0)
        super().__init__(cfg, None, None, 4, None, 0, 0, None, None, None, max_skipped_fraction)

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        return ShardStream(config.sources(field), config, complete, Keys, batch_size=4)

    def normalize(self, batch: Any) -> Any:
        return batch


def test_without_an_index_startup_says_what_is_wrong_with_the_file(
    shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No index.json: the run length is unknown, but the error is the file's."""
    (shards / "index.json").unlink()
    bad = shards / "shard-000003.tar"
    bad.write_bytes(b"PK\x03\x04 a zip file, not a tar" * 40)

    def fit() -> int:
        KeyData(str(shards), 0.01).setup("fit")
        return 0

    assert run_reporting_errors(fit) == 2  # the CLI's `error:` line (exit 2)
    with pytest.raises(DataError) as err:
        fit()
    assert f"{bad}: not a tar archive" in str(err.value)
    assert "1 shard(s) could not be read, losing 1 of 8 shards (12.5%)" in str(err.value)
    caplog.set_level(logging.WARNING, logger="mmpt.data")
    KeyData(str(shards), 1.0).setup("fit")  # allowed: named at start-up, counted when read
    assert f"data.train: shard {bad}: not a tar archive" in caplog.text


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file (0 bytes)"),
        (b"short", "not a tar archive (5 bytes, less than one tar block)"),
        (b"x" * 2048, "not a tar archive (invalid header)"),
        (None, None),  # a real shard
    ],
)
def test_header_problem(shards: Path, content: bytes | None, problem: str | None) -> None:
    path = shards / "shard-000000.tar"
    if content is not None:
        path.write_bytes(content)
    assert header_problem(str(path)) == problem


def test_header_problem_permission_denied(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmpt.datamodules.shard_faults as shard_faults

    def denied(path: str, mode: str = "r") -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(shard_faults, "open", denied, raising=False)
    assert header_problem(str(shards / "shard-000000.tar")) == "permission denied"


@pytest.mark.slow
def test_fit_logs_the_shard_metrics_and_stops_over_the_limit(shards: Path, tmp_path: Path) -> None:
    """A tiny contrastive fit: data/skipped, data/skipped_shards, data/lost_samples."""
    from mmpt.datamodules.image_text import ImageTextDataModule
    from mmpt.models.contrastive import ContrastiveModule
    from mmpt.models.encoders import OpenCLIPTextTower, TimmVisionTower
    from tests.helpers import TINY_TEXT, TINY_VISION

    (shards / "shard-000005.tar").write_bytes(b"not a tar" * 100)

    def run(limit: float) -> L.Trainer:
        torch.manual_seed(0)
        model = ContrastiveModule(
            TimmVisionTower(**TINY_VISION["init_args"]), OpenCLIPTextTower(**TINY_TEXT["init_args"])
        )
        dm = ImageTextDataModule(
            train=StreamConfig(urls=str(shards), shuffle_buffer=0), batch_size=5, num_workers=0,
            preprocess=model.preprocess, max_skipped_fraction=limit,
        )  # fmt: skip
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
        return trainer

    trainer = run(1.0)
    assert trainer.global_step == 8
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
    assert got == {"data/skipped": 5.0, "data/skipped_shards": 1.0, "data/lost_samples": 5.0}
    with pytest.raises(DataError, match="shard-000005.tar: not a tar archive"):
        run(0.01)


def test_counts_stay_per_epoch(shards: Path) -> None:
    """The same bad shard is a new fault in the next epoch (once per epoch, not once ever)."""
    (shards / "shard-000006.tar").write_bytes(b"")
    stream = stream_of(str(shards))
    per_epoch = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        per_epoch.append(Counter(f.url for f in faults_of(list(stream))))
    assert per_epoch == [Counter({str(shards / "shard-000006.tar"): 1})] * 3


def test_resampled_workers_reporting_the_same_shard_count_it_once(tmp_path: Path) -> None:
    """Resampled mode draws shards with replacement in every worker: the main process keeps
    one fault per shard and epoch, however many workers report it."""
    shards = write_shards(tmp_path / "s", n=10, per_shard=5)
    bad = shards / "shard-000001.tar"
    bad.write_bytes(b"not a tar" * 100)
    cfg = StreamConfig(urls=str(shards), resampled=True, epoch_samples=40, shuffle_buffer=0)
    stream = ShardStream(cfg.sources("data.train"), cfg, complete, Keys, batch_size=4)
    stream.max_skipped_fraction = 1.0
    batches = list(make_loader(stream, num_workers=2))
    assert [f.url for f in faults_of(batches)] == [str(bad)] * 2  # each worker found it once
    skip_log = SkipLog()
    assert [f.url for b in batches for f in skip_log.record("train", 0, b)] == [str(bad)]


def test_a_worker_whose_shards_are_all_bad_still_reports_them(tmp_path: Path) -> None:
    """The issue's case: 2 shards, the second not a tar, 2 workers. Its worker makes no batch;
    its report reaches the main process (added to the next batch, or after the last one)."""
    shards = write_shards(tmp_path / "s", n=12, per_shard=6)
    bad = shards / "shard-000001.tar"
    bad.write_bytes(b"<html>not a tar</html>" * 50)
    stream = stream_of(str(shards), partial=False, bs=1, workers=2)
    reported: list[Any] = []
    loader = make_loader(stream, 2, on_report=lambda s, r: reported.append((s, r)))
    batches = list(loader)
    assert len(batches) == 6  # worker 0's quota; worker 1 had nothing to read
    carriers = batches + [r for _, r in reported]
    faults = [f for c in carriers for f in c.shard_faults]
    assert [(f.url, f.lost) for f in faults] == [(str(bad), 6)]
    assert sum(c.skipped for c in carriers) == 6
    assert all(s is stream for s, _ in reported)


def test_reports_are_added_to_the_next_batch_or_handed_over() -> None:
    from mmpt.datamodules.loader import fold_reports
    from mmpt.datamodules.shard_faults import SkipReport

    def batch(*keys: str) -> Keys:
        out = Keys(list(keys))
        out.skip_reasons, out.shard_faults = {"E: x": [1, "e.g."]}, []
        return out

    fault = ShardFault("a.tar", "empty file (0 bytes)", 0, 5)
    items = [
        batch("k0"),
        SkipReport(5, {}, [fault]),
        SkipReport(2, {"E: x": [2, "first"]}, []),
        batch("k1"),
        SkipReport(1, {"E: y": [1, "y"]}, []),
    ]
    handed: list[Any] = []
    out = list(fold_reports(iter(items), None, lambda s, r: handed.append(r)))  # type: ignore[arg-type]
    assert [b.keys for b in out] == [["k0"], ["k1"]]
    assert (out[1].skipped, out[1].skip_reasons, out[1].shard_faults) == (
        7, {"E: x": [3, "e.g."]}, [fault]
    )  # fmt: skip
    assert [(r.skipped, r.skip_reasons) for r in handed] == [(1, {"E: y": [1, "y"]})]


def test_the_datamodule_checks_a_handed_over_report_against_the_limit(shards: Path) -> None:
    from mmpt.datamodules.shard_faults import SkipReport

    dm = KeyData(str(shards), 0.01)
    dm.setup("fit")
    report = SkipReport(5, {}, [ShardFault(str(shards / "shard-000003.tar"), "empty file", 0, 5)])
    with pytest.raises(DataError, match="shard-000003.tar: empty file"):
        dm.train_dataloader().on_report(dm.train_stream, report)
