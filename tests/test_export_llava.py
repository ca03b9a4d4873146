"""VLM <-> transformers LLaVA: the exported model equals mmpt, import, unsupported variants."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmpt.datamodules.packing import pack_row
from mmpt.datamodules.resolution import AnyResTiles, FixedResolution
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import VLMCollate
from mmpt.datamodules.vlm_sample import VLMSample
from mmpt.export.hf_llava import export_llava, llava_unsupported
from mmpt.export.hf_llava_load import llava_state_dict, vlm_from_llava
from mmpt.models.attention import hf_packing_kwargs
from mmpt.models.connectors import MLPDownsample
from mmpt.models.encoders import HFVisionTower, TimmVisionTower
from mmpt.models.llm import CausalLM, splice_tokens
from mmpt.models.vlm import FusionConfig, VLMModule
from mmpt.synth.vocab import write_synth_tokenizer
from tests.helpers import TINY_LLM_CONFIG

_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
VISION = {
    "siglip": {"model_type": "siglip_vision_model", **_TOWER, "num_attention_heads": 2},
    "clip": {"model_type": "clip_vision_model", **_TOWER, "num_attention_heads": 2},
}
for _cfg in VISION.values():
    _cfg |= {"image_size": 32, "patch_size": 8}
# a wider init than HF's 0.02, so greedy decoding has clear winners
TEXT = {
    "qwen2": {**TINY_LLM_CONFIG, "initializer_range": 0.5},
    "llama": {**TINY_LLM_CONFIG, "model_type": "llama", "initializer_range": 0.5},
}
TIMM = {
    "model_name": "vit_tiny_patch16_224",
    "image_size": 32,
    "embed_dim": 0,
    "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
CAPTION = "a red circle"
PROMPT = "Describe the image ."


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return write_synth_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_vlm(tok: Path, vision: str, text: str, layer: int = -2, tie: bool = False) -> VLMModule:
    torch.manual_seed(0)
    llm = CausalLM(config={**TEXT[text], "tie_word_embeddings": tie}, tokenizer=str(tok))
    return VLMModule(llm, HFVisionTower(config=VISION[vision], feature_layer=layer)).eval()


def png(width: int, height: int, seed: int = 0, smooth: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    if smooth:
        img = img.resize((6, 6)).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mmpt_batch(model: VLMModule, image: bytes, template: str, answer: bool = True):
    """mmpt's own data path: a conversation sample -> VLMSample -> VLMCollate -> normalised."""
    pre = model.preprocess
    messages = [{"role": "user", "content": PROMPT}]
    messages += [{"role": "assistant", "content": CAPTION}] if answer else []
    raw = {"__key__": "k", "png": image, "json": json.dumps({"messages": messages}).encode()}
    row = VLMSample(pre, get_template(template), max_seq_len=512, image_key="png")(raw)
    n = int(row["input_ids"].shape[0])
    batch = VLMCollate(pre, template)([pack_row([row], n, pre.pad_id)])
    batch.pixels = [normalize_images(p, pre.image.mean, pre.image.std) for p in batch.pixels]
    return batch


def hf_messages(answer: bool = True) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}
    return [user, reply] if answer else [user]


def mmpt_greedy(model: VLMModule, batch, prompt_len: int, steps: int) -> list[int]:
    """Greedy decoding on mmpt's side: image tokens spliced into the prompt's embeddings."""
    ids = batch.input_ids[:, :prompt_len]
    embeds = splice_tokens(
        model.llm.embed(ids), ids == model.llm.image_token_id, model.image_tokens(batch), "image"
    )
    out = []
    for _ in range(steps):
        n = embeds.shape[1]
        packing = hf_packing_kwargs(torch.tensor([0, n], dtype=torch.int32), n)
        logits = model.llm(inputs_embeds=embeds, position_ids=torch.arange(n)[None], **packing)
        nxt = int(logits.logits[0, -1].argmax())
        out.append(nxt)
        embeds = torch.cat([embeds, model.llm.embed(torch.tensor([[nxt]]))], dim=1)
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_quietly(cls, folder: Path):
    """``cls.from_pretrained(folder)``, failing on any transformers warning (e.g. its report)."""
    records, logger = _Records(), transformers.logging.get_logger("transformers")
    logger.addHandler(records)
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    finally:
        logger.removeHandler(records)
    assert not any(info.values()), info
    assert not records.messages, records.messages
    return model.eval()


@pytest.mark.parametrize(
    ("vision", "text", "layer", "template", "tie"),
    [
        ("siglip", "qwen2", -2, "chatml", True),
        ("clip", "llama", -1, "vicuna", True),
        ("clip", "qwen2", 0, "plain", False),
    ],
)
def test_exported_llava_equals_mmpt(tok, tmp_path, vision, text, layer, template, tie):
    model = tiny_vlm(tok, vision, text, layer, tie)
    assert llava_unsupported(model) is None
    out = export_llava(model, tmp_path / "llava", template=template)
    hf = load_quietly(LlavaForConditionalGeneration, out)
    load_quietly(AutoModelForImageTextToText, out)
    assert hf.config.vision_feature_layer == (layer if layer < 0 else layer + 1)
    processor = AutoProcessor.from_pretrained(str(out))

    image = png(32, 32)
    batch = mmpt_batch(model, image, template)
    pil = Image.open(io.BytesIO(image))
    text_in = processor.apply_chat_template(hf_messages())
    inputs = processor(images=pil, text=text_in, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], batch.input_ids)
    assert torch.allclose(inputs["pixel_values"], batch.pixels[0], atol=1e-6)
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(**inputs).logits
    assert (ours - theirs).abs().max() < 1e-4

    prompt = processor.apply_chat_template(hf_messages(answer=False), add_generation_prompt=True)
    prompt_in = processor(images=pil, text=prompt, return_tensors="pt")
    n = prompt_in["input_ids"].shape[1]
    assert torch.equal(prompt_in["input_ids"], batch.input_ids[:, :n])
    with torch.no_grad():
        generated = hf.generate(**prompt_in, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        ours_greedy = mmpt_greedy(model, batch, n, 5)
    assert generated[0, n:].tolist() == ours_greedy
    assert len(set(ours_greedy)) > 1  # not a degenerate repeat of one token


def transformers_llava(
    tok: Path, folder: Path, vision: str, tie: bool, layout: str
) -> LlavaForConditionalGeneration:
    """A LLaVA folder made by transformers itself: random weights + the synth tokenizer.

    ``layout``: ``saved`` (what ``save_pretrained`` writes), ``hub`` (llava-hf's vision names)
    or ``memory`` (transformers 5's module names).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    text = {k: v for k, v in TEXT["llama"].items() if k != "model_type"}
    config = LlavaConfig(
        vision_config={**VISION[vision]},
        text_config={
            "model_type": "llama",
            **text,
            "vocab_size": len(tokenizer),
            "tie_word_embeddings": tie,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full" if vision == "siglip" else "default",
        vision_feature_layer=-2,
        image_seq_length=16,
    )
    torch.manual_seed(1)
    hf = LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    file = str(folder / "model.safetensors")
    if layout == "hub":  # the hub's llava-hf layout: the vision weights nested in vision_model
        old = "vision_tower."
        weights = {
            (old + "vision_model." + k[len(old) :] if k.startswith(old) else k): v
            for k, v in load_file(file).items()
        }
        save_file(weights, file, metadata={"format": "pt"})
    elif layout == "memory":  # transformers 5's module names, as a plain state-dict dump writes
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, file)
    return hf


@pytest.mark.parametrize(
    ("vision", "tie", "layout"),
    [("siglip", True, "saved"), ("clip", False, "hub"), ("siglip", False, "memory")],
)
def test_llava_folder_loads_into_mmpt(tok, tmp_path, vision, tie, layout):
    folder = tmp_path / "hf"
    hf = transformers_llava(tok, folder, vision, tie, layout)
    model = vlm_from_llava(folder)
    vocab = hf.config.text_config.vocab_size
    assert model.vision.feature_layer == -2
    # init_from path: a VLMModule built from the matching config takes every weight
    torch.manual_seed(5)
    other = VLMModule(
        CausalLM(
            config={**TEXT["llama"], "vocab_size": vocab, "tie_word_embeddings": tie},
            tokenizer=str(folder),
        ),
        HFVisionTower(config=VISION[vision]),
    ).eval()
    result = other.load_state_dict(llava_state_dict(folder, other), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    batch = mmpt_batch(model, png(32, 32, seed=3), "chatml")
    pixels = batch.pixels[0]
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, pixel_values=pixels).logits
        for mmpt_model in (model, other):
            assert (mmpt_model(batch).logits - theirs).abs().max() < 1e-4


def test_export_then_import_round_trip(tok, tmp_path):
    """``vlm_from_llava`` on mmpt's own export: same preprocessing, feature layer and logits."""
    torch.manual_seed(0)
    llm = CausalLM(config=TEXT["qwen2"], tokenizer=str(tok))
    tower = HFVisionTower(config=VISION["clip"], feature_layer=0, mean=[0.1] * 3, std=[0.2] * 3)
    model = VLMModule(llm, tower).eval()
    back = vlm_from_llava(export_llava(model, tmp_path / "llava", template="chatml"))
    assert back.vision.image_preprocess == model.vision.image_preprocess
    assert back.vision.feature_layer == 0
    assert back.llm.image_token_id == model.llm.image_token_id
    batch = mmpt_batch(model, png(40, 32, seed=4), "chatml")
    with torch.no_grad():
        assert (back(batch).logits - model(batch).logits).abs().max() < 1e-5


def test_llava_weights_init_another_tower_partially(tok, tmp_path):
    """init_from with a different vision tower: the LLM and projector match, the tower does not."""
    folder = tmp_path / "hf"
    hf = transformers_llava(tok, folder, "siglip", False, "saved")
    llm = CausalLM(
        config={**TEXT["llama"], "vocab_size": hf.config.text_config.vocab_size},
        tokenizer=str(folder),
    )
    model = VLMModule(llm, TimmVisionTower(**TIMM))
    state = llava_state_dict(folder, model)
    own = model.state_dict()
    matching = {k for k, v in state.items() if k in own and own[k].shape == v.shape}
    assert matching == {k for k in own if not k.startswith("vision.")}
    assert all(k.startswith("vision.model.") for k in set(state) - matching)
    # a rebuilt model must match the folder exactly: a missing weight is an error
    file = folder / "model.safetensors"
    weights = load_file(str(file))
    del weights["multi_modal_projector.linear_2.weight"]
    save_file(weights, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing connector.proj.2.weight"):
        vlm_from_llava(folder)


def test_not_a_llava_folder(tok, tmp_path):
    model = tiny_vlm(tok, "siglip", "qwen2")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llava_state_dict(tmp_path, model)
    model.llm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="model_type 'qwen2', not 'llava'"):
        llava_state_dict(tmp_path / "lm", model)


def test_unsupported_variants_say_why(tok):
    torch.manual_seed(0)
    llm = lambda: CausalLM(config=TEXT["qwen2"], tokenizer=str(tok))  # noqa: E731
    siglip = lambda: HFVisionTower(config=VISION["siglip"])  # noqa: E731
    timm = TimmVisionTower(**TIMM)
    cases = {
        "TimmVisionTower": VLMModule(llm(), timm),
        "MLPDownsample": VLMModule(llm(), siglip(), connector=MLPDownsample),
        "gated cross-attention": VLMModule(llm(), siglip(), fusion=FusionConfig(every=1)),
        "AnyResTiles": VLMModule(
            llm(), siglip(), resolution=AnyResTiles(32, 8, max_tiles=2, row_end_token=False)
        ),
        "interpolates": VLMModule(llm(), siglip(), resolution=FixedResolution(48, 8)),
    }
    for part, model in cases.items():
        reason = llava_unsupported(model)
        assert reason is not None and part in reason and "--format mmpt" in reason, reason
        with pytest.raises(ValueError, match=part):
            export_llava(model, "/nonexistent/never-written")
