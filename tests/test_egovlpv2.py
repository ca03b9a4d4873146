"""EgoVLPv2 backbone fusion on tiny CPU towers: exact dual-encoder parity at init and with fusion
off, cross-modal dependence once gates open, hard-negative mining, MLM masking, training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmpt.batch import VideoTextBatch
from mmpt.models.egovlpv2 import EgoVLPv2Module, mask_tokens, sample_hard_negatives
from mmpt.models.encoders import HFTextTower, VideoViTTower
from mmpt.models.video_text import VideoTextModule
from tests.helpers import write_tiny_bert

TINY_VIDEO = {
    "model_name": "vit_tiny_patch16_224",
    "image_size": 32,
    "num_frames": 2,
    "embed_dim": 16,
    "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#c", "c", "opens", "cuts", "the"]
WORDS += ["door", "onion", "knife", "box", "takes", "a", "cup", "pours", "water", "moves"]
NARRATIONS = ["#c c opens the door", "#c c cuts the onion", "#c c takes a cup", "c pours water"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3-layer BERT (width 24, no dropout) + WordLevel tokenizer with [MASK], saved locally."""
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS))


def make_model(bert_dir: str, seed: int = 0, pooling: str = "cls", **kw: Any) -> EgoVLPv2Module:
    torch.manual_seed(seed)
    text = HFTextTower(bert_dir, embed_dim=16, pooling=pooling, context_length=10)
    kw.setdefault("fusion_layers", 2)  # video: 0 bottom + 2 top blocks; text: 1 + 2 layers
    return EgoVLPv2Module(VideoViTTower(**TINY_VIDEO), text, **kw)


def make_batch(model: EgoVLPv2Module, n: int = 4, seed: int = 1) -> VideoTextBatch:
    g = torch.Generator().manual_seed(seed)
    nouns = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.float32)
    verbs = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.float32)
    return VideoTextBatch(
        videos=torch.randn(n, 2, 3, 32, 32, generator=g),
        text_tokens=model.preprocess.tokenizer(NARRATIONS[:n]),
        text_to_video=torch.arange(n),
        nouns=nouns[:n],
        verbs=verbs[:n],
        keys=[f"{i:03d}" for i in range(n)],
        video_uids=[f"v{i // 2}" for i in range(n)],
    )


def open_gates(model: EgoVLPv2Module, value: float = 0.5) -> None:
    with torch.no_grad():
        for gate in model.fusion.gates():
            gate.fill_(value)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fused_at_init_equals_dual_encoder_exactly(bert_dir: str, pooling: str) -> None:
    model = make_model(bert_dir, pooling=pooling).eval()
    batch = make_batch(model)
    assert bool((batch.text_tokens == 0).any())  # padded rows: the mask path is exercised
    with torch.no_grad():
        vid_ref, txt_ref = model.vision(batch.videos), model.text(batch.text_tokens)
        for fuse in (False, True):
            vid, txt, cls = model.encode_pairs(batch.videos, batch.text_tokens, fuse=fuse)
            assert torch.equal(vid, vid_ref) and torch.equal(txt, txt_ref)
            assert cls.shape == (4, 32 + 24)
        fused = model(batch, fuse=True)
        dual = model(batch)
    for a, b in zip(fused, dual, strict=True):
        assert torch.equal(a, b)


def test_fusion_off_equals_plain_video_text_module(bert_dir: str) -> None:
    model = make_model(bert_dir, vtm_weight=0.0, mlm_weight=0.0)
    open_gates(model)  # gates open: the dual path must still ignore the blocks
    plain = VideoTextModule(model.vision, model.text)
    batch = make_batch(model)
    with torch.no_grad():
        model.eval()
        for a, b in zip(model(batch), plain(batch), strict=True):
            assert torch.equal(a, b)
        model.train()
        model.log = lambda *a, **k: None  # no Trainer
        plain.log = lambda *a, **k: None
        assert torch.equal(model.training_step(batch, 0), plain.training_step(batch, 0))


def test_open_gates_make_each_stream_depend_on_the_other(bert_dir: str) -> None:
    model = make_model(bert_dir).eval()
    open_gates(model)
    batch = make_batch(model)
    tokens, other_tokens = batch.text_tokens, batch.text_tokens.flip(0)
    videos, other_videos = batch.videos, batch.videos + 1.0
    with torch.no_grad():
        v1, t1, _ = model.encode_pairs(videos, tokens)
        v2, t2, _ = model.encode_pairs(other_videos, tokens)
        v3, _, _ = model.encode_pairs(videos, other_tokens)
        _, d1, _ = model.encode_pairs(videos, tokens, fuse=False)
        _, d2, _ = model.encode_pairs(other_videos, tokens, fuse=False)
    assert not torch.allclose(t1, t2, atol=1e-4)  # text features follow the video
    assert not torch.allclose(v1, v3, atol=1e-4)  # and video features follow the text
    assert torch.equal(d1, d2)  # dual mode: text independent of the video


def test_hard_negatives_come_from_non_matching_pairs_only() -> None:
    logits = torch.tensor(
        [
            [9.0, 8.0, 5.0, -5.0],
            [8.0, 9.0, 0.0, 0.0],
            [0.0, 0.0, 9.0, 0.0],
            [1.0, 1.0, 1.0, 9.0],
        ]
    )
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # e.g. shared noun and verb
    positives[3] = True  # video 3 matches every text: no negative text
    g = torch.Generator().manual_seed(0)
    draws = [sample_hard_negatives(logits, positives, generator=g) for _ in range(100)]
    neg_txt = torch.stack([d[0] for d in draws])  # (100, 4)
    neg_vid = torch.stack([d[1] for d in draws])
    assert bool((neg_txt[:, 3] == -1).all())
    rows = torch.arange(4).expand(100, 4)
    for neg, pos in ((neg_txt, positives), (neg_vid, positives.T)):
        ok = neg >= 0
        assert not bool(pos[rows[ok], neg[ok]].any())  # never a positive
    # The hardest negative dominates: text 2 for video 0 (p = 1 / (1 + e^-10)).
    assert bool((neg_txt[:, 0] == 2).all())
    counts = torch.bincount(neg_txt[:, 2], minlength=4)  # uniform over texts 0, 1, 3
    assert counts[2] == 0 and bool((counts[[0, 1, 3]] > 15).all())
    assert torch.equal(
        sample_hard_negatives(logits, positives, torch.Generator().manual_seed(3))[1],
        sample_hard_negatives(logits, positives, torch.Generator().manual_seed(3))[1],
    )


def test_mask_tokens_statistics_and_specials() -> None:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0, 1, 2, 3, 4])  # pad, unk, cls, sep, mask
    tokens = torch.randint(5, 1000, (512, 64), generator=g)
    tokens[:, 0], tokens[:, -8] = 2, 3
    tokens[:, -7:] = 0  # padding
    replacement = torch.arange(5, 1000)
    inputs, labels = mask_tokens(tokens, 4, special, replacement, 0.15, generator=g)
    picked = labels != -100
    is_special = torch.isin(tokens, special)
    assert not bool(picked[is_special].any())
    assert torch.equal(labels[picked], tokens[picked]) and torch.equal(
        inputs[~picked], tokens[~picked]
    )
    rate = picked.sum() / (~is_special).sum()
    assert abs(rate.item() - 0.15) < 0.01
    n = picked.sum().item()
    masked = (inputs[picked] == 4).sum().item() / n
    kept = (inputs[picked] == tokens[picked]).sum().item() / n
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(randomised - 0.1) < 0.015
    assert not bool(torch.isin(inputs[picked & (inputs != 4)], special).any())


def test_mlm_heads_are_tied_to_the_word_embeddings(bert_dir: str) -> None:
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    auto = make_model(bert_dir)
    small = make_model(bert_dir, mlm_head="small")
    assert isinstance(auto.mlm_head, BertOnlyMLMHead)
    for model in (auto, small):
        emb = model.text.model.get_input_embeddings().weight
        assert any(p is emb for p in model.mlm_head.parameters())
        assert model.mlm_head(torch.randn(3, 24)).shape == (3, len(WORDS))
    assert auto.mask_token_id == 4 and set(auto.special_ids.tolist()) == {0, 1, 2, 3, 4}


def test_training_step_three_finite_terms_and_gate_gradients(bert_dir: str) -> None:
    model = make_model(bert_dir, fusion_layers=1, mlm_probability=0.5).train()
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value))
    torch.manual_seed(0)
    loss = model.training_step(make_batch(model), 0)
    for name in ("loss", "egonce", "vtm", "mlm"):
        assert bool(torch.isfinite(logged[f"train/{name}"])) and logged[f"train/{name}"] > 0
    expected = logged["train/egonce"] + logged["train/vtm"] + logged["train/mlm"]
    torch.testing.assert_close(loss.detach(), expected.detach())
    loss.backward()
    for gate in model.fusion.gates():
        assert gate.grad is not None and bool(gate.grad.abs().sum() > 0)
    for head in (model.vtm_head, model.mlm_head):
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head.parameters())


def test_recipe_trains_through_the_cli_on_video_shards(tmp_path, monkeypatch) -> None:
    """configs/egovlpv2.yaml with tiny towers: `mmpt fit` on synthetic video-text shards."""
    from pathlib import Path

    import yaml

    from mmpt.cli import main
    from mmpt.synth import make_synthetic
    from tests.helpers import TINY_BERT_WORDS, TINY_VIDEO

    monkeypatch.chdir(tmp_path)
    make_synthetic("video-text", "video", train_samples=16, val_samples=4, mcq_samples=2)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "egovlpv2.yaml").read_text())
    model = cfg["model"]["init_args"]
    model["vision"] = TINY_VIDEO
    bert = write_tiny_bert(tmp_path / "bert", TINY_BERT_WORDS)
    model["text"] = {
        "class_path": "mmpt.models.encoders.HFTextTower",
        "init_args": {"path": str(bert), "embed_dim": 16, "context_length": 12},
    }
    model["fusion_layers"] = 1
    data = cfg["data"]["init_args"]
    data.update(train={"urls": "video/train", "shuffle_buffer": 0}, batch_size=4, num_workers=0)
    data.update(backend="pyav", num_frames=2, eval_num_frames=2)
    cfg["trainer"].update(
        accelerator="cpu",
        devices=1,
        strategy="auto",
        precision="32-true",
        max_steps=2,
        max_epochs=None,
        log_every_n_steps=1,
        default_root_dir="runs",
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = "runs"
    cfg["trainer"]["callbacks"][1]["init_args"]["dirpath"] = "runs/ckpt"
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "-c", "tiny.yaml"]) == 0
    metrics = sorted(Path("runs").rglob("metrics.csv"))[-1].read_text()
    for term in ("train/egonce", "train/vtm", "train/mlm", "data/no_neighbour"):
        assert term in metrics
