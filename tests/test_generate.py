"""mmpt generate: greedy == a hand-written loop over forward, batched == alone, stops, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from mmpt.batch import VLMBatch
from mmpt.cli import main
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import group_crops
from mmpt.generate import Decoding, Generator, cut_at_stop, prompt_content
from mmpt.models.vlm import FusionConfig
from tests.test_export_mmpt import perturb
from tests.test_speech_lm import speech_lm
from tests.test_vlm_module import shapes as shapes  # noqa: F401 - the module fixture
from tests.test_vlm_module import tiny_vlm


def image(w: int, h: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 255, (h, w, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


PROMPTS = ["", "a red", "<image> and <image> what shapes"]
IMAGES = [[image(32, 32, 0)], [image(40, 24, 1)], [image(32, 32, 2), image(24, 40, 3)]]


@pytest.fixture(scope="module")
def model(shapes):  # noqa: F811
    return perturb(tiny_vlm(shapes))


@pytest.fixture(scope="module")
def fused(shapes):  # noqa: F811
    m = tiny_vlm(shapes, fusion=FusionConfig(every=1, heads=2, ff_mult=2))
    with torch.no_grad():
        for block in m.fusion:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return perturb(m)


def greedy_by_hand(gen: Generator, prompt: str, images: list, steps: int) -> list[int]:
    """Argmax of mmpt's own forward on the whole sequence, one token at a time (no cache)."""
    ids, crops, _ = gen.encode(prompt, images, [])
    pixels, layouts = group_crops(crops)
    pre = gen.pre.image
    pixels = [normalize_images(p, pre.mean, pre.std) for p in pixels]
    out: list[int] = []
    for _ in range(steps):
        row = torch.cat([ids, torch.tensor(out, dtype=torch.long)])[None]
        n = row.shape[1]
        batch = VLMBatch(
            input_ids=row,
            labels=torch.full_like(row, -100),
            position_ids=torch.arange(n)[None],
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
            pixels=pixels,
            images=layouts,
            num_samples=1,
        )
        with torch.no_grad():
            nxt = int(gen.model(batch).logits[0, -1].argmax())
        if nxt in gen.eos_ids:
            break
        out.append(nxt)
    return out


@pytest.mark.parametrize("which", ["model", "fused"])
def test_greedy_equals_a_hand_written_loop_and_batched_equals_alone(which, request):
    gen = Generator(request.getfixturevalue(which))
    steps = Decoding(max_new_tokens=6)
    batched = gen.generate_ids(PROMPTS, IMAGES, decoding=steps)
    for prompt, images, got in zip(PROMPTS, IMAGES, batched, strict=True):
        assert got == greedy_by_hand(gen, prompt, images, 6)
        assert gen.generate_ids([prompt], [images], decoding=steps)[0] == got
    assert any(len(ids) > 0 for ids in batched)


def test_speech_batched_equals_alone(tmp_path):
    from mmpt.synth import make_synthetic

    make_synthetic("audio-text", tmp_path, train_samples=4, val_samples=2)
    gen = Generator(perturb(speech_lm(tmp_path)))
    gen_clip = torch.Generator().manual_seed(0)
    clips = [[torch.randn(n, generator=gen_clip) * 0.1] for n in (8000, 12000)]
    steps = Decoding(max_new_tokens=5)
    both = gen.generate_ids(["say", "continue the text"], None, clips, steps)
    assert both[0] == gen.generate_ids(["say"], None, [clips[0]], steps)[0]
    assert both[1] == gen.generate_ids(["continue the text"], None, [clips[1]], steps)[0]


def test_stop_strings_cut_the_output(model):
    gen = Generator(model)
    (full,) = gen.generate([""], [IMAGES[0]], max_new_tokens=10)
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    (cut,) = gen.generate([""], [IMAGES[0]], max_new_tokens=10, stop=[stop])
    assert cut == full[: full.find(stop)] and stop not in cut
    assert cut_at_stop("a b. c", [".", " b"]) == "a"


def test_beam_and_seeded_sampling(model):
    gen = Generator(model)
    beams = gen.generate(PROMPTS[:2], IMAGES[:2], num_beams=3, max_new_tokens=5)
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)
    kw = {"temperature": 1.5, "top_p": 0.95, "top_k": 50, "max_new_tokens": 8}
    first = gen.generate(PROMPTS[:2], IMAGES[:2], seed=7, **kw)
    assert gen.generate(PROMPTS[:2], IMAGES[:2], seed=7, **kw) == first
    others = {tuple(gen.generate(PROMPTS[:2], IMAGES[:2], seed=s, **kw)) for s in range(4)}
    assert len(others) > 1, "sampling ignores the seed"


def test_prompt_placeholders():
    assert prompt_content("what?", 2, 0) == "<image><image>\nwhat?"
    assert prompt_content("", 1, 0) == "<image>"
    assert prompt_content("go on", 0, 1) == "go on\n<audio>"
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        prompt_content("<image><image> hi", 1, 0)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_jsonl_over_shards_counts_bad_samples(model, tmp_path):
    export = model.export_mmpt(tmp_path / "export", template="plain")
    data = tmp_path / "data"
    data.mkdir()
    chat = {"messages": [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "a"}]}
    with TarWriter(str(data / "shard-000000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"pair{i}", "png": png(image(32, 32, i)), "txt": f"caption {i}"})
        w.write({"__key__": "chat", "png": png(image(24, 24, 9)), "json": json.dumps(chat)})
        w.write({"__key__": "corrupt", "png": b"not an image", "txt": "broken"})
        w.write({"__key__": "empty", "png": png(image(32, 32, 5)), "txt": "  "})
    out = tmp_path / "captions.jsonl"
    argv = ["generate", "--model", str(export), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in lines] == ["pair0", "pair1", "pair2", "chat"]
    assert all({"key", "prompt", "output", "reference"} <= set(r) for r in lines)
    assert lines[0]["reference"] == "caption 0" and lines[0]["prompt"] == "<image>"
    assert lines[3]["prompt"].endswith("what?") and lines[3]["reference"] == "a"
    gen = Generator(model)
    assert lines[0]["output"] == gen.generate([""], [[image(32, 32, 0)]], max_new_tokens=4)[0]


def test_cli_one_input_and_errors(model, tmp_path, capsys):
    export = model.export_mmpt(tmp_path / "export", template="plain")
    img = tmp_path / "a.png"
    image(32, 32, 0).save(img)
    base = ["generate", "--model", str(export), "--max-new-tokens", "4"]
    assert main([*base, "--image", str(img), "--device", "cpu"]) == 0
    want = Generator(model).generate([""], [[Image.open(img)]], max_new_tokens=4)[0]
    assert capsys.readouterr().out == want + "\n"
    cases = [
        ([*base, "--image", str(tmp_path / "no.png")], "--image: no such file"),
        ([*base, "--image", str(img), "--prompt", "<image><image>"], "2 <image> placeholders"),
        (["generate", "--model", str(tmp_path), "--image", str(img)], "not an mmpt export"),
        ([*base, "--image", str(img), "--template", "nope"], "--template: unknown template"),
        (["generate", "--image", str(img)], "either --model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
