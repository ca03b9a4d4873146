"""FIBER coarse stage on tiny CPU towers (ViT and Swin + BERT): dual-encoder parity at init,
cross-modal dependence once the gates open, ITM/MLM losses vs direct formulas, re-ranking."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmpt.batch import ImageTextBatch
from mmpt.eval.rerank import reranked_ranks
from mmpt.models.backbone_fusion import TextStream
from mmpt.models.encoders import HFTextTower, TimmVisionTower
from mmpt.models.fiber import FiberModule
from mmpt.models.fused_objectives import masked_lm_loss, matching_pairs
from mmpt.models.fusion_towers import vision_stack
from tests.helpers import write_tiny_bert

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "small", "big", "red", "blue"]
WORDS += ["square", "circle", "triangle", "left", "of", "right", "above", "below", "green", "a"]
CAPTIONS = ["the small red square", "a big blue circle left of the green triangle", "a circle"]
CAPTIONS += ["the green square above the red circle"]
VIT = {
    "model_name": "vit_tiny_patch16_224",
    "image_size": 32,
    "embed_dim": 16,
    "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
}
SWIN = {
    "model_name": "swin_tiny_patch4_window7_224",
    "image_size": 32,
    "embed_dim": 16,
    "model_kwargs": {
        "embed_dim": 16,
        "depths": (1, 2),
        "num_heads": (2, 2),
        "window_size": 4,
        "patch_size": 4,
    },
}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS))


def make_model(bert_dir: str, vision: dict | None = None, **kw: Any) -> FiberModule:
    torch.manual_seed(0)
    text = HFTextTower(bert_dir, embed_dim=16, context_length=12)
    kw.setdefault("fusion_layers", 2)
    return FiberModule(TimmVisionTower(**(vision or VIT)), text, **kw)


def make_batch(model: FiberModule, n: int = 4, seed: int = 1) -> ImageTextBatch:
    g = torch.Generator().manual_seed(seed)
    return ImageTextBatch(
        images=torch.randn(n, 3, 32, 32, generator=g),
        text_tokens=model.preprocess.tokenizer(CAPTIONS[:n]),
        text_to_image=torch.arange(n),
        keys=[f"{i:03d}" for i in range(n)],
    )


def open_gates(model: FiberModule, value: float = 0.5) -> None:
    with torch.no_grad():
        for gate in model.fusion.gates():
            gate.fill_(value)


@pytest.mark.parametrize("vision", [VIT, SWIN], ids=["vit", "swin"])
def test_fused_at_init_equals_dual_encoder_exactly(bert_dir: str, vision: dict) -> None:
    model = make_model(bert_dir, vision).eval()
    batch = make_batch(model)
    assert bool((batch.text_tokens == 0).any())  # padding: the mask path runs
    with torch.no_grad():
        img_ref, txt_ref = model.vision(batch.images), model.text(batch.text_tokens)
        for fuse in (False, True):
            img, txt, cls = model.encode_pairs(batch.images, batch.text_tokens, fuse=fuse)
            assert torch.equal(img, img_ref) and torch.equal(txt, txt_ref)
            assert cls.shape[0] == 4
        open_gates(model)
        img, txt, _ = model.encode_pairs(batch.images, batch.text_tokens, fuse=True)
        assert not torch.allclose(img, img_ref, atol=1e-4)  # the gates do change the towers
        assert not torch.allclose(txt, txt_ref, atol=1e-4)


@pytest.mark.parametrize("vision", [VIT, SWIN], ids=["vit", "swin"])
def test_open_gates_make_each_stream_depend_on_the_other(bert_dir: str, vision: dict) -> None:
    model = make_model(bert_dir, vision).eval()
    open_gates(model)
    batch = make_batch(model)
    tokens, images = batch.text_tokens, batch.images
    with torch.no_grad():
        i1, t1, _ = model.encode_pairs(images, tokens)
        _, t2, _ = model.encode_pairs(images + 1.0, tokens)
        i3, _, _ = model.encode_pairs(images, tokens.flip(0))
        _, d1, _ = model.encode_pairs(images, tokens, fuse=False)
        _, d2, _ = model.encode_pairs(images + 1.0, tokens, fuse=False)
    assert not torch.allclose(t1, t2, atol=1e-4)
    assert not torch.allclose(i1, i3, atol=1e-4)
    assert torch.equal(d1, d2)


def test_fusion_rejects_towers_it_cannot_split(bert_dir: str) -> None:
    text = HFTextTower(bert_dir, embed_dim=16, context_length=12)
    with pytest.raises(ValueError, match="fusion layers must be in 1..3"):
        FiberModule(TimmVisionTower(**VIT), text, fusion_layers=4)
    cnn = torch.nn.Module()
    cnn.model = torch.nn.Conv2d(3, 16, 3)
    with pytest.raises(TypeError, match="block by block"):
        vision_stack(cnn)


def test_matching_pairs_and_itm_loss_equal_the_formula() -> None:
    vi, ti, labels = matching_pairs(torch.tensor([2, -1, 0]), torch.tensor([1, 2, -1]))
    assert vi.tolist() == [0, 1, 2, 0, 2, 1, 2] and ti.tolist() == [0, 1, 2, 2, 0, 0, 1]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    logits = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    direct = -(math.log(math.exp(2.0) / (math.exp(0.5) + math.exp(2.0))))
    direct += -(math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0))))
    got = F.cross_entropy(logits, torch.tensor([1, 0]))
    assert abs(got.item() - direct / 2) < 1e-6


def test_masked_lm_loss_equals_the_formula() -> None:
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hidden = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]])
    labels = torch.tensor([[1, -100, 0]])
    # token 0: logits (1, 2, 3), label 1; token 2: logits (3, -1, 2), label 0
    lse = [
        math.log(math.exp(1) + math.exp(2) + math.exp(3)),
        math.log(math.exp(3) + math.exp(-1) + math.exp(2)),
    ]
    direct = ((lse[0] - 2.0) + (lse[1] - 3.0)) / 2
    assert abs(masked_lm_loss(head, hidden, labels).item() - direct) < 1e-6
    nothing = masked_lm_loss(head, hidden, torch.full_like(labels, -100))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_reranking_on_a_hand_case() -> None:
    # 3 images, 4 captions (image 0 has two); image 0 ties with the best for captions 1 and 2
    sim = torch.tensor([[0.9, 0.5, 0.85], [0.9, 0.8, 0.2], [0.9, 0.1, 0.8], [0.2, 0.95, 0.3]])
    owner = torch.tensor([0, 1, 2, 0])
    match = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])  # a perfect ITM

    def score(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return match[t, i]

    t2i, i2t = reranked_ranks(sim, owner, 0, score)
    assert t2i.tolist() == [1, 2, 2, 3] and i2t.tolist() == [1, 2, 2]
    t2i, i2t = reranked_ranks(sim, owner, 2, score, chunk=2)
    assert t2i.tolist() == [1, 1, 1, 3]  # caption 3's image is 3rd: beyond k = 2, unchanged
    assert i2t.tolist() == [1, 1, 1]
    t2i, i2t = reranked_ranks(sim, owner, 3, score)
    assert t2i.tolist() == [1, 1, 1, 1] and i2t.tolist() == [1, 1, 1]


def test_training_step_three_finite_terms_and_gate_gradients(bert_dir: str) -> None:
    model = make_model(bert_dir, fusion_layers=1, mlm_probability=0.5).train()
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value))
    torch.manual_seed(0)
    loss = model.training_step(make_batch(model), 0)
    for name in ("loss", "itc", "itm", "mlm"):
        assert bool(torch.isfinite(logged[f"train/{name}"])) and logged[f"train/{name}"] > 0
    expected = logged["train/itc"] + logged["train/itm"] + logged["train/mlm"]
    torch.testing.assert_close(loss.detach(), expected.detach())
    loss.backward()
    for gate in model.fusion.gates():
        assert gate.grad is not None and bool(gate.grad.abs().sum() > 0)


def test_validation_reports_itc_and_itm_retrieval(bert_dir: str) -> None:
    model = make_model(bert_dir, rerank_k=2, rerank_batch=3).eval()
    model.log = lambda *a, **k: None
    batch = make_batch(model)
    with torch.no_grad():
        out = model._eval_step(batch, "val")
        metrics = model.retrieval_metrics("val")
        img, txt = model(batch)
    assert torch.allclose(out["image_emb"], img, atol=1e-6)
    assert torch.allclose(out["text_emb"], txt, atol=1e-6)
    for key in ("itc/t2i/R@1", "itm/t2i/R@1", "itc/i2t/R@5", "itm/i2t/median_rank"):
        assert key in metrics


def test_cross_modal_parameters_train_at_fusion_lr_scale(bert_dir: str) -> None:
    model = make_model(bert_dir, fusion_lr_scale=5.0)
    model._trainer = SimpleNamespace(estimated_stepping_batches=10)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    fast = {id(p) for p in model.cross_modal_parameters()}
    assert {id(g) for g in model.fusion.gates()} <= fast
    assert {id(p) for p in model.itm_head.parameters()} <= fast
    assert id(model.text.model.get_input_embeddings().weight) not in fast  # tied MLM decoder
    params = list(model.parameters())
    assert len(lr) == len(params)  # every parameter in exactly one group
    for p in params:
        assert lr[id(p)] == pytest.approx(5e-3 if id(p) in fast else 1e-3)
    assert sched.base_lrs == [g["lr"] for g in opt.param_groups]
    names = {g["name"] for g in opt.param_groups}
    assert names == {"decay", "no_decay", "decay_fusion", "no_decay_fusion"}


def fused_pass(model: FiberModule) -> tuple[TextStream, tuple, tuple]:
    """The text stream, ``fusion.top`` and ``fusion.pair_outputs`` of one fused batch."""
    batch = make_batch(model)
    with torch.no_grad():
        state = model.fusion.vision_bottom(model.vision, batch.images)
        stream = model.fusion.text_bottom(model.text, batch.text_tokens)
        top = model.fusion.top(model.vision, model.text, state, stream)
        pair = model.fusion.pair_outputs(model.vision, model.text, state, stream)
    return stream, top, pair


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_itm_pair_state_pools_the_text_as_the_tower(bert_dir: str, pooling: str) -> None:
    torch.manual_seed(0)
    text = HFTextTower(bert_dir, embed_dim=16, context_length=12, pooling=pooling)
    model = FiberModule(TimmVisionTower(**VIT), text, fusion_layers=2).eval()
    open_gates(model)
    stream, (final, hidden), (_, txt, pair) = fused_pass(model)
    keep = stream.mask[..., None].float()
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * keep).sum(1) / keep.sum(1)
    dv = pair.shape[1] - hidden.shape[-1]
    torch.testing.assert_close(pair[:, :dv], final[:, 0])  # the ViT's class token
    torch.testing.assert_close(pair[:, dv:], pooled)
    torch.testing.assert_close(txt, model.text.proj(pooled))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_itm_pair_state_pools_the_image_as_the_tower(bert_dir: str, pool: str) -> None:
    vit = VIT | {"model_kwargs": VIT["model_kwargs"] | {"global_pool": pool}}
    model = make_model(bert_dir, vit).eval()
    open_gates(model)
    _, (final, _), (img, _, pair) = fused_pass(model)
    head = model.vision.model
    # what the ITC embedding projects: the class token, or the fc_norm-ed mean of the patches
    pooled = final[:, 0] if pool == "token" else head.fc_norm(final[:, 1:].mean(1))
    torch.testing.assert_close(pair[:, : pooled.shape[1]], pooled)
    torch.testing.assert_close(img, head.head(pooled))
