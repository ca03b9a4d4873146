"""``mmpt data index`` benchmark: header counting vs iterating the shards with webdataset.

Writes ``--shards`` small img2dataset-layout shards (``--per-shard`` samples of jpg + txt + json,
webdataset's ``TarWriter``), then times, on the first 25%, 50% and 100% of them:

1. ``mmpt data index`` (tar headers, seeking past each member's data), with 1 and
   ``--workers`` processes;
2. the baseline a user would otherwise run: ``sum(1 for _ in wds.WebDataset(urls))``, which
   reads every member's bytes (on the smallest set only: it is the slow one);
3. ``mmpt data index`` when img2dataset's ``*_stats.json`` are beside the shards.

Each count is checked against the number of samples written, and the time per shard at each
size shows whether the cost is linear in the number of shards.

    python scripts/bench_index.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from mmpt.shards.indexer import index_shards


def write_shards(folder: Path, shards: int, per_shard: int) -> None:
    """``shards`` img2dataset-style tars of ``per_shard`` samples (16 px JPEG, txt, json)."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpg = buf.getvalue()
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                info = json.dumps({"key": key, "caption": f"photo {key}"}).encode()
                w.write({"__key__": key, "jpg": jpg, "txt": f"photo {key}", "json": info})


def subset(src: Path, dst: Path, n: int, successes: int | None = None) -> None:
    """Links to the first ``n`` shards of ``src`` in ``dst``, with img2dataset stats files
    saying ``successes`` samples each when given."""
    dst.mkdir(parents=True)
    for tar in sorted(src.glob("*.tar"))[:n]:
        os.link(tar, dst / tar.name)
        if successes is not None:
            stats = {"count": successes, "successes": successes, "status": "success"}
            (dst / f"{tar.stem}_stats.json").write_text(json.dumps(stats))


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints a Markdown table and returns the rows as a dict."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path("data/bench_index"))
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python scripts/bench_index.py", shlex.join(given)]).strip()
    full = args.data / "all"
    if len(list(full.glob("*.tar"))) != args.shards:
        shutil.rmtree(args.data, ignore_errors=True)
        write_shards(full, args.shards, args.per_shard)
    sizes = sorted({max(1, args.shards // 4), max(1, args.shards // 2), args.shards})
    rows, ok = [], True
    for n in sizes:
        folder = args.data / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        subset(full, folder, n)
        truth = n * args.per_shard
        for workers in sorted({1, args.workers}):
            sec, report = timed(lambda: index_shards(folder, workers=workers))  # noqa: B023
            ok &= report.num_samples == truth
            rows.append({"method": f"mmpt data index, {workers} proc", "shards": n, "sec": sec,
                         "count": report.num_samples, "truth": truth})  # fmt: skip
        stats = args.data / f"s{n}"
        shutil.rmtree(stats, ignore_errors=True)
        subset(full, stats, n, successes=args.per_shard)
        sec, report = timed(lambda: index_shards(stats))  # noqa: B023
        ok &= report.num_samples == truth and report.source.startswith("img2dataset")
        rows.append({"method": "mmpt data index, *_stats.json", "shards": n, "sec": sec,
                     "count": report.num_samples, "truth": truth})  # fmt: skip
        if n == sizes[0]:
            urls = sorted(str(u) for u in folder.glob("*.tar"))
            dataset = wds.WebDataset(urls, shardshuffle=False)
            sec, count = timed(lambda: sum(1 for _ in dataset))  # noqa: B023
            ok &= count == truth
            rows.append({"method": "baseline: iterate wds.WebDataset", "shards": n, "sec": sec,
                         "count": count, "truth": truth})  # fmt: skip
    print(f"command: {command}")
    print(f"{os.cpu_count()} cores, {platform.python_version()}, webdataset {wds.__version__}")
    print("| method | shards | samples | seconds | ms / shard | samples / s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ms_per_shard"] = 1000 * r["sec"] / r["shards"]
        print(f"| {r['method']} | {r['shards']} | {r['count']:,} | {r['sec']:.2f} | "
              f"{r['ms_per_shard']:.2f} | {r['count'] / r['sec']:,.0f} |")  # fmt: skip
    print("all counts equal the truth" if ok else "CHECK FAILED: a count differs from the truth")
    return {"command": command, "rows": rows, "checks_passed": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["checks_passed"] else 1)
