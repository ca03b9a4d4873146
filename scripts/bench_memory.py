"""Peak memory and step time of training settings, each in a fresh process: JSON + Markdown.

A *comparison* is a list of settings measured side by side in one run; each setting runs in
its own subprocess (so one setting's allocations never count against another), builds the
model of a recipe (``--config``, default the tiny CLIP of the quickstart) with its overrides,
and takes ``--warmup`` untimed then ``--steps`` timed training steps (``training_step``,
backward, AdamW step) on a synthetic batch of random images and token ids.

Peak memory of the steps, above what the process held before the first one (the model and
the batch; the AdamW state, allocated in the first step, counts in the peak): on CUDA
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before; on the CPU the
resident-set high-water mark
(``resource.getrusage(...).ru_maxrss``) minus the resident set before (tracemalloc does not
see torch's allocations). Both are reported, with the absolute peak.

Comparisons (``--compare``):

- ``grad_cache``: batch 256 vs 4096, each without and with gradient caching
  (``grad_cache: {chunk_size: --chunk}``, :mod:`mmpt.models.grad_cache`). Gradient caching
  keeps the encoders' activation memory at one chunk; what still grows with the batch is the
  B x B logit matrices of the loss (and the batch itself).
- ``full_vs_lora``: full training of the tiny VLM (quickstart stage 3: connector + LLM) vs
  LoRA adapters on the LLM (``adapters:``), ``--rows`` packed rows, measured by
  :func:`bench_lora_memory.run_settings` (also one fresh process per setting); its table adds
  the gradient + AdamW state, where LoRA's saving shows at this size.

Both by default, in one report (JSON: every row, with its ``compare``; Markdown: one table per
comparison)::

    python scripts/bench_memory.py --json /tmp/bench_memory.json --markdown /tmp/bench_memory.md
    python scripts/bench_memory.py --compare grad_cache --batches 256 4096
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import ResultLog, machine_info, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "quickstart" / "clip_tiny.yaml"


def grad_cache_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Batch 256 and 4096 (``--batches``), each without and with ``grad_cache``."""
    settings = []
    for batch in args.batches:
        settings.append({"name": f"batch {batch}", "batch": batch, "model": {}})
        cache = {"grad_cache": {"chunk_size": args.chunk}}
        settings.append({"name": f"batch {batch}, grad cache {args.chunk}", "batch": batch,
                         "model": cache})  # fmt: skip
    return settings


#: Comparison name -> settings. A setting: ``name``, ``batch`` and ``model`` (init_args
#: overriding the recipe's model, e.g. ``{"grad_cache": {"chunk_size": 64}}``).
COMPARISONS = {"grad_cache": grad_cache_settings}


def full_vs_lora(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Full vs LoRA training of the tiny VLM (:mod:`bench_lora_memory`): rows and table."""
    import bench_lora_memory

    rows = bench_lora_memory.run_settings(
        bench_lora_memory.SETTINGS, args.steps, args.rows, args.device
    )
    return rows, bench_lora_memory.markdown(rows)


#: Comparisons measured by another benchmark script: name -> (rows, Markdown table).
DELEGATED = {"full_vs_lora": full_vs_lora}


def build(spec: dict[str, Any]) -> Any:
    """Instantiate a ``class_path`` + ``init_args`` node (nested nodes first)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        kwargs = {k: build(v) for k, v in (spec.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module), name)(**kwargs)
    return spec


def build_module(config: Path, overrides: dict[str, Any]) -> torch.nn.Module:
    """The recipe's model with ``overrides`` in its init_args (optimizer built separately)."""
    from mmpt.models.grad_cache import GradCache

    model = yaml.safe_load(config.read_text())["model"]
    init = {k: v for k, v in model["init_args"].items() if k not in ("optimizer", "lr_schedule")}
    init = {k: build(v) for k, v in (init | overrides).items()}
    if isinstance(init.get("grad_cache"), dict):
        init["grad_cache"] = GradCache(**init["grad_cache"])
    module, _, name = model["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**init)


def synthetic_batch(model: torch.nn.Module, batch: int, device: torch.device) -> Any:
    """Random normalised images and token ids, one caption per image."""
    from mmpt.batch import ImageTextBatch

    g = torch.Generator().manual_seed(0)
    size = model.vision.image_preprocess.size
    tokens = model.text.tokenizer([f"a photo of shape {i % 97}" for i in range(batch)])
    return ImageTextBatch(
        images=torch.randn(batch, 3, size, size, generator=g).to(device),
        text_tokens=tokens.to(device),
        text_to_image=torch.arange(batch, device=device),
    )


def rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure(setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one setting in this process; its step times and peak memory."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_module(Path(args.config), setting["model"]).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(model, setting["batch"], device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings(), amp:  # self.log without a Trainer does nothing
            warnings.simplefilter("ignore")
            loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    before_rss = rss_bytes()
    before_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    row = {
        "setting": setting["name"],
        "batch": setting["batch"],
        "model": setting["model"],
        "ms_median": 1e3 * statistics.median(times),
        "ms_all": [1e3 * t for t in times],
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row |= {"peak_mib": peak / 2**20, "step_peak_mib": (peak - before_cuda) / 2**20}
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        row |= {"peak_mib": peak / 2**20, "step_peak_mib": (peak - before_rss) / 2**20}
    row["memory"] = "cuda max_memory_allocated" if device.type == "cuda" else "cpu ru_maxrss"
    return row


def run_in_subprocess(setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (its own memory high-water mark)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(setting), *args.passthrough]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        oom = done.returncode in (-9, 137) or "out of memory" in done.stderr.lower()
        return {"setting": setting["name"], "batch": setting["batch"], "oom": oom,
                "error": " | ".join(tail) or f"exit {done.returncode}"}  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    """The rows as a Markdown table."""
    out = [
        f"| setting ({device}) | ms/step (median) | peak MiB | step peak MiB (above start) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['setting']} | {'OOM' if r['oom'] else 'error'} | - | - |")
            continue
        out.append(
            f"| {r['setting']} | {r['ms_median']:,.0f} | {r['peak_mib']:,.0f} | "
            f"{r['step_peak_mib']:,.0f} |"
        )
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--compare", nargs="+", choices=sorted(COMPARISONS | DELEGATED),
        default=["grad_cache", "full_vs_lora"], help="comparisons to run, in one report",
    )  # fmt: skip
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="recipe whose model is built")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--chunk", type=int, default=64, help="grad_cache chunk_size")
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting")
    p.add_argument("--rows", type=int, default=8, help="full_vs_lora: packed VLM rows a step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per setting")
    p.add_argument("--json", help="write the results here (rewritten after each setting)")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.passthrough = [
        *("--config", args.config, "--device", args.device, "--threads", str(args.threads)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *(["--bf16"] if args.bf16 else []),
    ]
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every setting of ``--compare``; write JSON and Markdown."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args)))
        return 0
    log = ResultLog(args.json, compare=args.compare, argv=sys.argv[1:],
                    machine=machine_info(torch.device(args.device)))  # fmt: skip
    tables, ok = [], True
    for name in args.compare:
        if name in DELEGATED:
            rows, table = DELEGATED[name](args)
            log.results([{"compare": name, **r} for r in rows])
        else:
            rows = []
            for setting in COMPARISONS[name](args):
                rows.append(run_in_subprocess(setting, args))
                log.results([{"compare": name, **rows[-1]}])
                print(json.dumps(rows[-1]), flush=True)
            table = markdown(rows, args.device)
            ok = ok and all(not r.get("error") for r in rows)
        tables.append(f"### {name}\n\n{table.rstrip()}\n")
        print(tables[-1], flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(tables))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
