"""Packing benchmark: mmpt's online packing vs pad-to-longest batching, side by side.

A seeded VLM-like stream mixes image-text pairs (144 or 196 image tokens + a 10-60 token
caption) with interleaved documents (1-6 images of 144/196 tokens between text segments of
50-800 tokens). Part 1 counts token utilisation (real tokens / token slots) of
pad-to-longest batches of ``--batch-size`` samples in stream order (what HF collators do),
of HF's ``group_by_length`` order, and of ``pack_stream`` rows of ``--max-len``. Part 2 times
forward+backward of a tiny Qwen2 on the CPU over the same samples, with lengths scaled by
``--cpu-scale`` and rows of ``--cpu-max-len``: padded batches (SDPA + attention_mask) vs
packed rows (``register_packed_attention`` + ``hf_packing_kwargs``): one warm-up pass each,
then ``--repeats`` timed passes, alternating.

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
import time
from collections.abc import Iterator

import torch
import transformers

from mmpt.datamodules.packing import IGNORE_INDEX, collate_packed, pack_stream
from mmpt.models.attention import hf_packing_kwargs, register_packed_attention


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


def padded_batches(lengths: list[int], batch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches in stream order, or HF's group_by_length order (megabatches of 50 B)."""
    idx = list(range(len(lengths)))
    if group_by_length:
        mega = [idx[i : i + 50 * batch] for i in range(0, len(idx), 50 * batch)]
        idx = [i for m in mega for i in sorted(m, key=lambda i: -lengths[i])]
    return [idx[i : i + batch] for i in range(0, len(idx), batch)]


def padded_util(lengths: list[int], max_len: int, batch: int, grouped: bool) -> dict:
    cut = [min(n, max_len) for n in lengths]
    batches = padded_batches(cut, batch, grouped)
    slots = sum(len(b) * max(cut[i] for i in b) for b in batches)
    return {"util": sum(cut) / slots, "rows": len(batches), "slots": slots, "real": sum(cut)}


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def packed_rows(samples: list[dict], max_len: int, buffer: int) -> list[dict]:
    return list(pack_stream(iter(samples), max_len, pad_id=0, buffer_size=buffer))


def packed_util(lengths: list[int], max_len: int, buffer: int) -> dict:
    rows = packed_rows(make_samples(lengths, 2, 0), max_len, buffer)
    real = sum(r["num_real_tokens"] for r in rows)
    return {
        "util": real / (len(rows) * max_len),
        "rows": len(rows),
        "slots": len(rows) * max_len,
        "real": real,
        "truncated": sum(r["num_truncated"] for r in rows),
        "dropped": sum(r["num_dropped"] for r in rows),
    }


def padded_steps(samples: list[dict], max_len: int, batch: int) -> Iterator[dict]:
    for b in padded_batches([len(s["input_ids"]) for s in samples], batch, False):
        ids = [samples[i]["input_ids"][:max_len] for i in b]
        t = max(len(x) for x in ids)
        out = {
            "input_ids": torch.zeros(len(b), t, dtype=torch.long),
            "attention_mask": torch.zeros(len(b), t, dtype=torch.long),
            "labels": torch.full((len(b), t), IGNORE_INDEX, dtype=torch.long),
        }
        for r, x in enumerate(ids):
            out["input_ids"][r, : len(x)] = x
            out["attention_mask"][r, : len(x)] = 1
            out["labels"][r, : len(x)] = x
        yield out


def packed_steps(rows: list[dict], rows_per_step: int) -> Iterator[dict]:
    for i in range(0, len(rows), rows_per_step):
        batch = collate_packed(rows[i : i + rows_per_step])
        yield {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "labels": batch["labels"],
            **hf_packing_kwargs(batch["cu_seqlens"], batch["max_seqlen"]),
        }


def run_epoch(model, steps: list[dict]) -> float:
    t0 = time.perf_counter()
    for kwargs in steps:
        model.zero_grad(set_to_none=True)
        model(**kwargs).loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="stream length (utilisation)")
    p.add_argument("--pair-frac", type=float, default=0.7, help="fraction of pairs by count")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
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
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    print("command: python " + shlex.join(["scripts/bench_packing.py", *sys.argv[1:]]))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, torch threads "
        f"{torch.get_num_threads()}; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )

    lengths = sample_lengths(a.samples, a.pair_frac, a.seed)
    over = sum(n > a.max_len for n in lengths)
    print(
        f"\n[1] utilisation: {a.samples} samples ({a.pair_frac:.0%} pairs), "
        f"{sum(lengths)} tokens, median {statistics.median(lengths):.0f}, max {max(lengths)}, "
        f"{over} longer than max_len {a.max_len} (truncated in every method)"
    )
    res = {
        f"pad-to-longest, B={a.batch_size}, stream order": padded_util(
            lengths, a.max_len, a.batch_size, False
        ),
        f"pad-to-longest, B={a.batch_size}, group_by_length": padded_util(
            lengths, a.max_len, a.batch_size, True
        ),
        f"mmpt pack_stream, buffer={a.buffer}": packed_util(lengths, a.max_len, a.buffer),
    }
    print("| method | utilisation | batches/rows | token slots | real tokens | trunc | drop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        extra = f"{r['truncated']} | {r['dropped']}" if "truncated" in r else f"{over} | 0"
        print(f"| {name} | {r['util']:.1%} | {r['rows']} | {r['slots']} | {r['real']} | {extra} |")

    scaled = [max(1, round(n * a.cpu_scale)) for n in lengths[: a.cpu_samples]]
    samples = make_samples(scaled, a.vocab, a.seed)
    padded = list(padded_steps(samples, a.cpu_max_len, a.batch_size))
    rows = packed_rows(samples, a.cpu_max_len, a.buffer)
    packed = list(packed_steps(rows, a.rows_per_step))
    real_pad = sum(int(s["attention_mask"].sum()) for s in padded)
    real_pack = sum(r["num_real_tokens"] for r in rows)
    assert real_pad == real_pack, (real_pad, real_pack)
    slots_pad = sum(s["input_ids"].numel() for s in padded)
    slots_pack = len(rows) * a.cpu_max_len
    print(
        f"\n[2] step time (CPU): first {a.cpu_samples} samples, lengths x{a.cpu_scale}, "
        f"max_len {a.cpu_max_len}: {real_pad} real tokens; padded {len(padded)} batches of "
        f"{a.batch_size}, {slots_pad} slots ({real_pad / slots_pad:.1%} real); packed "
        f"{len(packed)} steps of {a.rows_per_step} rows, {slots_pack} slots "
        f"({real_pack / slots_pack:.1%} real)"
    )
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
    impl = {
        "padded (sdpa + attention_mask)": "sdpa",
        "packed (mmpt_packed)": register_packed_attention(),
    }
    steps = {"padded (sdpa + attention_mask)": padded, "packed (mmpt_packed)": packed}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for k in steps:  # warm-up: one untimed pass each
        model.set_attn_implementation(impl[k])
        run_epoch(model, steps[k])
    for rep in range(a.repeats):
        for k in steps if rep % 2 == 0 else reversed(list(steps)):
            model.set_attn_implementation(impl[k])
            times[k].append(run_epoch(model, steps[k]))
    print("| batching | real tokens/s, median (min-max) | s per pass, median |")
    print("|---|---:|---:|")
    med = {}
    for k, ts in times.items():
        rates = [real_pad / t for t in ts]
        med[k] = statistics.median(rates)
        spread = f"{min(rates):.0f}-{max(rates):.0f}"
        print(f"| {k} | {med[k]:.0f} ({spread}) | {statistics.median(ts):.2f} |")
    ratio = med["packed (mmpt_packed)"] / med["padded (sdpa + attention_mask)"]
    print(f"| **ratio packed / padded** | **{ratio:.2f}x** | |")
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
