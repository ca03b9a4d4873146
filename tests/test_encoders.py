"""Towers: output shapes, and weights saved by the reference libraries load back exactly."""

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmpt.models.encoders import (
    HFTextTower,
    OpenCLIPTextTower,
    OpenCLIPTokenizer,
    OpenCLIPVisionTower,
    TimmVisionTower,
)
from mmpt.preprocess import CLIP_MEAN

TIMM_KW = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
VISION_FLAG = r"--model\.init_args\.vision\.init_args\.pretrained"
TEXT_FLAG = r"--model\.init_args\.text\.init_args\.pretrained"


def tiny_timm(embed_dim: int = 16, image_size: int = 32, **kw) -> TimmVisionTower:
    return TimmVisionTower(
        "vit_base_patch16_224",
        embed_dim=embed_dim,
        image_size=image_size,
        model_kwargs=TIMM_KW,
        **kw,
    ).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def grads_flow(tower, x) -> bool:
    tower.train()
    tower.set_grad_checkpointing(True)
    tower(x).sum().backward()
    return all(p.grad is not None for p in tower.parameters() if p.requires_grad)


# ---- timm ------------------------------------------------------------------------------------


def test_timm_tower_shapes_preprocess_and_checkpointing(images):
    tower = tiny_timm()
    assert tower(images).shape == (2, 16) and tower.output_dim == 16
    pp = tower.image_preprocess
    assert (pp.size, pp.mean, pp.std, pp.channels) == (32, (0.5,) * 3, (0.5,) * 3, 3)
    assert grads_flow(tower, images)


@pytest.mark.parametrize("layout", ["model.safetensors", "weights.pth", "folder"])
def test_timm_tower_loads_saved_weights_exactly(tmp_path, images, layout):
    src = tiny_timm()
    state = src.model.state_dict()
    if layout == "folder":
        save_file(state, tmp_path / "model.safetensors")
        path = tmp_path
    elif layout.endswith(".safetensors"):
        save_file(state, tmp_path / layout)
        path = tmp_path / layout
    else:
        torch.save({"state_dict": state}, tmp_path / layout)
        path = tmp_path / layout
    loaded = tiny_timm(pretrained=str(path))
    assert torch.equal(loaded(images), src(images))


def test_timm_tower_new_head_and_resized_pos_embed(tmp_path, images, caplog):
    src = tiny_timm(embed_dim=16)
    save_file(src.model.state_dict(), tmp_path / "w.safetensors")
    # Other embed_dim: the backbone loads, the projection head is new.
    loaded = tiny_timm(embed_dim=24, pretrained=str(tmp_path / "w.safetensors"))
    feats = src.model.forward_head(src.model.forward_features(images), pre_logits=True)
    assert torch.equal(
        loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True), feats
    )
    assert loaded(images).shape == (2, 24)
    # Other image size: timm's checkpoint filter resizes the position embedding (4x4 -> 6x6).
    big = tiny_timm(image_size=48, pretrained=str(tmp_path / "w.safetensors"))
    assert big.model.pos_embed.shape[1] == 1 + 36
    assert torch.equal(big.model.head.weight, src.model.head.weight)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 16)


def test_timm_tower_rejects_foreign_checkpoint_and_missing_file(tmp_path):
    save_file({"foo.weight": torch.zeros(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="missing keys.*cls_token"):
        tiny_timm(pretrained=str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match=VISION_FLAG):
        tiny_timm(pretrained=str(tmp_path / "absent.safetensors"))


def test_timm_tower_multispectral_needs_mean_std(images):
    kw = {**TIMM_KW, "in_chans": 4}
    with pytest.raises(ValueError, match="one value per channel"):
        TimmVisionTower(embed_dim=8, image_size=32, model_kwargs=kw)
    tower = TimmVisionTower(
        embed_dim=8, image_size=32, model_kwargs=kw, mean=[0.1] * 4, std=[0.2] * 4
    )
    assert tower.image_preprocess.channels == 4
    assert tower(torch.randn(2, 4, 32, 32)).shape == (2, 8)


# ---- open_clip ---------------------------------------------------------------------------------


def tiny_clip(custom_text: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    return cls(embed_dim=16, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG).eval()


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    model = tiny_clip()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file(model.state_dict(), path)
    return model, str(path)


def test_open_clip_vision_tower_reproduces_encode_image(clip_ckpt, images, tmp_path):
    model, path = clip_ckpt
    tower = OpenCLIPVisionTower(embed_dim=16, pretrained=path, vision_cfg=VISION_CFG).eval()
    with torch.no_grad():
        assert torch.equal(tower(images), model.encode_image(images))
    pp = tower.image_preprocess
    assert pp.size == 32 and pp.mean == CLIP_MEAN and tower.output_dim == 16
    # A vision-only state dict (keys without the "visual." prefix) loads too.
    torch.save(model.visual.state_dict(), tmp_path / "visual.pt")
    only = OpenCLIPVisionTower(
        embed_dim=16, pretrained=str(tmp_path / "visual.pt"), vision_cfg=VISION_CFG
    )
    with torch.no_grad():
        assert torch.equal(only.eval()(images), model.encode_image(images))
    assert grads_flow(only, images)


def test_open_clip_vision_tower_new_head_and_errors(clip_ckpt, images, caplog):
    model, path = clip_ckpt
    with caplog.at_level(logging.WARNING):
        tower = OpenCLIPVisionTower(embed_dim=24, pretrained=path, vision_cfg=VISION_CFG)
    assert "new projection head" in caplog.text and "proj" in caplog.text
    assert tower(images).shape == (2, 24)
    assert torch.equal(tower.visual.conv1.weight, model.visual.conv1.weight)
    with pytest.raises(ValueError, match=r"unexpected \[.transformer\.resblocks\.1\."):
        OpenCLIPVisionTower(embed_dim=16, pretrained=path, vision_cfg={**VISION_CFG, "layers": 1})
    with pytest.raises(ValueError, match=f"laion/CLIP-ViT-B-16-laion2B-s34B-b88K.*{VISION_FLAG}"):
        OpenCLIPVisionTower("ViT-B-16", pretrained="laion2b_s34b_b88k")
    with pytest.raises(FileNotFoundError, match=VISION_FLAG):
        OpenCLIPVisionTower("ViT-B-16", pretrained="/no/such/open_clip_model.safetensors")


@pytest.mark.parametrize("layout", ["clip", "custom_text", "text_only"])
def test_open_clip_text_tower_reproduces_encode_text(tmp_path, layout):
    model = tiny_clip(custom_text=layout == "custom_text")
    state = model.state_dict()
    if layout == "text_only":
        state = {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_"))}
    torch.save(state, tmp_path / "ckpt.pt")
    tower = OpenCLIPTextTower(embed_dim=16, pretrained=str(tmp_path / "ckpt.pt"), text_cfg=TEXT_CFG)
    assert isinstance(tower.tokenizer, OpenCLIPTokenizer) and tower.tokenizer.context_length == 16
    tokens = tower.tokenizer(["a photo of a cat", "a dog on a red mat, sleeping"])
    with torch.no_grad():
        assert torch.equal(tower.eval()(tokens), model.encode_text(tokens))


def test_open_clip_text_tower_resizes_context_and_replaces_head(clip_ckpt, caplog):
    model, path = clip_ckpt
    with caplog.at_level(logging.WARNING):
        tower = OpenCLIPTextTower(
            embed_dim=8, pretrained=path, text_cfg={**TEXT_CFG, "context_length": 24}
        )
    assert "text_projection" in caplog.text
    assert tower.tokenizer.context_length == 24 and tower.text.positional_embedding.shape == (
        24,
        32,
    )
    assert torch.equal(tower.text.token_embedding.weight, model.token_embedding.weight)
    tokens = tower.tokenizer(["a cat"])
    assert tower(tokens).shape == (1, 8)
    assert grads_flow(tower, tokens)
    with pytest.raises(ValueError, match=TEXT_FLAG):
        OpenCLIPTextTower(pretrained="laion2b_s34b_b88k")


# ---- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A save_pretrained folder: 2-layer BERT + WordLevel tokenizer ([PAD]=0 [UNK] [CLS] [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "the", "cat", "dog"]
    raw = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    specials = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
    }
    PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=10,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    BertModel(cfg).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_text_tower_matches_direct_model(hf_dir, pooling):
    from transformers import AutoModel

    tower = HFTextTower(hf_dir, embed_dim=16, pooling=pooling, context_length=10).eval()
    assert tower.model.pooler is None and tower.output_dim == 16
    tokens = tower.tokenizer(["a photo of the cat", "dog"])
    ref = AutoModel.from_pretrained(hf_dir, local_files_only=True).eval()
    mask = tokens != 0
    with torch.no_grad():
        hidden = ref(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = torch.stack([h[m].mean(0) for h, m in zip(hidden, mask, strict=True)])
        torch.testing.assert_close(tower(tokens), tower.proj(pooled))
        # Extra padding changes nothing: pad positions are masked everywhere.
        longer = HFTextTower(hf_dir, embed_dim=16, pooling=pooling, context_length=20).eval()
        longer.load_state_dict(tower.state_dict())
        torch.testing.assert_close(longer(longer.tokenizer(["dog"])), tower(tokens[1:]))
    assert grads_flow(tower, tokens)


def test_hf_text_tower_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model\.init_args\.text\.init_args\.path"):
        HFTextTower(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        HFTextTower(hf_dir, context_length=64)
    with pytest.raises(ValueError, match="pooling"):
        HFTextTower(hf_dir, pooling="max")
