"""What mmpt hands to xformers, checked on the CPU against xformers' own mask and op tables.

xformers has no CPU kernels, but its attention biases materialize on the CPU and its
dispatcher picks operators from tables (``SUPPORTED_DEVICES``, ``SUPPORTS_BMGHK``,
``not_supported_reasons``). With the CUDA operators made to accept the CPU device, the same
dispatch that ``memory_efficient_attention`` runs on a GPU shows whether a backward operator
exists for mmpt's layout: the check that failed in the field for GQA in BMGHK.
"""

from __future__ import annotations

import pytest
import torch

from mmpt.models.attention import _dense_mask, packed_attention
from mmpt.models.attn_xformers import extension_load_error, xformers_bias, xformers_layout

xops = pytest.importorskip("xformers.ops", reason="xformers not installed (pip install mmpt[gpu])")
from xformers.ops import fmha  # noqa: E402
from xformers.ops.fmha import attn_bias as xbias  # noqa: E402
from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None, reason="xformers' CUDA op tables are used with a CUDA torch build"
)
CU = [0, 3, 8, 9, 16]  # two rows of 8: segments 3, 5 | 1, 7
B, T = 2, 8


def qkv(hq: int, hkv: int, d: int = 64, dtype=torch.float16, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(B, h, T, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]
    return [x.requires_grad_(grad) for x in out]


@pytest.fixture
def ops_accept_cpu(monkeypatch):
    """xformers' CUDA operators as they stand on a GPU machine, but accepting CPU tensors."""
    ops = [fmha.flash3, fmha.flash, fmha.cutlass]
    for op in [m.FwOp for m in ops] + [m.BwOp for m in ops]:
        monkeypatch.setattr(op, "SUPPORTED_DEVICES", {"cuda", "cpu"})
        monkeypatch.setattr(op, "is_available", classmethod(lambda cls: True))


@pytest.mark.parametrize("causal", [True, False])
def test_xformers_mask_equals_mmpt_sdpa_mask(causal):
    cu = torch.tensor(CU, dtype=torch.int32)
    bias = xformers_bias(cu, B, T, causal, torch.device("cpu"))
    kind = xbias.BlockDiagonalCausalMask if causal else xbias.BlockDiagonalMask
    assert type(bias) is kind
    allowed = bias.materialize((B * T, B * T)) == 0  # xformers: 0 = attend, -inf = not
    flat = _dense_mask(cu, 1, B * T, B * T, causal, None, torch.device("cpu"))[0, 0]
    assert torch.equal(allowed, flat)
    rows = _dense_mask(cu, B, T, T, causal, None, torch.device("cpu"))[:, 0]  # what SDPA gets
    for r in range(B):
        block = allowed[r * T : (r + 1) * T]
        assert torch.equal(block[:, r * T : (r + 1) * T], rows[r])
        assert not block[:, : r * T].any() and not block[:, (r + 1) * T :].any()
    assert not torch.equal(allowed, torch.ones_like(allowed).tril())  # not plain causal


def inputs(q, k, v):
    cu = torch.tensor(CU, dtype=torch.int32)
    bias = xformers_bias(cu, B, T, True, torch.device("cpu"))
    inp = fmha.Inputs(*xformers_layout(q, k, v, packed=True), attn_bias=bias, p=0.0)
    inp.validate_inputs()
    return inp


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_training_layout_has_a_backward_op(ops_accept_cpu, heads):
    inp = inputs(*qkv(*heads, grad=True))
    assert inp.query.ndim == inp.key.ndim == 4  # BMHK
    assert inp.query.shape == inp.key.shape == (1, B * T, heads[0], 64)
    # what _fMHA.forward does with gradients: pick the forward op, then the matching backward
    op_fw = _dispatch_fw(inp, True)
    op_bw = _dispatch_bw(inp, varlen_lse_packed=op_fw.VARLEN_LSE_PACKED)
    assert not op_bw.SUPPORTS_BMGHK and op_bw.not_supported_reasons(inp) == []


def test_bmghk_gqa_has_no_backward_op(ops_accept_cpu):
    """The layout mmpt used to hand over for GQA: forward-only, training raised."""
    q, k, v = (x.transpose(1, 2).reshape(1, B * T, x.shape[1], 64) for x in qkv(8, 2))
    q = q.unflatten(2, (2, 4))
    k, v = (x.unsqueeze(3).expand(1, B * T, 2, 4, 64) for x in (k, v))
    bias = xformers_bias(torch.tensor(CU, dtype=torch.int32), B, T, True, torch.device("cpu"))
    inp = fmha.Inputs(q, k, v, attn_bias=bias, p=0.0)
    op_fw = _dispatch_fw(inp, True)
    for packed in (True, False):
        with pytest.raises(NotImplementedError, match="BMGHK"):
            _dispatch_bw(inp, varlen_lse_packed=packed)
    assert op_fw.SUPPORTS_BMGHK  # forward alone is fine


def test_inference_gqa_keeps_broadcast_kv(ops_accept_cpu):
    inp = inputs(*qkv(8, 2))
    assert inp.query.shape == (1, B * T, 2, 4, 64) and inp.key.stride(3) == 0  # BMGHK
    assert _dispatch_fw(inp, False).not_supported_reasons(inp) == []


def reference(q, k, v, bias):
    """xformers' semantics in plain torch: softmax(q k^T * scale + bias) v per head."""
    n = q.shape[1]
    mask = bias.materialize((n, n))
    heads = "ghd" if q.ndim == 5 else "hd"
    h = heads[:-1]
    s = torch.einsum(f"bm{heads},bn{heads}->b{h}mn", q, k) * q.shape[-1] ** -0.5 + mask
    return torch.einsum(f"b{h}mn,bn{heads}->bm{heads}", s.softmax(-1), v)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_xformers_semantics_on_mmpt_layout_equal_packed_sdpa(grad, heads):
    q, k, v = qkv(*heads, d=16, dtype=torch.float32, grad=grad)
    inp = inputs(q, k, v)
    out = reference(inp.query, inp.key, inp.value, inp.attn_bias)
    out = out.reshape(B, T, heads[0], 16).transpose(1, 2)  # as xformers_attention reshapes
    cu = torch.tensor(CU, dtype=torch.int32)
    ref = packed_attention(q, k, v, cu, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(grads, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_extension_load_error_names_the_cause():
    from xformers import _cpp_lib

    err = extension_load_error()
    assert (err is None) == bool(_cpp_lib._built_with_cuda)
    if err is not None:  # e.g. "libcudart.so.12: cannot open shared object file" here
        assert "xFormers can't load" not in err  # the cause, not xformers' wrapper


def test_usability_probe_runs_under_inference_mode(monkeypatch):
    """The first packed call may come from validation (inference_mode) or autocast."""
    from mmpt.models import attn_xformers

    def needs_grad(q, k, v, attn_bias=None):  # a stand-in kernel that checks what it gets
        assert q.requires_grad and torch.is_grad_enabled()
        return (q * k).sum(-1, keepdim=True) * v

    monkeypatch.setattr(attn_xformers.xops, "memory_efficient_attention", needs_grad)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn_xformers._probe(torch.device("cpu")) is None

    def refuses(q, k, v, attn_bias=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(attn_xformers.xops, "memory_efficient_attention", refuses)
    assert "No operator found" in attn_xformers._probe(torch.device("cpu"))
