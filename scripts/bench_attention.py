"""Attention benchmark: mmpt packed attention vs SDPA on the same samples padded to the longest.

One seeded VLM-like batch is drawn and packed with ``pack_sequences`` into ``--rows`` rows of
``--max-seq-len``: image-text pairs (576 image tokens + 24-224 text tokens), interleaved
documents (1000-4000 tokens) and text-only samples (100-2000 tokens, lognormal). With
``--max-seq-len`` below 4096 every length is scaled by ``max_seq_len / 4096``. The same
samples are then run two (or three) ways, side by side in one process:

1. **mmpt packed**: ``packed_attention`` over the packed rows (xformers
   ``BlockDiagonalCausalMask`` on CUDA when xformers is installed, else SDPA with a dense
   block-diagonal causal mask; rows say which backend actually ran).
2. **padded**: torch SDPA over the samples padded to the longest, one sample per batch row
   (B = number of samples): with a causal + key-padding mask (what HF's "sdpa" does with an
   ``attention_mask``) and, at the op level, also ``is_causal=True`` alone (right padding
   keeps real tokens away from pads, so SDPA may pick its flash kernel).
3. optional (``--with-flash``): flash-attention 2 varlen over the packed rows, when
   transformers reports it available (CUDA, bf16/fp16); skipped otherwise.

Level ``op``: the attention op alone on random q/k/v (fwd, and fwd+bwd). Level ``model``: a
Qwen2-like ``CausalLM`` built from a config (``--model-config``), forward + backward with
labels over the first samples of the same seeded stream that pack into ``--model-rows`` rows
(the op-level batch itself when ``--model-rows`` equals ``--rows``): attn "packed" with
``hf_packing_kwargs`` vs "sdpa" padded with an ``attention_mask``.

Before anything is timed the outputs are compared on real tokens (op level: output and
q/k/v gradients in the run dtype; model level: logits and loss, by default in float32 on a
float32 copy of the model, so that a leak between packed samples cannot hide under bf16
noise); the script stops with an error when a difference exceeds its bound. Timings: median
ms per step after ``--warmup`` untimed steps (``torch.cuda.synchronize`` around each step,
methods interleaved), real tokens/s (pads never count), the peak CUDA memory the step
allocated above what was resident before it, and the speedup over the padded-mask baseline.

    python scripts/bench_attention.py                      # CUDA: bf16, 0.5B-shape model
    python scripts/bench_attention.py --device cpu --max-seq-len 256 --steps 2 --warmup 1 --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from mmpt.datamodules.packing import first_fit_decreasing, pack_sequences
from mmpt.models import attention
from mmpt.models.attention import hf_packing_kwargs, packed_attention

REF_LEN = 4096  # the sample length mix is defined for rows of this length
IMAGE_TOKENS = 576
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's shape (random weights): 24 layers, 14 heads / 2 KV heads of 64
    "0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (atol, rtol): a check passes when max |diff| <= atol + rtol * max |reference|
TOLERANCES = {
    ("op", torch.float32): (1e-4, 1e-4),
    ("op", torch.bfloat16): (1e-2, 2e-2),
    ("op", torch.float16): (2e-3, 5e-3),
    ("model", torch.float32): (1e-4, 1e-3),
    ("model", torch.bfloat16): (5e-2, 5e-2),
    ("model", torch.float16): (1e-2, 1e-2),
}
PACKED, PAD_MASK, PAD_CAUSAL, FLASH = (
    "mmpt packed",
    "padded sdpa (causal+pad mask)",
    "padded sdpa (is_causal)",
    "flash-attn 2 varlen (packed)",
)


def short(x: torch.dtype | torch.device) -> str:
    """``bfloat16`` for ``torch.bfloat16``; ``cuda:0`` for a device."""
    return str(x).replace("torch.", "")


# ----------------------------------------------------------------------------- the batch


def draw_length(rng: random.Random, pair_frac: float, doc_frac: float, scale: float) -> int:
    """One sample length of the VLM mix (before scaling: pair, interleaved doc or text)."""
    u = rng.random()
    if u < pair_frac:
        n = IMAGE_TOKENS + rng.randint(24, 224)
    elif u < pair_frac + doc_frac:
        n = rng.randint(1000, 4000)
    else:
        n = min(2000, max(100, round(rng.lognormvariate(math.log(500), 0.7))))
    return max(2, round(n * scale))


def draw_lengths(
    rows: int, max_len: int, seed: int, pair_frac: float, doc_frac: float
) -> list[int]:
    """Sample lengths, in stream order, that first-fit-decreasing packs into ``rows`` rows.

    Samples are drawn one by one; one that would need an extra row is skipped, and drawing
    stops when the rows are full or 50 draws in a row did not fit.
    """
    rng = random.Random(seed)
    scale = min(1.0, max_len / REF_LEN)
    kept: list[int] = []
    misses = 0
    while misses < 50 and sum(kept) < rows * max_len:
        n = min(max_len, draw_length(rng, pair_frac, doc_frac, scale))
        if len(first_fit_decreasing([*kept, n], max_len)) <= rows:
            kept.append(n)
            misses = 0
        else:
            misses += 1
    return kept


@dataclass
class Batch:
    """One packed batch and the map from its real tokens to the padded layout."""

    lengths: list[int]  # per sample, stream order (= padded batch order)
    packed: dict[str, Any]  # pack_sequences output
    packed_index: torch.Tensor  # (N,) flat index of each real token in the R * L packed tokens
    padded_index: torch.Tensor  # (N,) flat index of the same token in the B * T padded tokens

    @property
    def rows(self) -> int:
        return int(self.packed["input_ids"].shape[0])

    @property
    def row_len(self) -> int:
        return int(self.packed["input_ids"].shape[1])

    @property
    def pad_len(self) -> int:
        return max(self.lengths)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def make_batch(lengths: list[int], max_len: int, vocab: int, seed: int) -> Batch:
    """Random token ids of ``lengths``, packed; plus the real-token index maps."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        seqs.append({"input_ids": ids, "labels": ids.clone()})
    packed = pack_sequences(seqs, max_len, pad_id=0)
    packed["samples"] = seqs
    t = max(lengths)
    p_idx, d_idx = [], []
    for r, row in enumerate(packed["bins"]):
        offset = r * max_len
        for i in row:
            n = lengths[i]
            p_idx.append(torch.arange(offset, offset + n))
            d_idx.append(torch.arange(i * t, i * t + n))
            offset += n
    return Batch(lengths, packed, torch.cat(p_idx), torch.cat(d_idx))


def to_padded(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(R, H, L, D) packed -> (B, H, T, D) padded with zeros, same values on real tokens."""
    r, h, length, d = x.shape
    flat = x.transpose(1, 2).reshape(r * length, h, d)
    out = flat.new_zeros(len(batch.lengths) * batch.pad_len, h, d)
    out[batch.padded_index.to(x.device)] = flat[batch.packed_index.to(x.device)]
    return out.view(len(batch.lengths), batch.pad_len, h, d).transpose(1, 2).contiguous()


def real_tokens(x: torch.Tensor, index: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """Rows of the real tokens of (N, H, T, D) (``heads_first``) or (N, T, ...) tensors."""
    if heads_first:
        x = x.transpose(1, 2)
    return x.reshape(-1, *x.shape[2:])[index.to(x.device)]


# ----------------------------------------------------------------------------- checks


@dataclass
class Check:
    """One numerical comparison on real tokens."""

    level: str
    name: str
    max_abs_diff: float
    bound: float
    ref_max_abs: float
    dtype: str

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.bound

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def compare(
    level: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]
) -> Check:
    diff = (got.float() - ref.float()).abs().max().item()
    ref_max = ref.float().abs().max().item()
    return Check(level, name, diff, tol[0] + tol[1] * ref_max, ref_max, short(got.dtype))


@contextmanager
def count_xformers_calls() -> Any:
    """Count calls of mmpt's xformers path while the block runs (``calls[0]``)."""
    calls = [0]
    inner = attention._xformers

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return inner(*args, **kwargs)

    attention._xformers = spy
    try:
        yield calls
    finally:
        attention._xformers = inner


def backend_name(xformers_calls: int) -> str:
    if xformers_calls:
        return "xformers BlockDiagonalCausalMask"
    return "sdpa + dense block-diagonal mask"


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-step wall times (s) and peak extra CUDA memory (bytes) of one method."""

    times: list[float] = field(default_factory=list)
    peak: int = 0
    oom: bool = False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(
    fn: Callable[[], Any], device: torch.device, timing: Timing, setup: Callable[[], Any] | None
) -> float | None:
    """One synchronized step (``setup`` first, untimed); seconds, or None (marks OOM)."""
    cuda = device.type == "cuda"
    try:
        if setup is not None:
            setup()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        timing.oom = True
        if cuda:
            torch.cuda.empty_cache()
        return None
    if cuda:
        timing.peak = max(timing.peak, torch.cuda.max_memory_allocated(device) - base)
    return dt


def time_methods(
    fns: dict[str, Callable[[], Any]],
    steps: int,
    warmup: int,
    device: torch.device,
    setup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Timing]:
    """Warm each method up, then time ``steps`` steps of each, interleaved, order alternating.

    ``setup[name]`` runs untimed before each step of ``name`` (e.g. switching attention).
    """
    res = {name: Timing() for name in fns}
    setup = setup or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if res[name].oom or run_step(fn, device, res[name], setup.get(name)) is None:
                break
    names = list(fns)
    for step in range(steps):
        for name in names if step % 2 == 0 else reversed(names):
            if res[name].oom:
                continue
            dt = run_step(fns[name], device, res[name], setup.get(name))
            if dt is not None:
                res[name].times.append(dt)
    return res


def result_rows(
    level: str,
    pass_: str,
    timings: dict[str, Timing],
    backends: dict[str, str],
    tokens: int,
    cuda: bool,
) -> list[dict[str, Any]]:
    """One JSON/table row per method; speedup = padded-mask ms / method ms."""
    base = timings.get(PAD_MASK)
    base_ms = 1e3 * statistics.median(base.times) if base and base.times else None
    rows = []
    for name, t in timings.items():
        ms = 1e3 * statistics.median(t.times) if t.times else None
        rows.append(
            {
                "level": level,
                "pass": pass_,
                "method": name,
                "backend": backends[name],
                "ms": ms,
                "ms_min": 1e3 * min(t.times) if t.times else None,
                "ms_max": 1e3 * max(t.times) if t.times else None,
                "steps_timed": len(t.times),
                "real_tokens": tokens,
                "tokens_per_s": tokens / (ms / 1e3) if ms else None,
                "peak_mib": t.peak / 2**20 if cuda and not t.oom else None,
                "speedup": base_ms / ms if base_ms and ms else None,
                "oom": t.oom,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| level | pass | method | backend | ms/step median (min-max) | real tok/s "
        "| peak MiB | speedup vs padded mask |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["oom"] and r["ms"] is None:
            timing, rate, speed = "OOM", "-", "-"
        else:
            timing = f"{r['ms']:.3f} ({r['ms_min']:.3f}-{r['ms_max']:.3f})"
            rate, speed = f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        print(
            f"| {r['level']} | {r['pass']} | {r['method']} | {r['backend']} | {timing} | "
            f"{rate} | {peak} | {speed} |"
        )


# ----------------------------------------------------------------------------- flash


def flash_status(device: torch.device, dtype: torch.dtype) -> tuple[Callable | None, str]:
    """flash_attn_varlen_func, or None and why it is skipped."""
    if device.type != "cuda":
        return None, "flash-attention 2 needs CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return None, f"flash-attention 2 needs bf16/fp16, not {dtype}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return None, "transformers reports flash_attention_2 unavailable (flash_attn missing)"
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        return None, f"flash_attn not importable: {err}"
    return flash_attn_varlen_func, ""


# ----------------------------------------------------------------------------- op level


def bench_op(a: argparse.Namespace, batch: Batch, out: dict[str, Any]) -> None:
    dev, dtype = a.device, a.dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    r, length, h, hkv, d = batch.rows, batch.row_len, a.heads, a.kv_heads, a.head_dim
    shapes = [(r, h, length, d), (r, hkv, length, d), (r, hkv, length, d), (r, h, length, d)]
    qp, kp, vp, gp = (torch.randn(s, generator=g).to(dev, dtype) for s in shapes)
    mask_real = torch.zeros(r * length, dtype=torch.bool)
    mask_real[batch.packed_index] = True
    gp = gp * mask_real.view(r, 1, length, 1).to(dev, dtype)  # no gradient from pads
    qd, kd, vd, gd = (to_padded(x, batch) for x in (qp, kp, vp, gp))
    cu = batch.packed["cu_seqlens"].to(dev)
    t = batch.pad_len
    keep = torch.arange(t)[None, :] < torch.tensor(batch.lengths)[:, None]
    pad_mask = (torch.ones(t, t, dtype=torch.bool).tril() & keep[:, None, None, :]).to(dev)
    gqa = h != hkv
    for x in (qp, kp, vp, qd, kd, vd):
        x.requires_grad_(True)

    fns: dict[str, Callable[[], torch.Tensor]] = {
        PACKED: lambda: packed_attention(qp, kp, vp, cu),
        PAD_MASK: lambda: F.scaled_dot_product_attention(qd, kd, vd, pad_mask, enable_gqa=gqa),
        PAD_CAUSAL: lambda: F.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, enable_gqa=gqa
        ),
    }
    inputs = {PACKED: (qp, kp, vp, gp), PAD_MASK: (qd, kd, vd, gd), PAD_CAUSAL: (qd, kd, vd, gd)}
    backends = {PACKED: "", PAD_MASK: "torch sdpa, bool mask", PAD_CAUSAL: "torch sdpa, causal"}
    if a.with_flash:
        flash, why = flash_status(dev, dtype)
        if flash is None:
            print(f"op level: flash skipped: {why}")
            out["skipped"].append({"level": "op", "method": FLASH, "reason": why})
        else:
            qf, kf, vf, gf = (
                x.detach().transpose(1, 2).reshape(r * length, x.shape[1], d).contiguous()
                for x in (qp, kp, vp, gp)
            )
            for x in (qf, kf, vf):
                x.requires_grad_(True)
            m = int(batch.packed["max_seqlen"])

            def flash_fn() -> torch.Tensor:
                o = flash(qf, kf, vf, cu, cu, m, m, causal=True)
                return o.view(r, length, h, d).transpose(1, 2)

            fns[FLASH] = flash_fn
            inputs[FLASH] = (qf, kf, vf, gf.view(r, length, h, d).transpose(1, 2))
            backends[FLASH] = "flash_attn_varlen_func"

    # numerical check: output and q/k/v gradients on real tokens, against the padded mask
    tol = tuple(x * a.tol_scale for x in TOLERANCES[("op", dtype)])
    results: dict[str, list[torch.Tensor]] = {}
    for name, fn in fns.items():
        q, k, v, grad = inputs[name]
        with count_xformers_calls() as calls:
            o = fn()
        grads = torch.autograd.grad(o, (q, k, v), grad)
        if name == PACKED:
            backends[PACKED] = backend_name(calls[0])
        if name == FLASH:  # (N, H, D) layouts back to (R, H, L, D)
            grads = tuple(x.view(r, length, -1, d).transpose(1, 2) for x in grads)
        index = batch.padded_index if name in (PAD_MASK, PAD_CAUSAL) else batch.packed_index
        results[name] = [real_tokens(x.detach(), index, True) for x in (o, *grads)]
    ref = results[PAD_MASK]
    for name, got in results.items():
        if name == PAD_MASK:
            continue
        for part, x, y in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            out["checks"].append(compare("op", f"{name} vs {PAD_MASK}: {part}", x, y, tol))
    del results, ref
    report_checks(out, "op")

    tokens = batch.real_tokens
    cuda = dev.type == "cuda"

    def fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                fn()

        return step

    def fwd_bwd(fn: Callable[[], torch.Tensor], args: tuple) -> Callable[[], None]:
        def step() -> None:
            torch.autograd.grad(fn(), args[:3], args[3])

        return step

    timings = time_methods({k: fwd(f) for k, f in fns.items()}, a.steps, a.warmup, dev)
    out["results"] += result_rows("op", "fwd", timings, backends, tokens, cuda)
    timings = time_methods(
        {k: fwd_bwd(f, inputs[k]) for k, f in fns.items()}, a.steps, a.warmup, dev
    )
    out["results"] += result_rows("op", "fwd+bwd", timings, backends, tokens, cuda)


# ----------------------------------------------------------------------------- model level


def model_config(spec: str, max_len: int) -> dict[str, Any]:
    """A preset name, a JSON object string, or a JSON file (e.g. an HF config.json)."""
    if spec in MODEL_PRESETS:
        cfg = dict(MODEL_PRESETS[spec])
    elif spec.lstrip().startswith("{"):
        cfg = json.loads(spec)
    else:
        cfg = json.loads(Path(spec).read_text())
    if "model_type" not in cfg:
        raise ValueError(f"--model-config {spec!r} has no model_type")
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), max_len)
    return cfg


def write_tokenizer(path: Path) -> str:
    """A 4-word WordLevel tokenizer (ids are drawn at random; CausalLM needs a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "</s>", "<image>"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    tok.save_pretrained(str(path))
    return str(path)


def build_llm(cfg: dict[str, Any], tok: str, dtype: torch.dtype, a: argparse.Namespace) -> Any:
    from mmpt.models.llm import CausalLM

    torch.manual_seed(a.seed)
    llm = CausalLM(config=cfg, tokenizer=tok, attn_implementation="packed", dtype=short(dtype))
    return llm.to(a.device).train()


def model_inputs(batch: Batch, device: torch.device) -> tuple[dict, dict]:
    """(packed kwargs, padded kwargs) for ``CausalLM.forward``."""
    p = batch.packed
    packed = {
        "input_ids": p["input_ids"].to(device),
        "position_ids": p["position_ids"].to(device),
        "labels": p["labels"].to(device),
        **hf_packing_kwargs(p["cu_seqlens"].to(device), int(p["max_seqlen"])),
        "use_cache": False,  # training: no KV cache
    }
    b, t = len(batch.lengths), batch.pad_len
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    for i, s in enumerate(p["samples"]):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = s["input_ids"], 1, s["input_ids"]
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return packed, {**{k: v.to(device) for k, v in padded.items()}, "use_cache": False}


def model_forward(llm: Any, impl: str, kwargs: dict) -> Any:
    llm.model.set_attn_implementation(impl)
    return llm(**kwargs)


def check_model(
    llm: Any, batch: Batch, packed: dict, padded: dict, a: argparse.Namespace, out: dict
) -> str:
    """Packed vs padded logits and loss on real tokens; returns the packed backend used."""
    dtype = next(llm.parameters()).dtype
    tol = tuple(x * a.tol_scale for x in TOLERANCES[("model", dtype)])
    with torch.no_grad():
        with count_xformers_calls() as calls:
            got = model_forward(llm, a.impl, packed)
        ref = model_forward(llm, "sdpa", padded)
    name = f"{PACKED} vs padded sdpa"
    logits_p = real_tokens(got.logits, batch.packed_index, False)
    logits_d = real_tokens(ref.logits, batch.padded_index, False)
    out["checks"].append(compare("model", f"{name}: logits", logits_p, logits_d, tol))
    out["checks"].append(compare("model", f"{name}: loss", got.loss, ref.loss, tol))
    loss_p, loss_d = got.loss.item(), ref.loss.item()
    print(f"model check ({short(dtype)}): loss packed {loss_p:.6f}, padded {loss_d:.6f}")
    return backend_name(calls[0])


def bench_model(a: argparse.Namespace, out: dict[str, Any]) -> None:
    cfg = model_config(a.model_config, a.max_seq_len)
    dev = a.device
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(Path(tmp))
        lengths = draw_lengths(a.model_rows, a.max_seq_len, a.seed, a.pair_frac, a.doc_frac)
        batch = make_batch(lengths, a.max_seq_len, int(cfg["vocab_size"]), a.seed)
        packed, padded = model_inputs(batch, dev)
        check_dtype = a.check_dtype or a.dtype
        llm = build_llm(cfg, tok, check_dtype, a)
        n_params = sum(p.numel() for p in llm.parameters())
        out["model"] = {
            "config": cfg,
            "params": n_params,
            "rows": batch.rows,
            "samples": len(batch.lengths),
            "lengths": batch.lengths,
            "padded_shape": list(padded["input_ids"].shape),
            "check_dtype": short(check_dtype),
        }
        print(
            f"\n[model] {cfg['model_type']} {n_params / 1e6:.1f}M params "
            f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_attention_heads']}/{cfg.get('num_key_value_heads')} heads, vocab "
            f"{cfg['vocab_size']}), {a.dtype_name}, fwd+bwd with labels, no optimizer step; "
            f"{len(batch.lengths)} samples (packed into {batch.rows} row(s)): packed "
            f"{tuple(packed['input_ids'].shape)} vs padded {tuple(padded['input_ids'].shape)}, "
            f"{batch.real_tokens} real tokens"
        )
        backend = check_model(llm, batch, packed, padded, a, out)
        if check_dtype != a.dtype:
            del llm
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            llm = build_llm(cfg, tok, a.dtype, a)
        impls = {PACKED: a.impl, PAD_MASK: "sdpa"}
        inputs = {PACKED: packed, PAD_MASK: padded}
        backends = {PACKED: backend, PAD_MASK: "hf sdpa + attention_mask"}
        if a.with_flash:
            _, why = flash_status(dev, a.dtype)
            if not why:
                try:
                    tol = tuple(x * a.tol_scale for x in TOLERANCES[("model", a.dtype)])
                    with torch.no_grad():
                        ref = model_forward(llm, a.impl, packed)
                        got = model_forward(llm, "flash_attention_2", packed)
                    idx = batch.packed_index
                    out["checks"].append(
                        compare(
                            "model",
                            f"{FLASH} vs {PACKED} ({a.dtype_name}): logits",
                            real_tokens(got.logits, idx, False),
                            real_tokens(ref.logits, idx, False),
                            tol,
                        )
                    )
                    del ref, got
                    impls[FLASH], inputs[FLASH] = "flash_attention_2", packed
                    backends[FLASH] = "hf flash_attention_2 + cu_seq_lens"
                except (ImportError, ValueError) as err:
                    why = f"flash_attention_2 failed to load: {err}"
            if why:
                print(f"model level: flash skipped: {why}")
                out["skipped"].append({"level": "model", "method": FLASH, "reason": why})
        report_checks(out, "model")

        def step(name: str) -> Callable[[], None]:
            def run() -> None:
                llm(**inputs[name]).loss.backward()

            return run

        def setup(name: str) -> Callable[[], None]:
            def run() -> None:
                llm.zero_grad(set_to_none=True)
                llm.model.set_attn_implementation(impls[name])

            return run

        timings = time_methods(
            {k: step(k) for k in impls}, a.steps, a.warmup, dev, {k: setup(k) for k in impls}
        )
        cuda = dev.type == "cuda"
        out["results"] += result_rows(
            "model", "fwd+bwd", timings, backends, batch.real_tokens, cuda
        )
        llm.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- main


def report_checks(out: dict[str, Any], level: str) -> None:
    """Print this level's checks; write the JSON and stop when one failed."""
    checks = [c for c in out["checks"] if c.level == level]
    print(f"numerical check ({level}), real tokens only: max |diff| <= atol + rtol * max |ref|")
    for c in checks:
        flag = "ok" if c.passed else "FAILED"
        print(
            f"  {flag:6} {c.name} [{c.dtype}]: max abs diff {c.max_abs_diff:.3g} "
            f"(bound {c.bound:.3g}, max |ref| {c.ref_max_abs:.3g})"
        )
    failed = [c for c in checks if not c.passed]
    if failed:
        write_json(out)
        names = "; ".join(f"{c.name}: {c.max_abs_diff:.3g} > {c.bound:.3g}" for c in failed)
        raise RuntimeError(f"NUMERICAL CHECK FAILED ({level}): {names}")


def write_json(out: dict[str, Any]) -> None:
    path = out["args"].get("json")
    if not path:
        return
    data = dict(out)
    data["checks"] = [c.row() for c in out["checks"]]
    data["checks_passed"] = all(c.passed for c in out["checks"])
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


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
    if not set(a.levels) <= {"op", "model"} or not a.levels:
        p.error(f"--levels must list op and/or model, got {a.levels}")
    if a.steps < 1 or a.warmup < 0 or a.rows < 1 or not 1 <= a.model_rows <= a.rows:
        p.error("need --steps >= 1, --warmup >= 0, --rows >= 1, 1 <= --model-rows <= --rows")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    return a


def machine_info(a: argparse.Namespace) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xformers": None,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "device": str(a.device),
        "device_name": None,
    }
    if attention.xops is not None:
        import xformers

        info["xformers"] = xformers.__version__
    if a.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(a.device)
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes (checks as dicts)."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.impl = attention.register_packed_attention()
    args = sys.argv[1:] if argv is None else list(argv)
    command = "python " + shlex.join(["scripts/bench_attention.py", *args])
    out: dict[str, Any] = {
        "command": command,
        "machine": machine_info(a),
        "args": {
            k: short(v) if isinstance(v, torch.device | torch.dtype) else v
            for k, v in vars(a).items()
        },
        "checks": [],
        "results": [],
        "skipped": [],
    }
    m = out["machine"]
    print(f"command: {command}")
    print(
        f"machine: {m['device_name'] or m['cpu']}, {m['cpus']} CPUs, load avg "
        f"{' '.join(map(str, m['load_avg']))}, torch threads {m['torch_threads']}; python "
        f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, xformers "
        f"{m['xformers'] or 'not installed'}"
    )
    lengths = draw_lengths(a.rows, a.max_seq_len, a.seed, a.pair_frac, a.doc_frac)
    batch = make_batch(lengths, a.max_seq_len, 1000, a.seed)
    slots_p, slots_d = batch.rows * batch.row_len, len(lengths) * batch.pad_len
    scale = min(1.0, a.max_seq_len / REF_LEN)
    out["batch"] = {
        "rows": batch.rows,
        "max_seq_len": batch.row_len,
        "samples": len(lengths),
        "lengths": lengths,
        "length_scale": scale,
        "real_tokens": batch.real_tokens,
        "packed_slots": slots_p,
        "padded_slots": slots_d,
        "padded_shape": [len(lengths), batch.pad_len],
    }
    print(
        f"batch: {len(lengths)} samples (lengths x{scale:.3g}: median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)}), {batch.real_tokens} real "
        f"tokens; packed {batch.rows} x {batch.row_len} ({batch.real_tokens / slots_p:.1%} "
        f"real) vs padded {len(lengths)} x {batch.pad_len} ({batch.real_tokens / slots_d:.1%} "
        f"real); {a.dtype_name} on {a.device}"
    )
    if "op" in a.levels:
        print(
            f"\n[op] attention alone: {a.heads} query / {a.kv_heads} KV heads x {a.head_dim}, "
            f"causal, {a.dtype_name}"
        )
        bench_op(a, batch, out)
    if "model" in a.levels:
        bench_model(a, out)
    print()
    print_table(out["results"])
    for s in out["skipped"]:
        print(f"skipped: {s['level']} {s['method']}: {s['reason']}")
    write_json(out)
    out["checks"] = [c.row() for c in out["checks"]]
    out["checks_passed"] = all(c["passed"] for c in out["checks"])
    return out


if __name__ == "__main__":
    main()
