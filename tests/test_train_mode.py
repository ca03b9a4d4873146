"""Towers loaded with transformers' from_pretrained train in train mode, frozen VLM towers in eval.

transformers returns models in eval mode, and Lightning (>= 2.2) keeps every submodule's mode at
the start of fit, so a loaded BERT would silently train without dropout and a loaded wav2vec 2.0
without SpecAugment or LayerDrop.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmpt.models.encoders import HFTextTower, HFVisionTower, TimmVisionTower, Wav2Vec2Tower
from mmpt.models.fused_objectives import mlm_head
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from mmpt.synth.vocab import write_synth_tokenizer
from tests.helpers import TINY_BERT_WORDS, TINY_LLM_CONFIG, TINY_WAV2VEC2, write_tiny_bert


def all_train(module: nn.Module) -> bool:
    return all(m.training for m in module.modules())


def test_loaded_hf_towers_are_in_train_mode(tmp_path: Path) -> None:
    bert = write_tiny_bert(tmp_path / "bert", TINY_BERT_WORDS)
    text = HFTextTower(str(bert), embed_dim=8, context_length=8)
    assert all_train(text) and all_train(mlm_head(text, "auto"))  # the head from the checkpoint

    Wav2Vec2Tower(config=TINY_WAV2VEC2).save_pretrained(str(tmp_path / "w2v"))
    assert all_train(Wav2Vec2Tower(pretrained=str(tmp_path / "w2v")))

    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    HFVisionTower(config=vision).model.save_pretrained(str(tmp_path / "siglip"))
    assert all_train(HFVisionTower(pretrained=str(tmp_path / "siglip")))

    tok = write_synth_tokenizer(tmp_path / "tok")
    CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(tok)).model.save_pretrained(tmp_path / "lm")
    assert all_train(CausalLM(pretrained=str(tmp_path / "lm"), tokenizer=str(tok)))


def test_vlm_fit_start_puts_frozen_towers_in_eval_and_the_rest_in_train(tmp_path: Path) -> None:
    tok = write_synth_tokenizer(tmp_path / "tok")
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(tok))
    vision = TimmVisionTower("vit_tiny_patch16_224", image_size=32, embed_dim=0,
                             model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2,
                                           "num_heads": 2})  # fmt: skip
    model = VLMModule(llm, vision, trainable=["connector.*"])
    model.configure_model()  # applies the frozen/trainable split, as Lightning does
    model.llm.eval()  # e.g. as from_pretrained left it
    model.on_fit_start()
    assert not any(m.training for m in model.vision.modules())
    assert all_train(model.llm) and all_train(model.connector) and model.training
