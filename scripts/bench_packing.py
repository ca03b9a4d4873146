"""Packing benchmark: mmpt's online packing vs the strongest HF batchings, side by side.

A seeded VLM-like stream mixes image-text pairs (144 or 196 image tokens + a 10-60 token
caption) with interleaved documents (1-6 images of 144/196 tokens between text segments of
50-800 tokens). Part 1 counts token utilisation (real tokens / token slots) of
pad-to-longest batches of ``--batch-size`` samples in stream order (what HF collators do),
in HF's ``group_by_length`` order, of HF's ``DataCollatorWithFlattening`` (no pads, but
varying tokens per step) and of ``pack_stream`` rows of ``--max-len``. Part 2 times
forward+backward of a tiny Qwen2 on the CPU over the same samples, with lengths scaled by
``--cpu-scale`` and rows of ``--cpu-max-len``, for all four (see ``bench_packing_steps``):
a loss check first (every method's mean loss per predicted token must equal the padded
one), one warm-up pass each, then ``--repeats`` timed passes, interleaved in alternating
order. Ratios are per repeat (mmpt's pass vs the baseline's pass of the same repeat).

    python scripts/bench_packing.py
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_packing_steps import (  # noqa: E402
    batches_of,
    flattened_steps,
    grouped_order,
    make_samples,
    packed_rows,
    packed_steps,
    padded_steps,
    real_tokens,
    register_dense_packed,
    run_epoch,
    token_loss,
)

from mmpt.models.attention import register_packed_attention  # noqa: E402


def lognormal_int(rng: random.Random, lo: int, hi: int, mu: float, sigma: float) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))))


def sample_lengths(n: int, pair_frac: float, seed: int) -> list[int]:
    """Token lengths of a mixed stream of image-text pairs and interleaved documents."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < pair_frac:
            out.append(rng.choice((144, 196)) + lognormal_int(rng, 10, 60, 3.1, 0.45))
        else:
            images = rng.randint(1, 6)
            text = sum(lognormal_int(rng, 50, 800, 5.3, 0.7) for _ in range(images + 1))
            out.append(images * rng.choice((144, 196)) + text)
    return out


def padded_util(cut: list[int], batches: list[list[int]]) -> dict:
    slots = sum(len(b) * max(cut[i] for i in b) for b in batches)
    return {"util": sum(cut) / slots, "rows": len(batches), "slots": slots, "real": sum(cut)}


def flat_util(cut: list[int], batches: list[list[int]]) -> dict:
    per_step = [sum(cut[i] for i in b) for b in batches]
    return {
        "util": 1.0,
        "rows": len(batches),
        "slots": sum(per_step),
        "real": sum(cut),
        "note": f"tokens/step {min(per_step)}-{max(per_step)}",
    }


def packed_util(lengths: list[int], max_len: int, buffer: int) -> dict:
    rows = packed_rows(make_samples(lengths, 2, 0), max_len, buffer)
    real = sum(r["num_real_tokens"] for r in rows)
    return {
        "util": real / (len(rows) * max_len),
        "rows": len(rows),
        "slots": len(rows) * max_len,
        "real": real,
        "note": f"truncated {sum(r['num_truncated'] for r in rows)}, "
        f"dropped {sum(r['num_dropped'] for r in rows)}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="stream length (utilisation)")
    p.add_argument("--pair-frac", type=float, default=0.7, help="fraction of pairs by count")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded/HF batch")
    p.add_argument("--mega-batch-mult", type=int, default=50, help="group_by_length megabatch")
    p.add_argument("--buffer", type=int, default=256, help="pack_stream buffer_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-samples", type=int, default=128, help="samples timed per repeat")
    p.add_argument("--cpu-scale", type=float, default=0.25, help="length scale for timing")
    p.add_argument("--cpu-max-len", type=int, default=1024)
    p.add_argument("--rows-per-step", type=int, default=4, help="packed rows per step")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dense-mask", action="store_true", help="also time mmpt's rows with a dense SDPA mask"
    )
    p.add_argument("--only", nargs="+", help="time only methods whose name contains one of these")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    print("command: python " + shlex.join(["scripts/bench_packing.py", *sys.argv[1:]]))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, torch threads "
        f"{torch.get_num_threads()}; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )
    bs, mult = a.batch_size, a.mega_batch_mult

    lengths = sample_lengths(a.samples, a.pair_frac, a.seed)
    cut = [min(n, a.max_len) for n in lengths]
    stream = batches_of(list(range(len(cut))), bs)
    grouped = batches_of(grouped_order(cut, bs, mult, a.seed), bs)
    print(
        f"\n[1] utilisation: {a.samples} samples ({a.pair_frac:.0%} pairs), "
        f"{sum(lengths)} tokens, median {statistics.median(lengths):.0f}, max {max(lengths)}, "
        f"{sum(n > a.max_len for n in lengths)} longer than max_len {a.max_len} (truncated)"
    )
    res = {
        f"pad-to-longest, B={bs}, stream order": padded_util(cut, stream),
        f"pad-to-longest, B={bs}, HF group_by_length (x{mult})": padded_util(cut, grouped),
        f"HF DataCollatorWithFlattening, B={bs}": flat_util(cut, stream),
        f"mmpt pack_stream, buffer={a.buffer}": packed_util(lengths, a.max_len, a.buffer),
    }
    print("| method | utilisation | batches/rows | token slots | real tokens | note |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in res.items():
        note = r.get("note", "")
        print(f"| {name} | {r['util']:.1%} | {r['rows']} | {r['slots']} | {r['real']} | {note} |")

    scaled = [max(1, round(n * a.cpu_scale)) for n in lengths[: a.cpu_samples]]
    cut = [min(n, a.cpu_max_len) for n in scaled]
    samples = make_samples(scaled, a.vocab, a.seed)
    stream = batches_of(list(range(len(cut))), bs)
    grouped = batches_of(grouped_order(cut, bs, mult, a.seed), bs)
    rows = packed_rows(samples, a.cpu_max_len, a.buffer)
    mmpt_impl = register_packed_attention()
    methods = {  # name: (attn_implementation, steps)
        "padded, stream order (sdpa + mask)": (
            "sdpa",
            padded_steps(samples, stream, a.cpu_max_len),
        ),
        "padded, HF group_by_length (sdpa + mask)": (
            "sdpa",
            padded_steps(samples, grouped, a.cpu_max_len),
        ),
        "HF DataCollatorWithFlattening (sdpa)": (
            "sdpa",
            flattened_steps(samples, stream, a.cpu_max_len),
        ),
        "mmpt pack_stream (mmpt_packed)": (mmpt_impl, packed_steps(rows, a.rows_per_step)),
    }
    if a.dense_mask:  # mmpt's rows through its earlier attention: SDPA with a dense mask
        dense = (register_dense_packed(), methods["mmpt pack_stream (mmpt_packed)"][1])
        methods["mmpt pack_stream, dense block mask (before)"] = dense
    if a.only:
        methods = {k: v for k, v in methods.items() if any(o in k for o in a.only)}
    if "mmpt pack_stream (mmpt_packed)" not in methods:
        sys.exit("--only must keep 'mmpt pack_stream (mmpt_packed)', the ratios' reference")
    real = sum(cut)
    print(
        f"\n[2] step time (CPU): first {a.cpu_samples} samples, lengths x{a.cpu_scale}, "
        f"max_len {a.cpu_max_len}: {real} real tokens"
    )
    print("| method | steps | token slots | real |")
    print("|---|---:|---:|---:|")
    for name, (_, steps) in methods.items():
        slots = sum(s["input_ids"].numel() for s in steps)
        assert real_tokens(steps) == real, (name, real_tokens(steps), real)
        print(f"| {name} | {len(steps)} | {slots} | {real / slots:.1%} |")

    torch.manual_seed(a.seed)
    config = transformers.Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(a.cpu_max_len, 2048),
    )
    model = transformers.Qwen2ForCausalLM(config).train()
    print(
        f"model: Qwen2ForCausalLM hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
        f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f}M params, fp32, fwd+bwd only"
    )
    losses = {k: token_loss(model, steps, impl) for k, (impl, steps) in methods.items()}
    ref_loss, ref_n = next(iter(losses.values()))
    for k, (loss, n) in losses.items():
        print(f"check: {k}: loss/token {loss:.6f} over {n} predicted tokens")
        if n != ref_n or abs(loss - ref_loss) > 5e-6 * abs(ref_loss):
            sys.exit(f"check failed: {k} computes a different loss ({loss} over {n} tokens)")

    times: dict[str, list[float]] = {k: [] for k in methods}
    for impl, steps in methods.values():  # warm-up: one untimed pass each
        model.set_attn_implementation(impl)
        run_epoch(model, steps)
    for rep in range(a.repeats):
        for k in methods if rep % 2 == 0 else reversed(list(methods)):
            impl, steps = methods[k]
            model.set_attn_implementation(impl)
            times[k].append(run_epoch(model, steps))
    mine = times["mmpt pack_stream (mmpt_packed)"]
    print("| method | real tokens/s, median (min-max) | s/pass | mmpt speedup, median (min-max) |")
    print("|---|---:|---:|---:|")
    for k, ts in times.items():
        rates = [real / t for t in ts]
        ratios = [t / m for t, m in zip(ts, mine, strict=True)]
        print(
            f"| {k} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
            f"{statistics.median(ts):.2f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
