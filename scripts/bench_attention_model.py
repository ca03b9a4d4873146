"""Attention benchmark, model level: a Qwen2-shaped CausalLM from a config, fwd+bwd with labels.

The same samples run as packed rows through mmpt's packed attention on each backend, as
packed rows through HF's own "sdpa" (packing read from restarting ``position_ids``) and
optionally HF's "flash_attention_2" the same way, and padded to the longest sample through
HF "sdpa" with an ``attention_mask`` (the baseline). Logits and loss on real tokens are
checked against the baseline first (by default on a float32 copy of the model, so that a
leak between packed samples cannot hide under bf16 noise); a method that fails its check or
raises is recorded and not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_attention_batch import Batch, draw_lengths, make_batch, real_tokens
from bench_attention_op import KERNELS, flash_status, packed_name, usable_backends
from bench_harness import ResultLog, compare, describe, result_rows, short, time_methods

from mmpt.models import attention
from mmpt.models.attention import hf_packing_kwargs, register_packed_attention

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
PAD = "hf sdpa (padded, attention_mask)"
HF_POS, HF_FLASH = "hf sdpa (position_ids packing)", "hf flash_attention_2 (position_ids packing)"
TOLERANCES = {
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


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
    llm = CausalLM(config=cfg, tokenizer=tok, attn_implementation="sdpa", dtype=short(dtype))
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


@contextlib.contextmanager
def kernel_spy() -> Iterator[dict[str, int]]:
    """Count the calls of mmpt's xformers and flex kernels while the block runs."""
    calls = {"xformers": 0, "flex": 0}
    inner = {"xformers": attention.xformers_attention, "flex": attention.flex_packed_attention}

    def spy(name: str) -> Callable:
        def run(*args: Any) -> torch.Tensor:
            calls[name] += 1
            return inner[name](*args)

        return run

    attention.xformers_attention, attention.flex_packed_attention = spy("xformers"), spy("flex")
    try:
        yield calls
    finally:
        attention.xformers_attention = inner["xformers"]
        attention.flex_packed_attention = inner["flex"]


def methods(a: argparse.Namespace, log: ResultLog, packed: dict, padded: dict) -> dict:
    """name -> (attn_implementation, forward kwargs)."""
    by_position = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_len"))}
    out = {packed_name(b): (register_packed_attention(backend=b), packed) for b in a.usable}
    out[HF_POS] = ("sdpa", by_position)
    if a.with_flash:
        _, why = flash_status(a.device, a.dtype)
        if why:
            log.skip("model", HF_FLASH, why)
        else:
            out[HF_FLASH] = ("flash_attention_2", by_position)
    out[PAD] = ("sdpa", padded)
    return out


def check(llm: Any, batch: Batch, todo: dict, a: argparse.Namespace, log: ResultLog) -> dict:
    """Logits and loss of every method vs the padded baseline; the backend each one ran."""
    dtype = next(llm.parameters()).dtype
    tol = tuple(x * a.tol_scale for x in TOLERANCES[dtype])
    ran, outs = {}, {}
    for name, (impl, kwargs) in todo.items():
        try:
            llm.model.set_attn_implementation(impl)
            with torch.no_grad(), kernel_spy() as calls:
                o = llm(**kwargs)
        except Exception as err:  # noqa: BLE001 (recorded; the method is not timed)
            log.error(f"model check: {name}", err)
            print(f"  model check: {name}: {describe(err)}")
            continue
        index = batch.padded_index if name == PAD else batch.packed_index
        outs[name] = (real_tokens(o.logits, index, False), o.loss)
        used = next((k for k, n in calls.items() if n), "sdpa")
        ran[name] = KERNELS[used][0] if name.startswith("mmpt") else f"hf {impl}"
    ref = outs.pop(PAD, None)
    for name, (logits, loss) in outs.items():
        ok = ref is not None and log.check(
            compare("model", f"{name} vs {PAD}: logits", logits, ref[0], tol)
        )
        ok = ok and log.check(compare("model", f"{name} vs {PAD}: loss", loss, ref[1], tol))
        if not ok:
            print(f"  model check FAILED: {name} (not timed)")
            ran.pop(name)
    return ran


def bench_model(a: argparse.Namespace, log: ResultLog) -> None:
    """Build the model, check every method, time fwd+bwd; rows go to ``log``."""
    cfg = model_config(a.model_config, a.max_seq_len)
    dev = a.device
    a.usable = usable_backends(a.backends, dev, log, "model")
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(Path(tmp))
        lengths = draw_lengths(a.model_rows, a.max_seq_len, a.seed, a.pair_frac, a.doc_frac)
        batch = make_batch(lengths, a.max_seq_len, int(cfg["vocab_size"]), a.seed)
        packed, padded = model_inputs(batch, dev)
        check_dtype = a.check_dtype or a.dtype
        llm = build_llm(cfg, tok, check_dtype, a)
        n_params = sum(p.numel() for p in llm.parameters())
        log.data["model"] = {
            "config": cfg,
            "params": n_params,
            "rows": batch.rows,
            "samples": len(batch.lengths),
            "lengths": batch.lengths,
            "padded_shape": list(padded["input_ids"].shape),
            "check_dtype": short(check_dtype),
        }
        print(
            f"\n[model] {cfg['model_type']} {n_params / 1e6:.1f}M params, {a.dtype_name}, "
            f"fwd+bwd with labels; {len(batch.lengths)} samples in {batch.rows} row(s), "
            f"{batch.real_tokens} real tokens"
        )
        todo = methods(a, log, packed, padded)
        ran = check(llm, batch, todo, a, log)
        if check_dtype != a.dtype:
            del llm
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            llm = build_llm(cfg, tok, a.dtype, a)
        todo = {k: v for k, v in todo.items() if k in ran or k == PAD}
        ran.setdefault(PAD, "hf sdpa + attention_mask")

        def step(name: str) -> Callable[[], None]:
            return lambda: llm(**todo[name][1]).loss.backward()

        def setup(name: str) -> Callable[[], None]:
            def run() -> None:
                llm.zero_grad(set_to_none=True)
                llm.model.set_attn_implementation(todo[name][0])

            return run

        timings = time_methods(
            {k: step(k) for k in todo}, a.steps, a.warmup, dev, {k: setup(k) for k in todo}
        )
        cuda = dev.type == "cuda"
        log.results(result_rows("model", "fwd+bwd", timings, ran, batch.real_tokens, PAD, cuda))
        llm.zero_grad(set_to_none=True)
