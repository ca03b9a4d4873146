"""VLMModule: token injection and fusion on packed rows, AnyRes layout, controls and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpt.datamodules.packing import pack_row
from mmpt.datamodules.resolution import AnyResTiles
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.vlm import PackedBatcher, VLMCollate, VLMDataModule
from mmpt.models.connectors import MLPDownsample
from mmpt.models.encoders import TimmVisionTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import ConnectorTokens, FusionConfig, VLMModule
from mmpt.synth import make_synthetic
from tests.helpers import TINY_LLM_CONFIG


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_synthetic("image-text", out, train_samples=48, image_size=32)
    return out


def tiny_vlm(shapes: Path, **kw) -> VLMModule:
    torch.manual_seed(0)
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(shapes / "tokenizer"), **kw.pop("llm", {}))
    vision = TimmVisionTower(
        "vit_tiny_patch16_224",
        image_size=32,
        embed_dim=0,
        model_kwargs={
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "dynamic_img_size": True,
        },
    )
    return VLMModule(llm, vision, **kw).eval()


def samples(model: VLMModule, shapes: Path, n: int = 6, max_seq_len: int = 96) -> list[dict]:
    dm = VLMDataModule(
        train=StreamConfig(urls=str(shapes / "train"), shuffle_buffer=0, shuffle_shards=False),
        max_seq_len=max_seq_len,
        num_workers=0,
        preprocess=model.preprocess,
    )
    dm.setup("fit")
    stream = dm.train_stream
    raw = iter(__import__("webdataset").WebDataset(stream.urls, shardshuffle=False))
    return [stream.sample_fn(next(raw)) for _ in range(n)]


def collate(model: VLMModule, rows: list[dict]):
    batch = VLMCollate(model.preprocess, "plain")(rows)
    pre = model.preprocess.image
    from mmpt.datamodules.transforms import normalize_images

    batch.pixels = [normalize_images(p, pre.mean, pre.std) for p in batch.pixels]
    return batch


def packed_vs_alone(model: VLMModule, items: list[dict], max_len: int) -> float:
    """Max |logit difference| between a packed row and each sample run alone."""
    pad = model.preprocess.pad_id
    packed = collate(model, [pack_row(items, max_len, pad)])
    with torch.no_grad():
        logits = model(packed).logits[0]
        worst, start = 0.0, 0
        for s in items:
            n = s["input_ids"].shape[0]
            alone = model(collate(model, [pack_row([s], n, pad)])).logits[0]
            worst = max(worst, (logits[start : start + n] - alone).abs().max().item())
            start += n
    return worst


def test_packed_forward_equals_each_sample_alone(shapes):
    model = tiny_vlm(shapes)
    items = samples(model, shapes, n=4)
    total = sum(s["input_ids"].shape[0] for s in items)
    assert packed_vs_alone(model, items, total + 5) < 1e-4


def test_packing_without_block_diagonal_mask_would_leak(shapes):
    """Control: with plain causal SDPA the packed logits differ (the Open-Qwen2VL flaw)."""
    model = tiny_vlm(shapes, llm={"attn_implementation": "sdpa"})
    items = samples(model, shapes, n=3)
    pad = model.preprocess.pad_id
    batch = collate(model, [pack_row(items, sum(s["input_ids"].shape[0] for s in items), pad)])
    with pytest.raises(ValueError, match="block-diagonal"):
        model(batch)


def test_image_tokens_reach_the_llm_and_shuffling_changes_the_loss(shapes):
    model = tiny_vlm(shapes)
    items = samples(model, shapes, n=6)
    rows = list(PackedBatcher(96, model.preprocess.pad_id, rows=4)(iter(items)))[0]
    batch = collate(model, rows)
    with torch.no_grad():
        true = model(batch).loss
        shuffled = model(batch, shuffle_images=True).loss
    assert torch.isfinite(true) and not torch.isclose(true, shuffled)
    tokens = model.image_tokens(batch)
    assert len(tokens) == 6 and all(t.shape == (16, 32) for t in tokens)
    rolled = model.shuffle_images(tokens)
    assert all(r is tokens[(i + 1) % 6] for i, r in enumerate(rolled))


def test_image_count_mismatch_is_an_error(shapes):
    model = tiny_vlm(shapes)
    batch = collate(model, [pack_row(samples(model, shapes, n=2), 96, model.preprocess.pad_id)])
    batch.images = batch.images[:1]
    with pytest.raises(ValueError, match="disagree on token counts"):
        model(batch)


def test_stage1_trains_only_the_connector(shapes):
    model = tiny_vlm(shapes, trainable=["connector.*"])
    model.configure_model()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"connector"}
    batch = collate(model, [pack_row(samples(model, shapes, n=2), 96, model.preprocess.pad_id)])
    model.train()
    model.training_step(batch, 0).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())


def test_all_masked_batch_names_the_template(shapes):
    model = tiny_vlm(shapes)
    batch = collate(model, [pack_row(samples(model, shapes, n=2), 96, model.preprocess.pad_id)])
    batch.labels.fill_(-100)
    batch.template = "chatml"
    with pytest.raises(ValueError, match="chatml"):
        model.training_step(batch, 0)


def test_fusion_is_identity_at_init_and_packing_safe(shapes):
    plain = tiny_vlm(shapes, fusion=FusionConfig(every=1))
    assert all(n.startswith("fusion.") for n, _ in plain.named_parameters() if "gated" in n)
    items = samples(plain, shapes, n=3)
    assert all(int((s["input_ids"] == plain.llm.image_token_id).sum()) == 1 for s in items)
    batch = collate(plain, [pack_row(items, 96, plain.preprocess.pad_id)])
    with torch.no_grad():
        fused = plain(batch).logits
        base = plain.llm(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    # gates start at 0: exactly the LLM (fusion context set, blocks run, contribute nothing)
    assert torch.equal(fused, base)
    with torch.no_grad():
        for block in plain.fusion:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    total = sum(s["input_ids"].shape[0] for s in items)
    assert packed_vs_alone(plain, items, total) < 1e-4  # no image leaks between samples
    with torch.no_grad():
        assert not torch.allclose(plain(batch).logits, base)


def test_anyres_row_end_tokens_are_laid_out(shapes):
    policy = AnyResTiles(tile_size=32, patch_size=8, max_tiles=4)
    model = tiny_vlm(shapes, resolution=policy)
    assert model.image_newline is not None
    tokens = model.preprocess.tokens_for_grid
    assert isinstance(tokens, ConnectorTokens) and tokens((4, 4)) == 16
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(buf, format="PNG")
    sample = {"__key__": "wide", "png": buf.getvalue(), "txt": "a red square"}
    item = VLMDataModule(
        train=StreamConfig(urls=str(shapes / "train")), num_workers=0, preprocess=model.preprocess
    )
    item.setup("fit")
    enc = item.train_stream.sample_fn(sample)
    # 1x2 tiles + global view, 16 tokens each, + one row-end per tile patch row (1 row x 4)
    assert enc["image_tokens"] == [3 * 16 + 4]
    batch = collate(model, [pack_row([enc], 80, model.preprocess.pad_id)])
    assert batch.images[0].tiles == (1, 2) and batch.images[0].global_view
    (image,) = model.image_tokens(batch)
    assert image.shape == (52, 32)
    canvas = image[16:].view(4, 9, 32)  # 4 patch rows x (8 tile patches + newline)
    assert torch.equal(canvas[:, -1], model.image_newline.expand(4, 32))
    with torch.no_grad():
        assert torch.isfinite(model(batch).loss)


def test_row_end_tokens_need_a_grid_preserving_connector(shapes):
    with pytest.raises(ValueError, match="row_end_token"):
        tiny_vlm(shapes, resolution=AnyResTiles(32, 8, 4), connector=MLPDownsample)


def test_export_folder(shapes, tmp_path):
    model = tiny_vlm(shapes, connector=MLPDownsample)
    out = model.export_mmpt(tmp_path / "export")
    config = json.loads((out / "mmpt_vlm.json").read_text())
    assert config["connector"]["class_path"].endswith("MLPDownsample")
    assert config["connector"]["init_args"]["llm_dim"] == 32
    assert config["vision"]["init_args"]["model_name"] == "vit_tiny_patch16_224"
    assert config["resolution"]["init_args"] == {"image_size": 32, "patch_size": 8}
    assert config["llm"]["image_token"] == "<image>"
    conn = load_file(out / "connector.safetensors")
    for k, v in model.connector.state_dict().items():
        assert torch.equal(conn[k], v)
    assert set(load_file(out / "vision.safetensors")) == set(model.vision.state_dict())
    again = CausalLM(pretrained=str(out / "llm"))
    ids = torch.tensor([[3, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, model.llm.model(ids).logits, atol=1e-6)
    assert again.image_token_id == model.llm.image_token_id


def test_native_resolution_encodes_each_aspect_at_its_own_grid(shapes):
    from mmpt.datamodules.resolution import NativeResolution

    model = tiny_vlm(shapes, resolution=NativeResolution(patch_size=8, max_num_patches=24))
    import io

    from PIL import Image

    items = []
    dm = VLMDataModule(
        train=StreamConfig(urls=str(shapes / "train")), num_workers=0, preprocess=model.preprocess
    )
    dm.setup("fit")
    for i, size in enumerate([(64, 16), (16, 48), (40, 40)]):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * i, 90, 200)).save(buf, format="PNG")
        items.append(
            dm.train_stream.sample_fn(
                {"__key__": str(i), "png": buf.getvalue(), "txt": "a red square"}
            )
        )
    # aspect kept within the 24-patch budget: 64x16 -> 2 x 8, 16x48 -> 8 x 3, 40x40 -> 4 x 4
    assert [s["image_tokens"][0] for s in items] == [16, 24, 16]
    batch = collate(model, [pack_row(items, 96, model.preprocess.pad_id)])
    assert sorted(tuple(p.shape[-2:]) for p in batch.pixels) == [(16, 64), (32, 32), (64, 24)]
    with torch.no_grad():
        assert torch.isfinite(model(batch).loss)
    assert packed_vs_alone(model, items, 96) < 1e-4


def test_text_only_batch_still_gives_every_trainable_weight_a_gradient(shapes):
    """DDP needs a gradient for every trainable parameter; a frozen LLM needs a graph."""
    model = tiny_vlm(shapes, trainable=["connector.*"])
    model.configure_model()
    model.train()
    assert not model.vision.training  # frozen tower stays in eval mode
    enc = model.preprocess.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(enc)
    row = pack_row(
        [
            {
                "input_ids": ids,
                "labels": ids.clone(),
                "images": [],
                "image_tokens": [],
                "key": "t",
                "truncated": 0,
            }
        ],
        8,
        model.preprocess.pad_id,
    )
    batch = collate(model, [row])
    assert not batch.images
    model.training_step(batch, 0).backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_row_end_embedding_trains_with_the_connector(shapes):
    model = tiny_vlm(shapes, resolution=AnyResTiles(32, 8, 4), trainable=["connector.*"])
    model.configure_model()
    assert model.image_newline.requires_grad
    assert "image_newline" in model.connector.state_dict()
