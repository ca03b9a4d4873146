"""Attention backends: packed == each sample alone per backend; auto's rule; YAML wiring."""

from __future__ import annotations

import pytest
import torch

from mmpt.datamodules.packing import pack_sequences
from mmpt.models import attention
from mmpt.models.attention import (
    hf_packing_kwargs,
    packed_attention,
    register_packed_attention,
    resolve_backend,
)
from mmpt.models.llm import CausalLM
from tests.test_attention import per_segment, qkv, samples, split_rows
from tests.test_llm import tiny_config, write_tokenizer

CU_1ROW = [0, 5, 6, 13]
CU_2ROWS = [0, 3, 8, 9, 16]  # row 2: segments of 1 and 7
CPU = torch.device("cpu")


def cu_for(b: int) -> torch.Tensor:
    return torch.tensor(CU_1ROW if b == 1 else CU_2ROWS, dtype=torch.int32)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("b", [1, 2])
def test_backend_forward_matches_segments_alone(backend, causal, heads, b):
    q, k, v = qkv(13 if b == 1 else 8, b=b, hq=heads[0], hkv=heads[1])
    cu = cu_for(b)
    with torch.no_grad():  # FlexAttention runs forward-only on CPU
        out = packed_attention(q, k, v, cu, causal=causal, backend=backend)
    ref = per_segment(q, k, v, cu, causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_sdpa_backend_gradients_match_segments_alone(heads):
    q, k, v = (x.requires_grad_() for x in qkv(8, b=2, hq=heads[0], hkv=heads[1]))
    cu = cu_for(2)
    grad = torch.randn(2, heads[0], 8, 8, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(packed_attention(q, k, v, cu, backend="sdpa"), (q, k, v), grad)
    ref = torch.autograd.grad(per_segment(q, k, v, cu), (q, k, v), grad)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_flex_without_cuda_backward_falls_back_to_sdpa():
    q, k, v = (x.requires_grad_() for x in qkv(13))
    cu = cu_for(1)
    out = packed_attention(q, k, v, cu, backend="flex")  # would raise in torch's flex on CPU
    out.sum().backward()
    torch.testing.assert_close(out, per_segment(q, k, v, cu))


def test_flex_rejects_dropout():
    from mmpt.models.attn_flex import flex_packed_attention

    q, k, v = qkv(13)
    with pytest.raises(ValueError, match="attn_backend: flex"):
        flex_packed_attention(q, k, v, cu_for(1), True, None, 0.1)


# ------------------------------------------------------------------------- auto's rule


@pytest.fixture
def fresh_resolution(monkeypatch):
    monkeypatch.setattr(attention, "_RESOLVED", {})


def test_auto_on_cpu_is_sdpa_and_unknown_names_fail(fresh_resolution):
    assert resolve_backend("auto", CPU) == "sdpa"
    assert resolve_backend("sdpa", CPU) == "sdpa"
    assert resolve_backend("flex", CPU) == "flex"  # forward eagerly, see the fallback test
    assert resolve_backend("xformers", CPU) == "sdpa"  # no CPU kernels: SDPA
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        resolve_backend("flash", CPU)


@pytest.mark.parametrize(
    ("xformers_reason", "expected"), [(None, "xformers"), ("built for another torch", "flex")]
)
def test_auto_on_cuda_takes_the_first_usable(
    monkeypatch, fresh_resolution, xformers_reason, expected
):
    monkeypatch.setattr(attention, "xformers_unusable_reason", lambda device: xformers_reason)
    assert resolve_backend("auto", torch.device("cuda")) == expected


def test_auto_resolving_to_flex_runs_dropout_through_sdpa(monkeypatch):
    """flex has no dropout: ``auto`` (flex where xformers is unusable) must not crash a model
    with attention dropout; an explicit ``flex`` still refuses it."""
    monkeypatch.setattr(attention, "resolve_backend", lambda backend, device: "flex")
    called = []
    monkeypatch.setattr(attention, "flex_packed_attention", lambda *a, **k: called.append(1))
    q, k, v = qkv(13)  # one row of CU_1ROW's 13 tokens
    cu = cu_for(1)
    out = packed_attention(q, k, v, cu, dropout=0.1, backend="auto")
    assert out.shape == q.shape and not called
    packed_attention(q, k, v, cu, dropout=0.1, backend="flex")
    assert called == [1]


def test_explicit_xformers_that_cannot_run_on_cuda_is_a_clear_error(monkeypatch, fresh_resolution):
    monkeypatch.setattr(attention, "xformers_unusable_reason", lambda device: "no CUDA build")
    with pytest.raises(ValueError, match="attn_backend: xformers cannot run: no CUDA build"):
        resolve_backend("xformers", torch.device("cuda"))


# ------------------------------------------------------------------------- YAML wiring


def test_register_names_per_backend_and_vlm_check():
    assert register_packed_attention() == "mmpt_packed"
    assert register_packed_attention(backend="flex") == "mmpt_packed_flex"
    assert attention.is_packed_implementation("mmpt_packed_xformers")
    assert not attention.is_packed_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        register_packed_attention(backend="eager")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_llm(tok_dir, backend: str) -> CausalLM:
    torch.manual_seed(0)
    config = {**tiny_config(vocab_size=128), "initializer_range": 0.1}
    return CausalLM(config=config, tokenizer=str(tok_dir), attn_backend=backend)


def test_causal_lm_attn_backend_validation(tok_dir):
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        tiny_llm(tok_dir, "fast")
    with pytest.raises(ValueError, match="needs .*attn_implementation: packed"):
        CausalLM(
            config=tiny_config(vocab_size=128),
            tokenizer=str(tok_dir),
            attn_implementation="sdpa",
            attn_backend="flex",
        )


def packed_kwargs(seqs):
    batch = pack_sequences(seqs, max_len=9, pad_id=0)
    kwargs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
        **hf_packing_kwargs(batch["cu_seqlens"], batch["max_seqlen"]),
    }
    return batch, kwargs


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_causal_lm_backend_packed_logits_equal_samples_alone(tok_dir, backend, monkeypatch):
    llm = tiny_llm(tok_dir, backend).eval()
    assert llm.model.config._attn_implementation == f"mmpt_packed_{backend}"
    calls = []
    inner = attention.flex_packed_attention
    monkeypatch.setattr(attention, "flex_packed_attention", lambda *a: calls.append(1) or inner(*a))
    seqs = samples()
    batch, kwargs = packed_kwargs(seqs)
    with torch.no_grad():
        got = split_rows(llm(**kwargs).logits, batch, seqs)
    assert len(calls) == (len(llm.decoder_layers) if backend == "flex" else 0)
    llm.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = [llm(input_ids=s["input_ids"][None]).logits[0] for s in seqs]
    for packed, ref in zip(got, alone, strict=True):
        torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)


def test_causal_lm_sdpa_backend_gradients_equal_samples_alone(tok_dir):
    from tests.test_gpu import packed_and_solo_grads

    llm = tiny_llm(tok_dir, "sdpa").train()
    seqs = samples()
    batch, kwargs = packed_kwargs(seqs)
    kwargs["labels"] = batch["labels"]
    packed, solo = packed_and_solo_grads(llm, seqs, kwargs, device="cpu")
    assert solo.norm() > 0
    torch.testing.assert_close(packed, solo, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- on the GPU

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def usable(backend: str) -> pytest.MarkDecorator:
    why = None
    if torch.cuda.is_available():
        why = attention.unusable_reason(backend, torch.device("cuda"))
    return pytest.mark.skipif(why is not None, reason=str(why))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize(
    "backend", [pytest.param("xformers", marks=usable("xformers")), "flex", "sdpa"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_backend_gradients_match_segments_alone_on_cuda(backend, dtype, heads):
    q, k, v = qkv(64, b=2, hq=heads[0], hkv=heads[1], d=64, device="cuda", dtype=dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cu = torch.tensor([0, 30, 31, 64, 100, 128], dtype=torch.int32, device="cuda")
    g = torch.randn(q.shape, device="cuda", dtype=dtype)
    out = packed_attention(q, k, v, cu, backend=backend)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out = per_segment(*ref_in, cu)
    ref = torch.autograd.grad(ref_out, ref_in, g.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a.float(), r, atol=tol * 2, rtol=tol * 2)
