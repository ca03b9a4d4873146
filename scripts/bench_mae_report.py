"""The console report of ``bench_mae.py`` (machine, checks, the timing table, speedups)."""

from __future__ import annotations

from typing import Any

from bench_mae_baselines import FULL, HF, MMPT
from rich.console import Console
from rich.table import Table

console = Console(width=150, highlight=False, markup=False)


def report(r: dict[str, Any]) -> None:
    c, k, mc = r["config"], r["checks"], r["machine"]
    console.print(f"command: {r['command']}")
    console.print(
        f"machine: {mc['device_name'] or mc['cpu']}, {mc['usable_cores']} usable cores, torch "
        f"threads {mc['torch_threads']}; python {mc['python']}, torch {mc['torch']}, timm "
        f"{mc['timm']}; load avg {r['load_avg_start']} -> {r['load_avg_end']}"
    )
    console.print(
        f"model: {c['model']} at {c['image_size']} px ({c['encoder_depth']} blocks, width "
        f"{c['embed_dim']}, patch {c['patch_size']}), decoder {c['decoder_dim']} x "
        f"{c['decoder_depth']} ({c['decoder_heads']} heads); batch {c['batch_size']}, mask "
        f"ratio {c['mask_ratio']}, {c['dtype']} on {mc['device']}, {c['optimizer']}; "
        f"{c['warmup']} warm-up + {c['steps']} timed steps per variant, interleaved"
    )
    ok = "ok" if k["tokens_ok"] else "MISMATCH"
    console.print(
        f"check: mmpt encoder tokens {k['mmpt_encoder_tokens']} = {k['prefix_tokens']} + "
        f"int({k['num_patches']} * {1 - c['mask_ratio']:g}) = {k['expected_mmpt_tokens']} "
        f"[{ok}]; HF encoder tokens {k['hf_encoder_tokens']}; full-sequence encoder tokens "
        f"{k['full_encoder_tokens']}; masked fraction "
        f"mmpt {k['masked_fraction'][MMPT]:.4f}, full {k['masked_fraction'][FULL]:.4f}; same "
        f"initial weights: {k['same_initial_weights']}; initial loss mmpt "
        f"{k['initial_loss'][MMPT]:.4f}, full {k['initial_loss'][FULL]:.4f}"
    )
    table = Table(title=f"MAE training step, {c['model']}, batch {c['batch_size']}")
    cols = ("variant", "enc tokens", "params M", "step ms median", "IQR (q1-q3)", "images/s",
            "enc fwd ms median", "IQR (q1-q3)", "peak MiB", "final loss")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in r["variants"]:
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:,.0f}"
        table.add_row(
            row["label"], str(row["encoder_tokens"]), f"{row['params'] / 1e6:.1f}",
            f"{row['step_ms']:.1f}", f"{row['step_ms_iqr']:.1f} "
            f"({row['step_ms_q1']:.1f}-{row['step_ms_q3']:.1f})", f"{row['images_per_s']:.1f}",
            f"{row['encoder_fwd_ms']:.1f}", f"{row['encoder_fwd_ms_iqr']:.1f} "
            f"({row['encoder_fwd_ms_q1']:.1f}-{row['encoder_fwd_ms_q3']:.1f})", peak,
            f"{row['final_loss']:.4f}",
        )  # fmt: skip
    console.print(table)
    s = r["speedup"]
    console.print(
        f"speedup mmpt vs full-sequence: training step {s['train_step']:.2f}x, encoder forward "
        f"{s['encoder_fwd']:.2f}x (benchmark {r['bench_s']} s)"
    )
    g = k["gflop_per_step"]
    console.print(
        f"GFLOP per step (fwd + bwd): mmpt {g[MMPT]:.2f}, HF {g[HF]:.2f}, full {g[FULL]:.2f}"
    )
    q = s["hf_train_step_paired"]
    console.print(
        f"speedup mmpt vs HF ViTMAEForPreTraining: training step {s['hf_train_step']:.2f}x "
        f"(per step: median {q['median']:.2f}x, q1-q3 {q['q1']:.2f}-{q['q3']:.2f}), encoder "
        f"forward {s['hf_encoder_fwd']:.2f}x"
    )
