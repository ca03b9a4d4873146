"""SDPA on length buckets: equal to the dense block-diagonal mask, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from mmpt.models.attention import _dense_mask
from mmpt.models.attn_buckets import bucket_plan, bucketed_sdpa

# Two rows of 24: lengths 9, 1, 14 | 3, 3, 13, 5: several buckets, padded and unpadded.
CU = torch.tensor([0, 9, 10, 24, 27, 30, 43, 48], dtype=torch.int32)


def dense(q, k, v, causal):
    b, hq, t, _ = q.shape
    mask = _dense_mask(CU, b, t, t, causal, None, q.device)
    gqa = hq != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)


def test_plan_buckets_every_token_once():
    plan = bucket_plan(CU, 2, 24)
    assert len(plan.buckets) > 2 and any(b.valid is not None for b in plan.buckets)
    real = torch.cat(
        [b.index[b.valid] if b.valid is not None else b.index.flatten() for b in plan.buckets]
    )
    assert sorted(real.tolist()) == list(range(48))
    assert torch.equal(real[plan.unpermute], torch.arange(48))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_bucketed_equals_dense_mask_with_gradients(causal, heads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, h, 24, 8, generator=g, requires_grad=True)
        for h in (heads[0], *heads[1:] * 2)
    )
    w = torch.randn(2, heads[0], 24, 8, generator=g)
    out = bucketed_sdpa(q, k, v, CU, causal)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = dense(q, k, v, causal)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_bad_offsets_are_refused():
    q = torch.randn(2, 2, 24, 8)
    with pytest.raises(ValueError, match="row start"):
        bucketed_sdpa(q, q, q, torch.tensor([0, 20, 48], dtype=torch.int32))
