"""Packed attention: packed forward == each sample alone (SDPA on CPU, xformers as a gpu test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from mmpt.datamodules.packing import pack_sequences
from mmpt.models import attention
from mmpt.models.attention import (
    cu_seqlens_from_position_ids,
    hf_packing_kwargs,
    packed_attention,
    register_packed_attention,
)

LENGTHS = [5, 1, 7]  # a segment of length 1 included
IMPL = register_packed_attention()


def qkv(t: int, b: int = 1, hq: int = 4, hkv: int = 2, d: int = 8, **kw):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, t, d, generator=g, **kw) for h in (hq, hkv, hkv)]


def per_segment(q, k, v, cu, causal=True):
    """Reference: every segment of the flattened rows alone through SDPA."""
    b, hq, t, d = q.shape
    flat = [x.transpose(1, 2).reshape(1, b * t, x.shape[1], d).transpose(1, 2) for x in (q, k, v)]
    cu = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            *(x[:, :, s:e] for x in flat), is_causal=causal, enable_gqa=hq != k.shape[1]
        )
        for s, e in zip(cu[:-1], cu[1:], strict=True)
    ]
    return torch.cat(outs, 2).transpose(1, 2).reshape(b, t, hq, d).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_packed_attention_matches_segments_alone(causal, heads):
    q, k, v = qkv(sum(LENGTHS), hq=heads[0], hkv=heads[1])
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    out = packed_attention(q, k, v, cu, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, per_segment(q, k, v, cu, causal), atol=1e-6, rtol=1e-5)


def test_packed_attention_flat_cu_seqlens_over_several_rows():
    q, k, v = qkv(8, b=2)
    cu = torch.tensor([0, 3, 8, 9, 16], dtype=torch.int32)  # row 2: segments of 1 and 7
    torch.testing.assert_close(packed_attention(q, k, v, cu), per_segment(q, k, v, cu))


def test_plain_causal_over_a_packed_row_leaks_between_samples():
    q, k, v = qkv(sum(LENGTHS))
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    diff = (packed_attention(q, k, v, None) - per_segment(q, k, v, cu)).abs().amax(dim=(0, 1, 3))
    assert diff[:5].max() < 1e-6  # the first sample sees nothing else either way
    assert diff[5:].min() > 1e-3  # every later token attended to earlier samples


def test_cu_seqlens_from_position_ids_and_validation():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6, 8, 12]
    q, k, v = qkv(6, b=2)
    with pytest.raises(ValueError, match="row start"):  # a segment across rows
        packed_attention(q, k, v, torch.tensor([0, 4, 12], dtype=torch.int32))


def test_padding_mask_and_decoding_with_a_cache():
    q, k, v = qkv(6, b=2)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ref_mask = torch.ones(6, 6, dtype=torch.bool).tril() & keep[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, ref_mask, enable_gqa=True)
    out = packed_attention(q, k, v, key_padding_mask=keep)
    torch.testing.assert_close(out[1, :, 2:], ref[1, :, 2:])  # real queries of the padded row
    torch.testing.assert_close(out[0], ref[0])
    last = packed_attention(q[:, :, -1:], k, v)  # one new query against 6 cached keys
    torch.testing.assert_close(last, packed_attention(q, k, v)[:, :, -1:])
    window = packed_attention(q, k, v, sliding_window=2)
    near = torch.ones(6, 6, dtype=torch.bool).tril().triu(-1)  # itself and one back
    ref = F.scaled_dot_product_attention(q, k, v, near, enable_gqa=True)
    torch.testing.assert_close(window, ref)
    wide = packed_attention(q, k, v, sliding_window=6)  # cannot bind: plain causal
    torch.testing.assert_close(wide, packed_attention(q, k, v))


def test_hf_entry_reads_cu_seq_lens_kwargs_and_position_ids():
    q, k, v = qkv(sum(LENGTHS))
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    module = torch.nn.Module()
    ref = per_segment(q, k, v, cu).transpose(1, 2)
    out, _ = attention._hf_attention(module, q, k, v, None, **hf_packing_kwargs(cu, 7))
    torch.testing.assert_close(out, ref)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    out, _ = attention._hf_attention(module, q, k, v, None, position_ids=pos)
    torch.testing.assert_close(out, ref)


def tiny_model(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def samples(lengths=(5, 1, 7, 4)):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(0, 128, (n,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def packed_logits(model, batch, mode: str) -> torch.Tensor:
    kwargs = {"position_ids": batch["position_ids"]}
    if mode == "cu_seqlens":
        kwargs.update(hf_packing_kwargs(batch["cu_seqlens"], batch["max_seqlen"]))
    with torch.no_grad():
        return model(batch["input_ids"], **kwargs).logits


def solo_logits(model, seqs) -> list[torch.Tensor]:
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return [model(s["input_ids"][None]).logits[0] for s in seqs]


def split_rows(logits, batch, seqs):
    """Per input sample: its logits inside the packed rows."""
    out = {}
    for r, row in enumerate(batch["bins"]):
        start = 0
        for i in row:
            n = len(seqs[i]["input_ids"])
            out[i] = logits[r, start : start + n]
            start += n
    return [out[i] for i in range(len(seqs))]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["cu_seqlens", "position_ids"])
def test_packed_model_forward_equals_unpacked(family, mode):
    model, seqs = tiny_model(family), samples()
    batch = pack_sequences(seqs, max_len=9, pad_id=0)  # 17 tokens -> 2 rows of 9
    assert batch["input_ids"].shape == (2, 9)
    model.set_attn_implementation(IMPL)
    got = split_rows(packed_logits(model, batch, mode), batch, seqs)
    for packed, alone in zip(got, solo_logits(model, seqs), strict=True):
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_packed_loss_equals_token_weighted_unpacked_loss():
    model, seqs = tiny_model("qwen2"), samples()
    batch = pack_sequences(seqs, max_len=9, pad_id=0)
    model.set_attn_implementation(IMPL)
    kwargs = hf_packing_kwargs(batch["cu_seqlens"], batch["max_seqlen"])
    with torch.no_grad():
        loss = model(
            batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], **kwargs
        ).loss
        model.set_attn_implementation("sdpa")
        parts = [
            (model(s["input_ids"][None], labels=s["labels"][None]).loss, len(s["input_ids"]) - 1)
            for s in seqs
            if len(s["input_ids"]) > 1  # a 1-token sample has no target
        ]
    expected = sum(part * n for part, n in parts) / sum(n for _, n in parts)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_without_block_diagonal_mask_later_samples_differ():
    """The Open-Qwen2VL flaw: restarting positions but one causal mask over the whole row."""
    model, seqs = tiny_model("qwen2"), samples(LENGTHS)
    batch = pack_sequences(seqs, max_len=13, pad_id=0)
    causal = torch.ones(13, 13, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        flawed = model(
            batch["input_ids"], position_ids=batch["position_ids"], attention_mask=causal
        ).logits
    got = split_rows(flawed, batch, seqs)
    alone = solo_logits(model, seqs)
    first, *later = batch["bins"][0]
    torch.testing.assert_close(got[first], alone[first], atol=1e-5, rtol=1e-5)
    for i in later:
        assert (got[i] - alone[i]).abs().max() > 1e-3


def test_from_pretrained_with_registered_implementation(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=IMPL)
    assert model.config._attn_implementation == IMPL
    seqs = samples()
    batch = pack_sequences(seqs, max_len=9, pad_id=0)
    got = split_rows(packed_logits(model.eval(), batch, "cu_seqlens"), batch, seqs)
    torch.testing.assert_close(got[1], solo_logits(model, seqs)[1], atol=1e-5, rtol=1e-5)


needs_xformers = pytest.mark.skipif(
    not torch.cuda.is_available()
    or attention.unusable_reason("xformers", torch.device("cuda")) is not None,
    reason="needs CUDA + a usable xformers",
)


@pytest.mark.gpu
@needs_xformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("b", [1, 2])
def test_xformers_path_matches_sdpa(dtype, heads, b):
    q, k, v = qkv(64, b=b, hq=heads[0], hkv=heads[1], d=64, device="cuda", dtype=dtype)
    cu = [0, 30, 31, 64] if b == 1 else [0, 30, 31, 64, 100, 128]
    cu = torch.tensor(cu, dtype=torch.int32, device="cuda")
    out = packed_attention(q, k, v, cu)
    ref = per_segment(q.float(), k.float(), v.float(), cu)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_xformers
def test_xformers_packed_model_forward_equals_unpacked():
    model, seqs = tiny_model("qwen2").cuda(), samples()
    batch = pack_sequences(seqs, max_len=9, pad_id=0)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.set_attn_implementation(IMPL)
    got = split_rows(packed_logits(model, batch, "cu_seqlens"), batch, seqs)
    alone = solo_logits(model, [{"input_ids": s["input_ids"].cuda()} for s in seqs])
    for packed, ref in zip(got, alone, strict=True):
        torch.testing.assert_close(packed, ref, atol=1e-4, rtol=1e-4)


def test_mixed_qkv_dtypes_are_unified_for_the_kernel():
    """Under bf16 autocast HF's rotary gives fp32 q/k and bf16 v: all run in bf16."""
    from mmpt.models.attention import _common_dtype

    q = torch.randn(1, 2, 4, 8)
    v = q.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in _common_dtype(q, q, v)} == {torch.bfloat16}
    assert {t.dtype for t in _common_dtype(q, q, v)} == {torch.float32}
    assert all(a is b for a, b in zip(_common_dtype(q, q, q), (q, q, q), strict=True))


def test_the_segment_memo_works_under_inference_mode():
    """Inference tensors have no version counter; the memo keys them on identity alone."""
    from mmpt.models.attn_segments import Memo

    memo, built = Memo(), []
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        assert memo.get(cu, ("k",), lambda: built.append(1) or len(built)) == 1
        assert memo.get(cu, ("k",), lambda: built.append(1) or len(built)) == 1  # shared
        other = torch.tensor([0, 3, 8], dtype=torch.int32)
        assert memo.get(other, ("k",), lambda: built.append(1) or len(built)) == 2
    plain = torch.tensor([0, 8], dtype=torch.int32)
    assert memo.get(plain, (), lambda: "a") == "a"
    plain.add_(0)  # an in-place edit of a normal tensor rebuilds
    assert memo.get(plain, (), lambda: "b") == "b"
