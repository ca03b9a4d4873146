"""Attention benchmark, op level: each packed backend vs SDPA over the samples padded.

On random q/k/v of the packed batch: mmpt's packed attention per backend (xformers
``BlockDiagonalCausalMask``, FlexAttention document ``BlockMask``, SDPA with the dense
block-diagonal mask), SDPA over the samples padded to the longest with a causal + key-padding
mask (the baseline: what HF's "sdpa" does with an ``attention_mask``) and with
``is_causal=True`` alone, and optionally flash-attention 2 varlen. Output and q/k/v gradients
on real tokens are checked against the baseline before anything is timed; a method that
fails its check or raises is recorded and left out of the timing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_attention_batch import Batch, real_tokens, to_padded
from bench_harness import ResultLog, compare, describe, result_rows, time_methods

from mmpt.models import attention
from mmpt.models.attn_flex import flex_packed_attention
from mmpt.models.attn_xformers import xformers_attention

PAD_MASK, PAD_CAUSAL, FLASH = (
    "padded sdpa (causal+pad mask)",
    "padded sdpa (is_causal)",
    "flash-attn 2 varlen (packed)",
)
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 5e-3),
}
KERNELS: dict[str, tuple[str, Callable]] = {
    "xformers": ("xformers BlockDiagonalCausalMask", xformers_attention),
    "flex": ("FlexAttention document BlockMask", flex_packed_attention),
    "sdpa": ("sdpa + dense block-diagonal mask", None),
}


def packed_name(backend: str) -> str:
    """The row name of mmpt's packed attention on ``backend``."""
    return f"mmpt packed ({backend})"


def usable_backends(backends: list[str], device: torch.device, log: ResultLog, level: str):
    """The backends that run on ``device``; the others recorded as skipped with the reason."""
    keep = []
    for b in backends:
        why = attention.unusable_reason(b, device)
        if why is None:
            keep.append(b)
        else:
            log.skip(level, packed_name(b), why)
    return keep


def flash_status(device: torch.device, dtype: torch.dtype) -> tuple[Callable | None, str]:
    """flash_attn_varlen_func, or None and why it is skipped."""
    if device.type != "cuda":
        return None, "flash-attention 2 needs CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return None, f"flash-attention 2 needs bf16/fp16, not {dtype}"
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        return None, f"flash_attn not importable: {err}"
    return flash_attn_varlen_func, ""


def bench_op(a: argparse.Namespace, batch: Batch, log: ResultLog) -> None:
    """Check, then time fwd and fwd+bwd of every method; rows go to ``log``."""
    dev, dtype = a.device, a.dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
    r, length, h, hkv, d = batch.rows, batch.row_len, a.heads, a.kv_heads, a.head_dim
    shapes = [(r, h, length, d), (r, hkv, length, d), (r, hkv, length, d), (r, h, length, d)]
    qp, kp, vp, gp = (torch.randn(s, generator=g).to(dev, dtype) for s in shapes)
    real = torch.zeros(r * length, dtype=torch.bool)
    real[batch.packed_index] = True
    gp = gp * real.view(r, 1, length, 1).to(dev, dtype)  # no gradient from pads
    qd, kd, vd, gd = (to_padded(x, batch) for x in (qp, kp, vp, gp))
    cu = batch.packed["cu_seqlens"].to(dev)
    t = batch.pad_len
    keep = torch.arange(t)[None, :] < torch.tensor(batch.lengths)[:, None]
    pad_mask = (torch.ones(t, t, dtype=torch.bool).tril() & keep[:, None, None, :]).to(dev)
    gqa = h != hkv
    for x in (qp, kp, vp, qd, kd, vd):
        x.requires_grad_(True)

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    inputs, backends = {}, {}
    for b in usable_backends(a.backends, dev, log, "op"):
        label, kernel = KERNELS[b]
        if kernel is None:
            fns[packed_name(b)] = lambda: attention.packed_attention(qp, kp, vp, cu, backend="sdpa")
        else:
            fns[packed_name(b)] = lambda k=kernel: k(qp, kp, vp, cu, True, None, 0.0)
        inputs[packed_name(b)], backends[packed_name(b)] = (qp, kp, vp, gp), label
    fns[PAD_MASK] = lambda: F.scaled_dot_product_attention(qd, kd, vd, pad_mask, enable_gqa=gqa)
    fns[PAD_CAUSAL] = lambda: F.scaled_dot_product_attention(
        qd, kd, vd, is_causal=True, enable_gqa=gqa
    )
    inputs[PAD_MASK] = inputs[PAD_CAUSAL] = (qd, kd, vd, gd)
    backends[PAD_MASK], backends[PAD_CAUSAL] = "torch sdpa, bool mask", "torch sdpa, causal"
    if a.with_flash:
        flash, why = flash_status(dev, dtype)
        if flash is None:
            log.skip("op", FLASH, why)
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
    tol = tuple(x * a.tol_scale for x in TOLERANCES[dtype])
    results: dict[str, list[torch.Tensor]] = {}
    for name, fn in list(fns.items()):
        q, k, v, grad = inputs[name]
        try:
            o = fn()
            grads = torch.autograd.grad(o, (q, k, v), grad)
        except Exception as err:  # noqa: BLE001 (recorded; the method is not timed)
            log.error(f"op check: {name}", err)
            print(f"  op check: {name}: {describe(err)}")
            del fns[name]
            continue
        if name == FLASH:  # (N, H, D) layouts back to (R, H, L, D)
            grads = tuple(x.view(r, length, -1, d).transpose(1, 2) for x in grads)
        index = batch.padded_index if name in (PAD_MASK, PAD_CAUSAL) else batch.packed_index
        results[name] = [real_tokens(x.detach(), index, True) for x in (o, *grads)]
    ref = results.get(PAD_MASK)
    for name, got in results.items():
        if name == PAD_MASK or ref is None:
            continue
        parts = zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
        ok = [
            log.check(compare("op", f"{name} vs {PAD_MASK}: {p}", x, y, tol)) for p, x, y in parts
        ]
        if not all(ok):
            print(f"  op check FAILED: {name} (not timed)")
            fns.pop(name, None)
    del results, ref

    def fwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                fn()

        return step

    def fwd_bwd(fn: Callable[[], torch.Tensor], args: tuple) -> Callable[[], None]:
        def step() -> None:
            torch.autograd.grad(fn(), args[:3], args[3])

        return step

    cuda, tokens = dev.type == "cuda", batch.real_tokens
    timings = time_methods({k: fwd(f) for k, f in fns.items()}, a.steps, a.warmup, dev)
    log.results(result_rows("op", "fwd", timings, backends, tokens, PAD_MASK, cuda))
    steps = {k: fwd_bwd(f, inputs[k]) for k, f in fns.items()}
    timings = time_methods(steps, a.steps, a.warmup, dev)
    log.results(result_rows("op", "fwd+bwd", timings, backends, tokens, PAD_MASK, cuda))
