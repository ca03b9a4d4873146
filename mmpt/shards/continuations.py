"""BLSP step 1: an LLM continues every transcript of audio shards, written as ``json:continuation``.

BLSP (Wang et al. 2023, "BLSP: Bootstrapping Language-Speech Pre-training via Behavior
Alignment of Continuation Writing") trains a speech adapter so a frozen LLM continues a clip
as it continues the clip's transcript. The targets are the LLM's own continuations, made once
beforehand with the prompt :data:`BLSP_PROMPT` (greedy, 64 new tokens in the paper's
``data_process/asr_text_generation.py``).

Each input shard gives one output shard of the same name: every member copied byte for byte,
the ``json`` member with the continuation field added (created when the sample had none).
A shard is written to a temporary name and renamed when complete, with its counts in
``.continue/<name>.json``, so a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpt.io import atomic_write_text
from mmpt.shards.index import ShardIndex, ShardInfo

if TYPE_CHECKING:
    from mmpt.text_generate import TextLLM

log = logging.getLogger("mmpt.continue")

#: BLSP's continuation instruction; ``{text}`` is the transcript.
BLSP_PROMPT = (
    "Continue the following text in a coherent and engaging style with less than 40 words. {text}"
)
#: Folder (inside ``out``) with one counts file per finished shard.
STATE_DIR = ".continue"


@dataclass
class ContinueReport:
    """What a ``continue`` run wrote.

    Attributes:
        out: The output folder.
        written: Samples written (over all shards, resumed ones included).
        failed: Samples left out, by reason (``unreadable``, ``no_transcript``, ``bad_json``,
            ``empty_continuation``).
        shards: Output shards written by this run.
        resumed: Output shards found complete and kept.
        replaced: Samples whose json already held the field (overwritten).
    """

    out: str
    written: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    replaced: int = 0

    @property
    def total_failed(self) -> int:
        """Samples left out over all reasons."""
        return sum(self.failed.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``total_failed``."""
        return {**asdict(self), "total_failed": self.total_failed}


@dataclass
class ContinueSettings:
    """How the continuations are made (recorded in ``index.json`` ``meta.continuation``).

    Attributes:
        prompt_template: User message; ``{text}`` is replaced by the transcript.
        transcript_key: Transcript field(s), ``;``-separated (``json:transcript;txt``).
        field: json field the continuation is written to.
        max_new_tokens: Most tokens per continuation.
        batch_size: Transcripts per ``generate`` call.
        temperature: 0 is greedy (BLSP); > 0 samples.
        top_p: Nucleus mass when sampling.
        seed: Seeds the sampling RNG per shard (shard i: ``seed + i``), so a resumed run
            writes what an uninterrupted one does.
    """

    prompt_template: str = BLSP_PROMPT
    transcript_key: str = "json:transcript;txt"
    field: str = "continuation"
    max_new_tokens: int = 64
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raise a clear error for a bad setting (names the flag)."""
        if "{text}" not in self.prompt_template:
            raise ValueError(
                f"--prompt-template must hold {{text}} (the transcript), got "
                f"{self.prompt_template!r}"
            )
        if min(self.max_new_tokens, self.batch_size) < 1:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        if not self.field or "." in self.field:
            raise ValueError(f"--field must be a plain json key, got {self.field!r}")


def _out_names(urls: list[str]) -> list[str]:
    names = [posixpath.basename(u.rstrip("/").split("::")[-1]) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("--from: two shards share a file name; give one folder of shards")
    return [n if n.endswith(".tar") else n + ".tar" for n in names]


def _raw_samples(url: str, failed: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard; unreadable ones counted and skipped."""
    import webdataset as wds

    def skip(exn: BaseException) -> bool:
        failed["unreadable"] = failed.get("unreadable", 0) + 1
        log.warning("%s: skipped an unreadable sample: %s", url, exn)
        return True

    yield from wds.WebDataset(url, shardshuffle=False, handler=skip, empty_check=False)


def _with_continuation(sample: dict[str, Any], key: str, text: str) -> tuple[dict[str, Any], bool]:
    """The sample's members (bytes as read) with ``json[key] = text``; and whether it replaced."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    replaced = key in meta
    meta[key] = text
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return {"__key__": sample["__key__"], **members}, replaced


def _transcript(sample: dict[str, Any], spec: str) -> tuple[str | None, str | None]:
    """(transcript, None) or (None, failure reason)."""
    from mmpt.datamodules.decode import MissingField, read_field

    if "json" in sample:
        try:
            if not isinstance(json.loads(sample["json"]), dict):
                return None, "bad_json"
        except ValueError:
            return None, "bad_json"
    try:
        text = str(read_field(sample, spec)).strip()
    except MissingField:
        return None, "no_transcript"
    return (text, None) if text else (None, "no_transcript")


def continue_shard(
    llm: TextLLM,
    url: str,
    out_path: Path,
    settings: ContinueSettings,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``out_path``: the shard at ``url`` with continuations; returns its counts.

    Returns:
        ``{"samples": written, "failed": {reason: n}, "replaced": n, "keys": [...]}``.
    """
    import webdataset as wds

    failed: dict[str, int] = {}
    counts = {"samples": 0, "replaced": 0}
    keys: set[str] = set()
    tmp = out_path.with_name(out_path.name + ".tmp")

    def flush(batch: list[tuple[dict[str, Any], str]], writer: Any) -> None:
        messages = [settings.prompt_template.replace("{text}", t) for _, t in batch]
        texts = llm.generate(
            messages, settings.max_new_tokens, settings.temperature, settings.top_p
        )
        for (sample, _), text in zip(batch, texts, strict=True):
            if not text:
                failed["empty_continuation"] = failed.get("empty_continuation", 0) + 1
                continue
            member, replaced = _with_continuation(sample, settings.field, text)
            counts["replaced"] += replaced
            keys.update(k for k in member if not k.startswith("__"))
            writer.write(member)
            counts["samples"] += 1
        if on_batch is not None:
            on_batch(len(batch))

    try:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0)
            batch: list[tuple[dict[str, Any], str]] = []
            for sample in _raw_samples(url, failed):
                text, problem = _transcript(sample, settings.transcript_key)
                if problem is not None:
                    failed[problem] = failed.get(problem, 0) + 1
                    log.warning("%s: %s: %s", url, sample.get("__key__", "?"), problem)
                    continue
                batch.append((sample, text))
                if len(batch) == settings.batch_size:
                    flush(batch, writer)
                    batch = []
            if batch:
                flush(batch, writer)
            writer.close()
        stats = {**counts, "failed": failed, "keys": sorted(keys)}
        state = out_path.parent / STATE_DIR / (out_path.name + ".json")
        atomic_write_text(state, json.dumps(stats) + "\n")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def continue_shards(
    llm: TextLLM,
    source: str,
    out: str | Path,
    settings: ContinueSettings,
    progress: bool = True,
) -> ContinueReport:
    """Continue every transcript of ``source``'s shards into ``out`` (resumable).

    Args:
        llm: The LLM that writes the continuations.
        source: ``--from``: a shard folder, index file, pattern or URL.
        out: ``--out``: the output folder (created); complete shards there are kept.
        settings: Prompt, fields and decoding.
        progress: Show a progress bar over samples.

    Returns:
        The report; ``out/index.json`` holds the shard counts and ``meta.continuation`` the
        settings, the LLM and the failure counts.

    Raises:
        ValueError: A bad setting, or ``out`` is the source folder.
        FileNotFoundError: ``source`` matches no shard.
    """
    import torch

    from mmpt.datamodules.urls import resolve_source
    from mmpt.shards.build import build_progress

    settings.check()
    resolved = resolve_source(source, "--from")
    out = Path(out)
    if Path(source).resolve() == out.resolve():
        raise ValueError("--out must differ from --from (shards are written next to nothing)")
    out.mkdir(parents=True, exist_ok=True)
    names = _out_names(resolved.urls)
    report = ContinueReport(str(out))
    keys: set[str] = set()
    total = sum(resolved.counts) if resolved.counts else None
    with build_progress(progress, total) as bar:
        for i, (url, name) in enumerate(zip(resolved.urls, names, strict=True)):
            path, state = out / name, out / STATE_DIR / (name + ".json")
            advance = (lambda n: bar.advance(bar.task_ids[0], n)) if bar else None
            if path.is_file() and state.is_file():
                stats = json.loads(state.read_text())
                report.resumed.append(str(path))
                if advance is not None:
                    advance(stats["samples"] + sum(stats["failed"].values()))
            else:
                cuda = [llm.device.index or 0] if llm.device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(settings.seed + i)  # seeds the CUDA generators too
                    stats = continue_shard(llm, url, path, settings, advance)
                report.shards.append(str(path))
            report.written += stats["samples"]
            report.replaced += stats["replaced"]
            for reason, n in stats["failed"].items():
                report.failed[reason] = report.failed.get(reason, 0) + n
            keys.update(stats["keys"])
    _write_index(out, names, source, resolved.meta, llm, settings, report, keys)
    return report


def _write_index(
    out: Path,
    names: list[str],
    source: str,
    meta: dict[str, Any],
    llm: TextLLM,
    settings: ContinueSettings,
    report: ContinueReport,
    keys: set[str],
) -> None:
    """``out/index.json``: the source index's modalities and meta, plus ``meta.continuation``."""
    from mmpt.shards.index import load_index

    src_index = load_index(source) if Path(source).exists() else None
    counts = [json.loads((out / STATE_DIR / (n + ".json")).read_text())["samples"] for n in names]
    index = ShardIndex(
        shards=[ShardInfo(n, c) for n, c in zip(names, counts, strict=True)],
        keys=sorted(keys),
        modalities=list(src_index.modalities) if src_index else ["audio", "text"],
        meta={
            **(meta or {}),
            "continuation": {
                **asdict(settings),
                "llm": llm.folder,
                "chat_template": llm.template_source,
                "source": source,
                "failed": report.failed,
                "paper": "BLSP, Wang et al. 2023",
            },
        },
    )
    index.save(out)


__all__ = ["BLSP_PROMPT", "ContinueReport", "ContinueSettings", "continue_shard", "continue_shards"]
