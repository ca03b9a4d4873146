"""Peak memory and step time of full fine-tuning vs LoRA on the tiny VLM (quickstart stage 3).

Each setting runs in a fresh interpreter (``--one``), so one setting's allocations cannot
hide another's: a few warm-up steps, then timed AdamW steps on one packed batch, and the peak
memory: the process's RSS high-water mark (``resource.getrusage``) on CPU, ``torch.cuda.
max_memory_allocated`` on a GPU. ``full`` trains the connector and the whole LLM (the stage 3
recipe's ``trainable``); ``lora`` trains the connector and peft LoRA adapters (r 8) on every
LLM projection, the LLM frozen. :func:`run_settings` is the entry point other benchmarks
(``scripts/bench_memory.py``) import::

    python scripts/bench_lora_memory.py --steps 10 --out runs/bench_lora_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("full", "lora")
LLM = {  # configs/quickstart/vila_stage3.yaml's LLM and vision tower
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
VISION = {
    "model_type": "siglip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "vision_use_head": False,
}
LORA_TARGETS = ["llm.*_proj"]


def build(setting: str, tokenizer: str, llm: dict[str, Any] | None = None) -> torch.nn.Module:
    """The tiny VLM with ``setting``'s trainable set (see the module docstring)."""
    from mmpt.models.adapters import AdapterSpec
    from mmpt.models.encoders import HFVisionTower
    from mmpt.models.llm import CausalLM
    from mmpt.models.vlm import VLMModule

    torch.manual_seed(0)
    lm = CausalLM(config=llm or LLM, tokenizer=tokenizer)
    if setting == "full":
        model = VLMModule(lm, HFVisionTower(config=VISION), trainable=["connector.*", "llm.*"])
    elif setting == "lora":
        adapters = [AdapterSpec(targets=LORA_TARGETS, r=8, alpha=16)]
        model = VLMModule(
            lm, HFVisionTower(config=VISION), trainable=["connector.*"], adapters=adapters
        )
    else:
        raise ValueError(f"setting {setting!r}: choose from {SETTINGS}")
    model.configure_model()
    return model


def batch(model: torch.nn.Module, rows: int, seed: int = 0):
    """``rows`` packed rows of one captioned random image each, through mmpt's data path."""
    import numpy as np
    from PIL import Image

    from mmpt.datamodules.packing import pack_row
    from mmpt.datamodules.templates import get_template
    from mmpt.datamodules.transforms import normalize_images
    from mmpt.datamodules.vlm_batching import VLMCollate
    from mmpt.datamodules.vlm_sample import VLMSample

    pre, rng = model.preprocess, np.random.default_rng(seed)
    make = VLMSample(pre, get_template("chatml"), max_seq_len=256, image_key="png")
    packed = []
    for i in range(rows):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        words = " ".join(["a red circle on the left ."] * 4)
        messages = [
            {"role": "user", "content": "<image> Describe the image ."},
            {"role": "assistant", "content": words},
        ]
        raw = {"__key__": str(i), "png": buf.getvalue(), "json": json.dumps({"messages": messages})}
        row = make({k: v.encode() if isinstance(v, str) else v for k, v in raw.items()})
        packed.append(row)
    length = max(int(r["input_ids"].shape[0]) for r in packed)
    out = VLMCollate(pre, "chatml")([pack_row([r], length, pre.pad_id) for r in packed])
    out.pixels = [normalize_images(p, pre.image.mean, pre.image.std) for p in out.pixels]
    return out


def measure(setting: str, steps: int, rows: int, device: str) -> dict[str, Any]:
    """Time ``steps`` AdamW steps (after 2 warm-up steps) and read the peak memory."""
    from mmpt.models.adapters import adapter_parameter_names
    from mmpt.synth.vocab import write_synth_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = build(setting, str(write_synth_tokenizer(Path(tmp))))
    dev = torch.device(device)
    model.to(dev).train()
    data = batch(model, rows)
    data.input_ids, data.labels = data.input_ids.to(dev), data.labels.to(dev)
    data.position_ids, data.cu_seqlens = data.position_ids.to(dev), data.cu_seqlens.to(dev)
    data.pixels = [p.to(dev) for p in data.pixels]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    grad_bytes = [0]

    def step() -> float:
        loss = model(data).loss
        loss.backward()
        grad_bytes[0] = sum(
            p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        what = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        what = "process RSS high-water mark"
    return {
        "setting": setting,
        "device": device,
        "rows": rows,
        "step_ms": 1000 * seconds,
        "peak_mib": peak,
        "peak_is": what,
        "grads_mib": grad_bytes[0] / 2**20,
        "optimizer_state_mib": sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        / 2**20,
        "trainable": sum(p.numel() for p in params),
        "adapter_tensors": len(adapter_parameter_names(model)),
        "total": sum(p.numel() for p in model.parameters()),
    }


def run_settings(
    settings: tuple[str, ...] = SETTINGS, steps: int = 10, rows: int = 8, device: str = "cpu"
) -> list[dict[str, Any]]:
    """:func:`measure` each setting in its own fresh interpreter; one result dict each."""
    results = []
    for setting in settings:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", setting]
        cmd += ["--steps", str(steps), "--rows", str(rows), "--device", device]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{setting}: {done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per setting: step time, peak memory, trained weights."""
    lines = [
        "| setting | device | step (ms) | peak memory (MiB) | grads + AdamW state (MiB) "
        "| trained weights |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        share = r["trainable"] / r["total"]
        state = r["grads_mib"] + r["optimizer_state_mib"]
        lines.append(
            f"| {r['setting']} | {r['device']} | {r['step_ms']:.1f} | {r['peak_mib']:.0f} "
            f"| {state:.2f} | {r['trainable']:,} of {r['total']:,} ({share:.1%}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", choices=SETTINGS, help="measure one setting in this process")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.rows, args.device)))
        return 0
    results = run_settings(tuple(args.settings), args.steps, args.rows, args.device)
    print(markdown(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
