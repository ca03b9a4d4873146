"""MAE training-step benchmark: mmpt's MAEModule vs HF's ViTMAE and a full-sequence MIM ViT.

Three variants, side by side in one process (the baselines live in ``bench_mae_baselines``):

1. **mmpt MAE**: :class:`mmpt.models.mae.MAEModule` at ``--mask-ratio`` (default 0.75); its
   encoder runs only on the visible patches (``P + int(N * (1 - ratio))`` tokens, P prefix
   tokens), its decoder fills the masked positions with a mask token.
2. **HF ViTMAEForPreTraining**: transformers' MAE with the same shapes (width, depth, heads,
   MLP, patch, decoder, mask ratio, ``norm_pix_loss``), SDPA attention, its own init. The
   strongest baseline: the same method, another implementation.
3. **full-sequence baseline** (SimMIM/BEiT-style): the same encoder over ALL ``P + N`` tokens,
   masked patch embeddings replaced by a learned mask token before the position embedding;
   the same :class:`MAEDecoder` and the same :func:`mae_loss` on the masked patches only.

mmpt and the full-sequence variant start from the same initial weights (same seed). A training
step is ``zero_grad``, forward (under bf16 autocast with ``--dtype bf16``), backward and an
AdamW step; after ``--warmup`` untimed steps of each, ``--steps`` timed steps are run, variants
interleaved (order alternating); ``torch.cuda.synchronize`` around each step on CUDA. Reported:
median and IQR (q1-q3) ms per step, images/s at the median, the encoder-only forward time
(``no_grad``, mask drawing included, timed the same way) and the speedup (baseline ms / mmpt
ms). Peak memory (CUDA only): params + AdamW state, plus the step's
``torch.cuda.max_memory_allocated`` above what was allocated before it (activations, gradients,
temporaries); on the CPU memory is not measured.

Presets: ``mae-base`` (default on CUDA): ViT-B/16 at 224, decoder 512 x 8 blocks (16 heads) as
in MAE, batch 64. ``cpu-small`` (default on CPU): ViT-Ti/16 at 224 cut to 6 blocks, decoder
128 x 2 (4 heads), batch 8; well under two minutes on a 2-core CPU. Flags override presets.

    python scripts/bench_mae.py --json /tmp/bench_mae.json                  # CUDA, bf16
    python scripts/bench_mae.py --preset cpu-small --device cpu --json /tmp/bench_mae_cpu.json

On a CPU shared with other work add ``--threads 1``: torch's threads fight the other processes
for the cores and multi-threaded steps then slow down several-fold and vary widely.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import Timing, time_methods  # noqa: E402
from bench_mae_baselines import FULL, HF, LABELS, MMPT, FullSequenceMIM, HFViTMAE  # noqa: E402
from bench_mae_report import report  # noqa: E402

from mmpt.models.encoders.timm_vit import TimmVisionTower  # noqa: E402
from mmpt.models.mae import MAEModule  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "mae-base": {
        "model": "vit_base_patch16_224",
        "image_size": 224,
        "depth": None,
        "decoder_dim": 512,
        "decoder_depth": 8,
        "decoder_heads": 16,
        "batch_size": 64,
        "steps": 20,
        "warmup": 5,
    },
    "cpu-small": {
        "model": "vit_tiny_patch16_224",
        "image_size": 224,
        "depth": 6,
        "decoder_dim": 128,
        "decoder_depth": 2,
        "decoder_heads": 4,
        "batch_size": 8,
        "steps": 10,
        "warmup": 2,
    },
}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- timing


def stats(times: list[float]) -> dict[str, float]:
    """Median, q1, q3 and IQR in ms of step times in seconds."""
    ms = [1e3 * t for t in times]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "iqr": q3 - q1}


def paired(base: list[float], mine: list[float]) -> dict[str, float]:
    """Median and quartiles of base / mine over steps timed in the same round."""
    r = [b / m for b, m in zip(base, mine, strict=True)]
    q1, _, q3 = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else r * 3
    return {"median": statistics.median(r), "q1": q1, "q3": q3}


def step_gflop(model: nn.Module, images: torch.Tensor, autocast: Callable) -> float:
    """GFLOP of one forward + backward (matmuls, convolutions, attention), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = model(images)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def time_interleaved(
    fns: dict[str, Callable[[], Any]], steps: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """The harness's interleaved timing; a variant that raised stops the benchmark."""
    res = time_methods(fns, steps, warmup, device)
    failed = {k: t.error for k, t in res.items() if t.error}
    if failed:
        raise SystemExit(f"a variant failed: {failed}")
    return res


# ----------------------------------------------------------------------------- setup


def make_tower(a: argparse.Namespace) -> TimmVisionTower:
    kwargs = {} if a.depth is None else {"depth": a.depth}
    return TimmVisionTower(
        a.model,
        embed_dim=0,
        image_size=a.image_size,
        model_kwargs=kwargs,
        mean=MEAN,
        std=STD,
        feature_layer=-1,  # unused by MAE; -1 is valid at any depth
    )


def build(a: argparse.Namespace) -> dict[str, nn.Module]:
    """Both variants from the same seed: identical encoder and decoder initial weights."""
    dec = {"decoder_dim": a.decoder_dim, "decoder_depth": a.decoder_depth}
    torch.manual_seed(a.seed)
    mmpt = MAEModule(make_tower(a), a.mask_ratio, decoder_heads=a.decoder_heads, **dec)
    torch.manual_seed(a.seed)
    full = FullSequenceMIM(make_tower(a), a.mask_ratio, decoder_heads=a.decoder_heads, **dec)
    torch.manual_seed(a.seed)
    hf = HFViTMAE(make_tower(a), a.mask_ratio, decoder_heads=a.decoder_heads, **dec)
    models = {MMPT: mmpt, FULL: full, HF: hf}
    return {k: v.to(a.device).train() for k, v in models.items()}


def same_init(m: nn.Module, f: nn.Module) -> bool:
    """Encoder and decoder weights equal (the baseline's extra mask token aside)."""
    for part in ("encoder", "decoder"):
        sm, sf = getattr(m, part).state_dict(), getattr(f, part).state_dict()
        if sm.keys() != sf.keys() or any(not torch.equal(sm[k], sf[k]) for k in sm):
            return False
    return True


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters plus optimizer state tensors (gradients are counted in the step peak)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return n


def machine_info(device: torch.device) -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="bf16: autocast, fp32 weights; auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--preset", choices=list(PRESETS), help="default: mae-base on CUDA, cpu-small on CPU"
    )
    p.add_argument("--model", help="timm ViT name (preset: vit_base_patch16_224)")
    p.add_argument("--image-size", type=int)
    p.add_argument(
        "--depth", type=int, help="encoder blocks (preset cpu-small: 6; mae-base: the model's)"
    )
    p.add_argument("--decoder-dim", type=int)
    p.add_argument("--decoder-depth", type=int)
    p.add_argument("--decoder-heads", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=1.5e-4, help="AdamW lr (betas 0.9/0.95, wd 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    cuda = a.device.type == "cuda"
    a.preset = a.preset or ("mae-base" if cuda else "cpu-small")
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.dtype == "auto":
        a.dtype = "bf16" if cuda else "fp32"
    if a.steps < 1 or a.warmup < 0 or a.batch_size < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1")
    return a


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes."""
    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return bench(a, sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_num_threads(threads)


def bench(a: argparse.Namespace, args: list[str]) -> dict[str, Any]:
    command = "python " + shlex.join(["scripts/bench_mae.py", *args])
    dev, cuda = a.device, a.device.type == "cuda"
    load_start = os.getloadavg()
    models = build(a)
    m, f, h = models[MMPT], models[FULL], models[HF]
    vit = m.encoder.model
    n, prefix = f.num_patches, vit.num_prefix_tokens
    g = torch.Generator().manual_seed(a.seed)
    images = torch.randn(a.batch_size, 3, a.image_size, a.image_size, generator=g).to(dev)

    def autocast() -> contextlib.AbstractContextManager:
        if a.dtype == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # checks: token counts, mask ratio, same initial weights, finite losses
    with torch.no_grad(), autocast():
        latent, mask_m, _ = m.encode(images)
        mask_f = f.random_mask(a.batch_size, dev)
        full_latent = f.encode(images, mask_f)
        hf_latent = h.encode(images)
        loss_m, loss_f = m(images)[0].item(), f(images)[0].item()
        loss_h, _, mask_h = h(images)
    expected = prefix + int(n * (1 - a.mask_ratio))
    checks = {
        "num_patches": n,
        "prefix_tokens": prefix,
        "mmpt_encoder_tokens": int(latent.shape[1]),
        "expected_mmpt_tokens": expected,
        "full_encoder_tokens": int(full_latent.shape[1]),
        "hf_encoder_tokens": int(hf_latent.shape[1]),
        "tokens_ok": int(latent.shape[1]) == expected == int(hf_latent.shape[1])
        and int(full_latent.shape[1]) == prefix + n,
        "masked_fraction": {
            MMPT: mask_m.float().mean().item(),
            FULL: mask_f.mean().item(),
            HF: mask_h.float().mean().item(),
        },
        "same_initial_weights": same_init(m, f),
        "initial_loss": {MMPT: loss_m, FULL: loss_f, HF: loss_h.item()},
    }
    del latent, full_latent, hf_latent
    checks["gflop_per_step"] = {k: step_gflop(v, images, autocast) for k, v in models.items()}

    opts = {
        k: torch.optim.AdamW(v.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.05)
        for k, v in models.items()
    }
    last_loss: dict[str, torch.Tensor] = {}

    def train_step(name: str) -> Callable[[], None]:
        model, opt = models[name], opts[name]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(images)[0]
            loss.backward()
            opt.step()
            last_loss[name] = loss.detach()

        return step

    def encoder_fwd(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast():
                if name == MMPT:
                    m.encode(images)
                elif name == HF:
                    h.encode(images)
                else:
                    f.encode(images, f.random_mask(a.batch_size, dev))

        return step

    t0 = time.perf_counter()
    train = time_interleaved({k: train_step(k) for k in models}, a.steps, a.warmup, dev)
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    enc = time_interleaved({k: encoder_fwd(k) for k in models}, a.steps, a.warmup, dev)
    bench_s = time.perf_counter() - t0

    rows = []
    for name, model in models.items():
        st, es = stats(train[name].times), stats(enc[name].times)
        state = state_bytes(model, opts[name])
        tokens = checks["full_encoder_tokens" if name == FULL else "mmpt_encoder_tokens"]
        rows.append({
            "variant": name, "label": LABELS[name], "encoder_tokens": tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "steps_timed": len(train[name].times),
            "step_ms": st["median"], "step_ms_q1": st["q1"], "step_ms_q3": st["q3"],
            "step_ms_iqr": st["iqr"], "images_per_s": a.batch_size / (st["median"] / 1e3),
            "encoder_fwd_ms": es["median"], "encoder_fwd_ms_q1": es["q1"],
            "encoder_fwd_ms_q3": es["q3"], "encoder_fwd_ms_iqr": es["iqr"],
            "state_mib": state / 2**20 if cuda else None,
            "step_peak_mib": train[name].peak / 2**20 if cuda else None,
            "peak_mib": (state + train[name].peak) / 2**20 if cuda else None,
            "final_loss": last_loss[name].item(),
        })  # fmt: skip
    by = {r["variant"]: r for r in rows}
    speedup = {
        "train_step": by[FULL]["step_ms"] / by[MMPT]["step_ms"],
        "encoder_fwd": by[FULL]["encoder_fwd_ms"] / by[MMPT]["encoder_fwd_ms"],
        "hf_train_step": by[HF]["step_ms"] / by[MMPT]["step_ms"],
        "hf_encoder_fwd": by[HF]["encoder_fwd_ms"] / by[MMPT]["encoder_fwd_ms"],
        # per interleaved step: HF's step time over mmpt's in the same round
        "hf_train_step_paired": paired(train[HF].times, train[MMPT].times),
    }
    config = {
        k: getattr(a, k)
        for k in (
            "preset",
            "model",
            "image_size",
            "depth",
            "decoder_dim",
            "decoder_depth",
            "decoder_heads",
            "batch_size",
            "mask_ratio",
            "steps",
            "warmup",
            "lr",
            "seed",
            "dtype",
        )  # fmt: skip
    }
    config.update(
        encoder_depth=len(vit.blocks), embed_dim=vit.embed_dim, patch_size=m.patch_size,
        optimizer="AdamW(betas=(0.9, 0.95), weight_decay=0.05)",
    )  # fmt: skip
    result = {
        "command": command,
        "machine": {**machine_info(dev), "transformers": transformers.__version__},
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "config": config,
        "checks": checks,
        "bench_s": round(bench_s, 1),
        "variants": rows,
        "speedup": speedup,
    }
    report(result)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
