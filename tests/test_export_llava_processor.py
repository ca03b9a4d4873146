"""The exported LLaVA folder's processor and chat template reproduce mmpt's training inputs."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing
from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

from mmpt.datamodules.templates import TEMPLATES
from mmpt.export.hf_llava import export_llava
from mmpt.export.hf_processor import chat_template
from mmpt.models.encoders import HFVisionTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from tests.test_export_llava import (
    CAPTION,
    PROMPT,
    TEXT,
    VISION,
    hf_messages,
    mmpt_batch,
    png,
    tiny_vlm,
)
from tests.test_export_llava import tok as tok  # noqa: F401 - the module fixture


def test_processor_matches_mmpt_preprocessing(tok, tmp_path):
    """Token count, ids and pixels; non-square images: same centre square, resize order aside."""
    model = tiny_vlm(tok, "siglip", "qwen2")
    out = export_llava(model, tmp_path / "llava", template="chatml")
    processor = AutoProcessor.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert processor.chat_template == tokenizer.chat_template
    stops = GenerationConfig.from_pretrained(str(out)).eos_token_id
    assert sorted(stops) == sorted(tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"]))
    image = png(61, 40, smooth=True)
    batch = mmpt_batch(model, image, "chatml")
    pil = Image.open(io.BytesIO(image))
    inputs = processor(
        images=pil, text=processor.apply_chat_template(hf_messages()), return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.llm.image_token_id).sum()) == 16
    assert torch.equal(inputs["input_ids"], batch.input_ids)
    # crop-then-resize (mmpt) vs resize-then-crop (CLIPImageProcessor): tiny differences
    diff = (inputs["pixel_values"] - batch.pixels[0]).abs().mean()
    squashed = processor.image_processor(pil.resize((32, 32), Image.Resampling.BICUBIC))
    squash_diff = (torch.as_tensor(squashed["pixel_values"][0]) - batch.pixels[0]).abs().mean()
    assert diff < 0.01 < squash_diff


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_the_training_text(tok, name):
    """transformers' renderer on the exported template == the text mmpt's template trains on."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    template = TEMPLATES[name]
    ours = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"<image>\n{PROMPT}"},
        {"role": "assistant", "content": CAPTION},
        {"role": "user", "content": "and now ?"},
    ]
    theirs = [ours[0], *hf_messages(), {"role": "user", "content": "and now ?"}]
    text = tokenizer.apply_chat_template(
        theirs, chat_template=chat_template(template), tokenize=False, add_generation_prompt=True
    )
    expected = "".join(s.text for s in template.render(ours, tokenizer.eos_token))
    assert text == expected + template.assistant_prefix


def test_processor_adds_no_bos_the_model_never_saw(tok, tmp_path):
    """A Llama-style tokenizer adds BOS by itself; mmpt trained without it, so must the export."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    llm = CausalLM(config=TEXT["llama"], tokenizer=str(tmp_path / "tok"))
    assert llm.tokenizer("a")["input_ids"][0] == bos
    model = VLMModule(llm, HFVisionTower(config=VISION["clip"])).eval()
    processor = AutoProcessor.from_pretrained(
        str(export_llava(model, tmp_path / "llava", template="vicuna"))
    )
    batch = mmpt_batch(model, png(32, 32), "vicuna")
    pil = Image.open(io.BytesIO(png(32, 32)))
    text = processor.apply_chat_template(hf_messages())
    with_image = hf_messages()
    with_image[0]["content"][0]["image"] = pil
    for inputs in (
        processor(images=pil, text=text, return_tensors="pt"),
        processor.apply_chat_template(
            with_image, tokenize=True, return_dict=True, return_tensors="pt"
        ),
    ):
        assert torch.equal(inputs["input_ids"], batch.input_ids)
    assert llm.tokenizer("a")["input_ids"][0] == bos  # mmpt's own tokenizer is untouched


def test_chat_template_fallbacks(tok, tmp_path, caplog):
    model = tiny_vlm(tok, "siglip", "qwen2")
    with caplog.at_level(logging.WARNING, logger="mmpt.export"):
        out = export_llava(model, tmp_path / "plain")
    assert "'plain' template" in caplog.text
    processor = AutoProcessor.from_pretrained(str(out))
    text = processor.apply_chat_template(hf_messages(), tokenize=False)
    assert text == f"<image>\n{PROMPT}\n{CAPTION}</s>"
    with pytest.raises(ValueError, match="unknown template 'chatm'"):
        export_llava(model, tmp_path / "bad", template="chatm")
    assert not (tmp_path / "bad").exists()
