"""ClipLoss and SigLipLoss against direct formulas, plus temperature handling (single process)."""

from __future__ import annotations

import math

import pytest
import torch

from mmpt.models.losses import ClipLoss, SigLipLoss, gather_with_grad
from mmpt.models.losses.gather import world_info

B, D = 6, 16


def _features(seed: int, n: int = B, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = img + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)


def _similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    # Written out element-wise on purpose: sim[i, j] = sum_k img[i, k] * txt[j, k].
    return (img[:, None, :] * txt[None, :, :]).sum(-1)


def direct_clip(img, txt, logit_scale):
    logits = logit_scale.exp() * _similarity(img, txt)
    diag = torch.stack([logits[i, i] for i in range(logits.shape[0])])
    row_lse = torch.log(torch.exp(logits).sum(dim=1))  # image -> all texts
    col_lse = torch.log(torch.exp(logits).sum(dim=0))  # text -> all images
    return ((row_lse - diag).mean() + (col_lse - diag).mean()) / 2


def direct_siglip(img, txt, logit_scale, bias):
    logits = logit_scale.exp() * _similarity(img, txt) + bias
    n = logits.shape[0]
    z = -torch.ones(n, n, dtype=logits.dtype)
    for i in range(n):
        z[i, i] = 1.0
    return torch.log1p(torch.exp(-z * logits)).sum() / n  # -logsigmoid(x) = log(1 + e^-x)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("init_logit_scale", [math.log(1 / 0.07), math.log(2.0)])
def test_clip_matches_direct_formula(init_logit_scale):
    img, txt = _features(0)
    module = ClipLoss(init_logit_scale=init_logit_scale).double()
    mi, mt = _leaves(img, txt)
    loss = module(mi, mt)
    loss.backward()

    ri, rt, rs = _leaves(img, txt, module.logit_scale)
    assert rs.item() == pytest.approx(init_logit_scale)
    ref = direct_clip(ri, rt, rs)
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mi.grad, ri.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mt.grad, rt.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.logit_scale.grad, rs.grad, rtol=1e-10, atol=1e-12)
    assert module.logit_scale.grad.abs() > 0


@pytest.mark.parametrize(("init_logit_scale", "init_bias"), [(math.log(10), -10.0), (1.0, -2.0)])
def test_siglip_matches_direct_formula(init_logit_scale, init_bias):
    img, txt = _features(1)
    module = SigLipLoss(init_logit_scale=init_logit_scale, init_bias=init_bias).double()
    mi, mt = _leaves(img, txt)
    loss = module(mi, mt)
    loss.backward()

    ri, rt, rs, rb = _leaves(img, txt, module.logit_scale, module.logit_bias)
    assert rs.item() == pytest.approx(init_logit_scale) and rb.item() == init_bias
    ref = direct_siglip(ri, rt, rs, rb)
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mi.grad, ri.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mt.grad, rt.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.logit_scale.grad, rs.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.logit_bias.grad, rb.grad, rtol=1e-10, atol=1e-12)
    assert module.logit_scale.grad.abs() > 0 and module.logit_bias.grad.abs() > 0


def test_default_initialisation():
    clip, sig = ClipLoss(), SigLipLoss()
    assert clip.scale.item() == pytest.approx(1 / 0.07)
    assert sig.scale.item() == pytest.approx(10.0)
    assert sig.logit_bias.item() == -10.0
    assert clip.max_logit_scale == sig.max_logit_scale == pytest.approx(math.log(100))


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_clamp_keeps_logit_scale_in_range(cls):
    module = cls()
    with torch.no_grad():
        module.logit_scale.fill_(10.0)
    module.clamp_()
    assert module.logit_scale.item() == pytest.approx(math.log(100))
    assert module.scale.item() == pytest.approx(100.0)
    assert module.logit_scale.requires_grad and not module.scale.requires_grad
    with torch.no_grad():
        module.logit_scale.fill_(-1.0)
    module.clamp_()
    assert module.logit_scale.item() == 0.0
    with torch.no_grad():
        module.logit_scale.fill_(2.0)
    module.clamp_()
    assert module.logit_scale.item() == 2.0


def test_clamp_after_gradient_step():
    module = ClipLoss(init_logit_scale=math.log(100) - 0.01).double()
    img, _ = _features(2, d=2)  # crowded 2-D pairs: a sharper softmax clearly helps
    module(img, img).backward()
    assert module.logit_scale.grad < -0.05
    with torch.no_grad():  # one plain SGD step, lr 1 (torch.optim's first use costs seconds)
        module.logit_scale -= module.logit_scale.grad
    assert module.logit_scale.item() > math.log(100)
    module.clamp_()
    assert module.logit_scale.item() == pytest.approx(math.log(100))


def test_frozen_scale_gets_no_gradient():
    module = ClipLoss(learnable_scale=False)
    img, txt = _features(3)
    mi = img.float().requires_grad_(True)
    module(mi, txt.float()).backward()
    assert not module.logit_scale.requires_grad and module.logit_scale.grad is None
    assert mi.grad is not None and mi.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_perfect_alignment_beats_random(cls):
    module = cls().double()
    aligned = torch.eye(B, D, dtype=torch.float64)  # orthonormal rows, text == image
    _, random_txt = _features(4)
    perfect = module(aligned, aligned)
    rand = module(aligned, random_txt)
    assert perfect.item() < rand.item()
    s = module.scale.item()
    if cls is ClipLoss:
        # Diagonal logits s, off-diagonal 0: each row's CE is log(1 + (B-1) e^-s).
        expected = math.log1p((B - 1) * math.exp(-s))
    else:
        # Diagonal logits s + b with label +1, off-diagonal b with label -1.
        b = module.logit_bias.item()
        expected = math.log1p(math.exp(-(s + b))) + (B - 1) * math.log1p(math.exp(b))
    assert perfect.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("module", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_shape_mismatch_raises(module):
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.randn(4, 8, 2), torch.randn(4, 8, 2))


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_logits_stay_fp32_under_autocast_and_half_inputs(cls):
    module = cls(init_logit_scale=math.log(100))
    img, txt = (t.float() for t in _features(5, n=32))
    ref = module(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = module(img, txt)
        half = module(img.bfloat16(), txt.bfloat16())
    assert auto.dtype == half.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half, module(img.bfloat16().float(), txt.bfloat16().float()))


def test_gather_is_identity_without_process_group():
    assert world_info() == (0, 1)
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
