"""The four batchings that ``bench_packing.py`` times, each as a list of model kwargs.

- pad-to-longest in stream order (what HF's default collator does);
- pad-to-longest in HF's ``group_by_length`` order (``get_length_grouped_indices``, the
  Trainer's ``LengthGroupedSampler``);
- HF's ``DataCollatorWithFlattening``: each batch of samples concatenated into one row with
  restarting ``position_ids``, no padding (transformers' SDPA path turns the restarts into
  a block-diagonal mask when ``attention_mask`` is None and no cache is made);
- mmpt's ``pack_stream`` rows of ``max_len`` through ``register_packed_attention``.
"""

from __future__ import annotations

import time

import torch
from transformers import DataCollatorWithFlattening
from transformers.trainer_pt_utils import get_length_grouped_indices

from mmpt.datamodules.packing import IGNORE_INDEX, collate_packed, pack_stream
from mmpt.models.attention import hf_packing_kwargs


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    """Random token samples of the given lengths, labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def grouped_order(lengths: list[int], batch: int, mega_batch_mult: int | None, seed: int) -> list:
    """HF Trainer's ``group_by_length`` sample order (random megabatches sorted by length)."""
    g = torch.Generator().manual_seed(seed)
    return get_length_grouped_indices(lengths, batch, mega_batch_mult, generator=g)


def batches_of(order: list[int], batch: int) -> list[list[int]]:
    """Consecutive batches of ``batch`` indices."""
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def padded_steps(samples: list[dict], batches: list[list[int]], max_len: int) -> list[dict]:
    """Right-padded batches with an ``attention_mask`` (pad id 0, pad labels ignored)."""
    out = []
    for b in batches:
        ids = [samples[i]["input_ids"][:max_len] for i in b]
        t = max(len(x) for x in ids)
        step = {
            "input_ids": torch.zeros(len(b), t, dtype=torch.long),
            "attention_mask": torch.zeros(len(b), t, dtype=torch.long),
            "labels": torch.full((len(b), t), IGNORE_INDEX, dtype=torch.long),
        }
        for r, x in enumerate(ids):
            step["input_ids"][r, : len(x)] = x
            step["attention_mask"][r, : len(x)] = 1
            step["labels"][r, : len(x)] = x
        out.append(step)
    return out


def flattened_steps(samples: list[dict], batches: list[list[int]], max_len: int) -> list[dict]:
    """HF ``DataCollatorWithFlattening`` batches: one row per batch, restarting positions."""
    collate = DataCollatorWithFlattening()
    out = []
    for b in batches:
        feats = [
            {
                "input_ids": samples[i]["input_ids"][:max_len].tolist(),
                "labels": samples[i]["labels"][:max_len].tolist(),
            }
            for i in b
        ]
        out.append(dict(collate(feats)))
    return out


def packed_rows(samples: list[dict], max_len: int, buffer: int) -> list[dict]:
    """mmpt ``pack_stream`` rows (pad id 0)."""
    return list(pack_stream(iter(samples), max_len, pad_id=0, buffer_size=buffer))


def packed_steps(rows: list[dict], rows_per_step: int) -> list[dict]:
    """mmpt ``collate_packed`` steps with the varlen kwargs of ``hf_packing_kwargs``."""
    out = []
    for i in range(0, len(rows), rows_per_step):
        batch = collate_packed(rows[i : i + rows_per_step])
        out.append(
            {
                "input_ids": batch["input_ids"],
                "position_ids": batch["position_ids"],
                "labels": batch["labels"],
                **hf_packing_kwargs(batch["cu_seqlens"], batch["max_seqlen"]),
            }
        )
    return out


def real_tokens(steps: list[dict]) -> int:
    """Tokens that are not padding (ignored labels count; only pads do not)."""
    n = 0
    for s in steps:
        if "attention_mask" in s:
            n += int(s["attention_mask"].sum())
        elif "cu_seq_lens_q" in s:  # mmpt rows: the pad tail has pad id 0 and ignored labels
            n += int(((s["input_ids"] != 0) | (s["labels"] != IGNORE_INDEX)).sum())
        else:
            n += s["input_ids"].numel()
    return n


def run_epoch(model: torch.nn.Module, steps: list[dict]) -> float:
    """Seconds of forward + backward over ``steps``, without a KV cache.

    ``use_cache=False`` matters: with a cache object, transformers does not look for restarts
    in ``position_ids`` and the flattened rows would attend across samples.
    """
    t0 = time.perf_counter()
    for kwargs in steps:
        model.zero_grad(set_to_none=True)
        model(**kwargs, use_cache=False).loss.backward()
    return time.perf_counter() - t0


def token_loss(model: torch.nn.Module, steps: list[dict], impl: str) -> tuple[float, int]:
    """Mean loss per predicted token over all steps, and the number of predicted tokens."""
    model.set_attn_implementation(impl)
    parts: list = []
    with torch.no_grad():
        for kwargs in steps:
            loss = model(**kwargs, use_cache=False).loss
            n = int((kwargs["labels"][:, 1:] != IGNORE_INDEX).sum())
            parts.append((loss.item() * n, n))
    total = sum(n for _, n in parts)
    return sum(s for s, _ in parts) / total, total


def register_dense_packed() -> str:
    """An HF attention implementation of mmpt's previous CPU path: SDPA, dense block mask.

    It reads the same ``cu_seq_lens_q`` as ``mmpt_packed`` and masks the full T x T scores of
    every row to its block diagonal (what ``packed_attention`` did before the length buckets),
    so the bench can show what the buckets save.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    from mmpt.models.attention import _dense_mask

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        b, hq, t, _ = query.shape
        cu = kw["cu_seq_lens_q"]
        mask = _dense_mask(cu, b, t, t, True, None, query.device)
        gqa = hq != key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, mask, dropout, scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2), None

    AttentionInterface.register("bench_dense_packed", attend)
    AttentionMaskInterface.register("bench_dense_packed", lambda *a, **k: None)
    return "bench_dense_packed"
