"""Caption accuracy of the VLM quickstart: mmpt generate vs the exported transformers folder.

After ``mmpt fit -c configs/quickstart/vila_stage1.yaml``, captions the 192 held-out shapes
twice: with ``mmpt generate`` (checkpoint + config) and with transformers' own
``AutoModelForImageTextToText`` + ``AutoProcessor`` on the ``mmpt export`` folder. A caption
is right on an attribute when it names the image's colour (shape, size, position) and no
other; chance is one over the number of values. Writes a JSON report and prints a table.

    python scripts/quickstart_captions.py --ckpt runs/vila_tiny/.../last.ckpt
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from mmpt.synth.image_text import COLORS, POSITIONS, SHAPES, SIZE_SYNONYMS, SIZES

#: attribute -> {value: words that name it}
WORDS = {
    "color": {c: (c,) for c in COLORS},
    "shape": {s: (s,) for s in SHAPES},
    "size": {s: (s, SIZE_SYNONYMS[s]) for s in SIZES},
    "position": {p: (p,) for p in POSITIONS},
}


def named(text: str, attribute: str) -> set[str]:
    """The values of ``attribute`` a caption names."""
    padded = f" {' '.join(text.lower().replace(':', ' ').split())} "
    return {v for v, words in WORDS[attribute].items() if any(f" {w} " in padded for w in words)}


def score(outputs: dict[str, str], truth: dict[str, dict]) -> dict[str, float]:
    """Fraction of captions naming exactly the right value, per attribute and all four."""
    right = {a: 0 for a in WORDS} | {"color+shape": 0, "all": 0}
    for key, text in outputs.items():
        ok = {a: named(text, a) == {truth[key][a]} for a in WORDS}
        for a in WORDS:
            right[a] += ok[a]
        right["color+shape"] += ok["color"] and ok["shape"]
        right["all"] += all(ok.values())
    return {k: v / max(1, len(outputs)) for k, v in right.items()}


def chance() -> dict[str, float]:
    """Uniform guessing of each attribute's value."""
    c = {a: 1 / len(v) for a, v in WORDS.items()}
    c["color+shape"] = c["color"] * c["shape"]
    c["all"] = c["color+shape"] * c["size"] * c["position"]
    return c


def read_val(data: str) -> tuple[dict[str, dict], dict[str, bytes]]:
    """Attributes and image bytes of every held-out sample, by key."""
    truth, images = {}, {}
    for s in wds.WebDataset(sorted(str(p) for p in Path(data).glob("*.tar")), shardshuffle=False):
        truth[s["__key__"]] = json.loads(s["json"])
        images[s["__key__"]] = s["jpg"]
    return truth, images


def transformers_captions(folder: Path, images: dict[str, bytes], max_new: int) -> dict[str, str]:
    """Greedy captions from transformers' own classes on the exported folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = {}
    for key, data in images.items():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1] :]
        out[key] = processor.decode(new, skip_special_tokens=True).strip()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="configs/quickstart/vila_stage1.yaml")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default="data/shapes/val")
    p.add_argument("--out", default=None, help="report folder (default: beside --ckpt)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    out = Path(args.out or Path(args.ckpt).parent.parent / "captions")
    out.mkdir(parents=True, exist_ok=True)
    truth, images = read_val(args.data)
    mmpt = [sys.executable, "-m", "mmpt.cli"]
    jsonl = out / "mmpt_generate.jsonl"
    subprocess.run(
        [*mmpt, "generate", "-c", args.config, "--ckpt", args.ckpt, "--data", args.data,
         "--out", str(jsonl), "--device", "cpu", "--max-new-tokens", str(args.max_new_tokens)],
        check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    via_mmpt = {r["key"]: r["output"] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        subprocess.run(
            [*mmpt, "export", "-c", args.config, "--ckpt", args.ckpt, "--out", str(folder),
             "--format", "llava"],
            check=True,
        )  # fmt: skip
        via_hf = transformers_captions(folder, images, args.max_new_tokens)
    same = sum(via_mmpt[k] == via_hf.get(k) for k in via_mmpt) / max(1, len(via_mmpt))
    report = {
        "samples": len(truth),
        "mmpt_generate": score(via_mmpt, truth),
        "transformers_export": score(via_hf, truth),
        "chance": chance(),
        "identical_captions": same,
        "examples": [
            {"key": k, "reference": truth[k]["caption"], "mmpt": via_mmpt[k], "hf": via_hf[k]}
            for k in list(via_mmpt)[:8]
        ],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'attribute':<12} {'mmpt generate':>14} {'transformers':>13} {'chance':>8}")
    for a in report["chance"]:
        m, h, c = report["mmpt_generate"][a], report["transformers_export"][a], chance()[a]
        print(f"{a:<12} {m:>14.3f} {h:>13.3f} {c:>8.3f}")
    print(f"identical captions: {same:.3f} of {len(via_mmpt)}; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
