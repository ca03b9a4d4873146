"""Attention benchmark: mmpt's packed attention per backend vs the padded SDPA a user would run.

One seeded VLM-like batch (``bench_attention_batch``) is packed into ``--rows`` rows of
``--max-seq-len`` tokens and run, side by side in one process, at two levels:

- **op** (``bench_attention_op``): the attention alone on random q/k/v, fwd and fwd+bwd:
  mmpt packed on each backend (xformers, flex, sdpa), SDPA over the samples padded (with a
  causal + key-padding mask: the baseline; and ``is_causal`` alone), flash-attn 2 varlen.
- **model** (``bench_attention_model``): a Qwen2-shaped ``CausalLM`` from a config
  (``--model-config``, default the 0.5B shape on CUDA), fwd+bwd with labels: mmpt packed per
  backend, HF "sdpa" packed by ``position_ids``, HF "flash_attention_2" (``--with-flash``),
  and HF "sdpa" padded with an ``attention_mask`` (the baseline).

Every method is checked on real tokens against the baseline before it is timed; a method
that fails its check or raises is recorded (``checks``, ``errors``) and not timed, and the
others still run. Timings: median ms per step after ``--warmup`` untimed steps (synchronized,
methods interleaved), real tokens/s (pads never count), peak extra CUDA memory, speedup over
the baseline. ``--json`` is rewritten after every check and result (``bench_harness``).

    python scripts/bench_attention.py --json attention.json     # CUDA: bf16, 0.5B shape
    python scripts/bench_attention.py --device cpu --max-seq-len 256 --steps 2 --warmup 1 --tiny
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_* modules

from bench_attention_batch import REF_LEN, draw_lengths, make_batch  # noqa: E402
from bench_attention_model import MODEL_PRESETS, PAD, bench_model  # noqa: E402
from bench_attention_op import PAD_CAUSAL, PAD_MASK, bench_op, packed_name  # noqa: E402
from bench_harness import ResultLog, machine_info, markdown_table, short  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
__all__ = ["PAD", "PAD_CAUSAL", "PAD_MASK", "cli", "main", "packed_name"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 CUDA, fp32 CPU"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    p.add_argument("--max-seq-len", type=int, default=4096, help="packed row length")
    p.add_argument("--rows", type=int, default=8, help="packed rows (op level)")
    p.add_argument(
        "--model-rows", type=int, default=1, help="model level: samples filling this many rows"
    )
    p.add_argument("--levels", default="op,model", help="comma list of: op, model")
    p.add_argument("--heads", type=int, default=None, help="op level query heads (16; tiny 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="op level KV heads (= heads)")
    p.add_argument("--head-dim", type=int, default=None, help="op level head dim (128; tiny 32)")
    p.add_argument(
        "--model-config",
        default=None,
        help=f"preset ({', '.join(MODEL_PRESETS)}), JSON object or JSON file; "
        "default 0.5b on CUDA, tiny on CPU",
    )
    p.add_argument(
        "--check-dtype",
        choices=[*DTYPES, "run"],
        default="float32",
        help="dtype of the model-level numerical check ('run': the timed dtype)",
    )
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply all check bounds")
    p.add_argument("--pair-frac", type=float, default=0.5, help="fraction of image-text pairs")
    p.add_argument("--doc-frac", type=float, default=0.2, help="fraction of interleaved docs")
    p.add_argument(
        "--backends",
        default="xformers,flex,sdpa",
        help="mmpt packed-attention backends to compare (those that cannot run are skipped)",
    )
    p.add_argument("--with-flash", action="store_true", help="add flash-attention 2 (packed)")
    p.add_argument("--tiny", action="store_true", help="tiny heads and model (CPU smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", default=None, metavar="OUT", help="write results as JSON here")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device.type == "cuda" else "float32"
    a.dtype_name, a.dtype = a.dtype, DTYPES[a.dtype]
    a.heads = a.heads or (4 if a.tiny else 16)
    a.kv_heads = a.kv_heads or a.heads
    a.head_dim = a.head_dim or (32 if a.tiny else 128)
    if a.model_config is None:
        a.model_config = "0.5b" if a.device.type == "cuda" and not a.tiny else "tiny"
    a.check_dtype = None if a.check_dtype == "run" else DTYPES[a.check_dtype]
    a.levels = [x.strip() for x in a.levels.split(",") if x.strip()]
    a.backends = [x.strip() for x in a.backends.split(",") if x.strip()]
    if not set(a.backends) <= {"xformers", "flex", "sdpa"}:
        p.error(f"--backends must list xformers, flex and/or sdpa, got {a.backends}")
    if not set(a.levels) <= {"op", "model"} or not a.levels:
        p.error(f"--levels must list op and/or model, got {a.levels}")
    if a.steps < 1 or a.warmup < 0 or a.rows < 1 or not 1 <= a.model_rows <= a.rows:
        p.error("need --steps >= 1, --warmup >= 0, --rows >= 1, 1 <= --model-rows <= --rows")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` holds."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    args = sys.argv[1:] if argv is None else list(argv)
    command = "python " + shlex.join(["scripts/bench_attention.py", *args])
    settings = {
        k: short(v) if isinstance(v, torch.device | torch.dtype) else v for k, v in vars(a).items()
    }
    log = ResultLog(a.json, command=command, machine=machine_info(a.device), args=settings)
    m = log.data["machine"]
    print(f"command: {command}")
    print(
        f"machine: {m['device_name'] or m['cpu']}, {m['cpus']} CPUs, load avg "
        f"{' '.join(map(str, m['load_avg']))}; torch {m['torch']}, transformers "
        f"{m['transformers']}, xformers {m['xformers'] or 'not installed'}"
    )
    lengths = draw_lengths(a.rows, a.max_seq_len, a.seed, a.pair_frac, a.doc_frac)
    batch = make_batch(lengths, a.max_seq_len, 1000, a.seed)
    slots_p, slots_d = batch.rows * batch.row_len, len(lengths) * batch.pad_len
    log.data["batch"] = {
        "rows": batch.rows,
        "max_seq_len": batch.row_len,
        "samples": len(lengths),
        "lengths": lengths,
        "length_scale": min(1.0, a.max_seq_len / REF_LEN),
        "real_tokens": batch.real_tokens,
        "packed_slots": slots_p,
        "padded_slots": slots_d,
        "padded_shape": [len(lengths), batch.pad_len],
    }
    print(
        f"batch: {len(lengths)} samples (median {statistics.median(lengths):.0f}, max "
        f"{max(lengths)}), {batch.real_tokens} real tokens; packed {batch.rows} x "
        f"{batch.row_len} ({batch.real_tokens / slots_p:.1%} real) vs padded {len(lengths)} x "
        f"{batch.pad_len} ({batch.real_tokens / slots_d:.1%} real); {a.dtype_name} on {a.device}"
    )
    levels = {"op": lambda: bench_op(a, batch, log), "model": lambda: bench_model(a, log)}
    for level in a.levels:
        try:
            levels[level]()
        except Exception as err:  # noqa: BLE001 (recorded; the next level still runs)
            log.error(f"{level} level", err)
            print(f"{level} level FAILED: {err}")
    print()
    for level, baseline in (("op", PAD_MASK), ("model", PAD)):
        rows = [r for r in log.data["results"] if r["level"] == level]
        if rows:
            print(markdown_table(rows, baseline), end="\n\n")
    for s in log.data["skipped"]:
        print(f"skipped: {s['level']} {s['method']}: {s['reason']}")
    for e in log.data["errors"]:
        print(f"error: {e['where']}: {e['error']}")
    failed = [c["name"] for c in log.data["checks"] if not c["passed"]]
    if failed:
        print("NUMERICAL CHECK FAILED: " + "; ".join(failed))
    log.write()
    return log.data


def cli(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when every check passed and nothing raised, else 1."""
    out = main(argv)
    return 0 if out["checks_passed"] and not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(cli())
