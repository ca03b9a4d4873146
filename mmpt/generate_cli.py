"""``mmpt generate``: images / audio + a prompt -> text, for one input or over WebDataset shards."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmpt.cli_args import Parser

if TYPE_CHECKING:
    from mmpt.generate import Decoding, Generator
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.generate")

EXAMPLES = """examples:
  mmpt generate --model runs/vila_tiny/export --image cat.jpg --prompt "What is this?"
  mmpt generate -c configs/quickstart/vila_stage1.yaml --ckpt last.ckpt --image cat.jpg
  mmpt generate --model EXPORT --data data/shapes/val --out captions.jsonl --batch-size 16
"""


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mmpt generate",
        description="Generate text from a VLM: an export folder (--model) or a training "
        "config + checkpoint (-c/--ckpt; extra --model... flags override the config).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", help="export folder (mmpt export, or a transformers LLaVA folder)")
    src.add_argument("-c", "--config", action="append", help="training config(s) of --ckpt")
    src.add_argument("--ckpt", help="checkpoint (.ckpt) of the -c config")
    src.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    inp = p.add_argument_group("input")
    inp.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    inp.add_argument("--audio", action="append", default=[], help="audio clip (speech models)")
    inp.add_argument("--prompt", default=None, help="user prompt (<image> added when missing)")
    inp.add_argument("--template", help="chat template (default: the one the model trained with)")
    inp.add_argument("--system", help="system prompt")
    inp.add_argument("--data", help="shards to caption / answer (folder, glob or brace pattern)")
    inp.add_argument("--out", help="JSONL output of --data (one line per sample)")
    inp.add_argument("--batch-size", type=int, default=8, help="prompts per batch (--data)")
    dec = p.add_argument_group("decoding (greedy by default)")
    dec.add_argument("--max-new-tokens", type=int, default=64)
    dec.add_argument("--temperature", type=float, default=0.0, help="> 0 samples")
    dec.add_argument("--top-p", type=float, default=1.0)
    dec.add_argument("--top-k", type=int, default=0)
    dec.add_argument("--num-beams", type=int, default=1, help="beam search width")
    dec.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    dec.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt generate``; returns an exit code (2 for bad input)."""
    args, overrides = _parser().parse_known_args(argv)
    from mmpt.user_errors import run_reporting_errors

    return run_reporting_errors(lambda: _run(args, overrides))


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from mmpt.datamodules.templates import get_template
    from mmpt.generate import Decoding, Generator, prompt_content

    _check_args(args, overrides)
    if args.template is not None:
        get_template(args.template, "--template")
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    images = [_image(path) for path in args.image]
    if not args.data:  # placeholder errors before the model loads
        prompt_content(args.prompt or "", len(images), len(args.audio))
    model = load_model(args, overrides)
    gen = Generator(model, args.template, args.system)
    if args.data:
        return _run_shards(gen, args, decoding)
    clips = [_clip(gen, path) for path in args.audio]
    (text,) = gen.generate([args.prompt or ""], [images], [clips], **vars(decoding))
    print(text)
    return 0


def check_model_source(args: argparse.Namespace, overrides: list[str]) -> None:
    """``--model DIR`` or ``-c CONFIG --ckpt CKPT``, exactly one (generate and eval caption/...).

    Raises:
        ValueError: Neither or both, ``--ckpt`` without a config, or a config/override given
            with an export folder.
    """
    if (args.model is None) == (args.ckpt is None):
        raise ValueError("give either --model EXPORT_DIR or -c CONFIG --ckpt CKPT")
    if args.ckpt is not None and not args.config:
        raise ValueError("--ckpt needs the training config(s) it was made with: -c CONFIG")
    if args.model is not None and (args.config or overrides):
        extra = "-c" if args.config else overrides[0]
        raise ValueError(f"{extra}: an export folder (--model) takes no config or overrides")


def _check_args(args: argparse.Namespace, overrides: list[str]) -> None:
    check_model_source(args, overrides)
    if bool(args.data) != bool(args.out):
        raise ValueError("--data and --out go together: shards in, captions.jsonl out")
    if args.data and (args.image or args.audio):
        raise ValueError("--image/--audio are for one input; --data reads the shards' media")
    if min(args.batch_size, args.max_new_tokens, args.num_beams) < 1:
        raise ValueError("--batch-size, --max-new-tokens and --num-beams must be >= 1")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")


def _image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image: no such file {path!r}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image: {path!r} is not a readable image ({err})") from err


def _clip(gen: Generator, path: str) -> torch.Tensor:
    from mmpt.datamodules.audio import AudioReader

    if not Path(path).is_file():
        raise FileNotFoundError(f"--audio: no such file {path!r}")
    if gen.pre.audio is None:
        raise ValueError("--audio: the model has no speech encoder")
    reader = AudioReader(gen.pre.audio, train=False)
    return reader.read(Path(path).read_bytes(), Path(path).suffix.lstrip(".").lower())


def load_model(args: argparse.Namespace, overrides: list[str]) -> VLMModule:
    """The model of ``--model`` or ``-c``/``--ckpt`` on ``--device`` (fp32 on the CPU).

    On a GPU it keeps its own dtype. ``mmpt generate`` and ``mmpt eval caption|vqa|choice|all``
    load with it.
    """
    from transformers.utils import logging as hf_logging

    from mmpt.models.vlm import VLMModule

    hf_logging.disable_progress_bar()  # stderr keeps to mmpt's own bar and messages
    if args.model is not None:
        import mmpt

        model = mmpt.load(args.model)
    else:
        from mmpt.models.module import load_checkpoint
        from mmpt.run_config import build_from_config

        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
        cli = build_from_config(args.config, overrides, cpu=True)
        model = cli.model
        if not isinstance(model, VLMModule):
            raise ValueError(f"{type(model).__name__} does not generate text (VLMModule does)")
        load_checkpoint(model, args.ckpt)
        model.data_template = getattr(getattr(cli.datamodule, "template", None), "name", None)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (use --device cpu)")
    model = model.to(torch.device(name))
    return model.float().eval() if name == "cpu" else model.eval()


# ---- over shards ----------------------------------------------------------------------------


def _run_shards(gen: Generator, args: argparse.Namespace, decoding: Decoding) -> int:
    """Generate for every sample of ``--data`` into ``--out`` (JSONL); corrupt ones are skipped."""
    from rich import progress as bar

    from mmpt.datamodules.stages import batched
    from mmpt.datamodules.urls import resolve_source

    source = resolve_source(args.data, "--data")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0, "empty": 0}
    columns = [bar.TextColumn("[bold]generating"), bar.BarColumn(), bar.MofNCompleteColumn()]
    progress = bar.Progress(*columns, bar.TimeElapsedColumn(), transient=True)
    with progress, out.open("w") as f:
        task = progress.add_task("generate", total=source.num_samples)
        samples = _samples(gen, source.urls, args.prompt, counts)
        for items in batched(samples, args.batch_size, partial=True):
            texts = gen.generate_encoded([it.pop("encoded") for it in items], **vars(decoding))
            for item, text in zip(items, texts, strict=True):
                counts["empty"] += not text.strip()
                f.write(json.dumps({**item, "output": text}, ensure_ascii=False) + "\n")
            f.flush()
            counts["written"] += len(items)
            progress.update(task, completed=counts["written"] + counts["skipped"])
    print(
        f"wrote {counts['written']} lines to {out} ({counts['skipped']} corrupt samples skipped, "
        f"{counts['empty']} empty outputs)"
    )
    return 0


def _samples(
    gen: Generator, urls: list[str], prompt: str | None, counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Each good sample as key, prompt, reference, its encoding; bad ones counted, skipped."""
    import webdataset as wds

    from mmpt.datamodules.decode import decode_image
    from mmpt.datamodules.stages import DataError
    from mmpt.datamodules.vlm_sample import VLMSample

    def skip(exn: BaseException) -> bool:
        counts["skipped"] += 1
        log.warning("skipped an unreadable sample: %s", exn)
        return True

    reader = VLMSample(gen.pre, gen.template, max_seq_len=1 << 30)
    for sample in wds.WebDataset(urls, shardshuffle=False, handler=skip, empty_check=False):
        key = sample.get("__key__", "?")
        try:
            messages, image_bytes, clips = reader.messages(sample)
            images = [decode_image(b) for b in image_bytes]
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            asked = [m["content"] for m in messages[:first] if m["role"] == "user"]
            text = prompt if prompt is not None else "\n".join(asked)
            encoded = gen.encode(text, images, clips)  # bad placeholders or media: a skip
        except DataError:  # the data does not fit the model: every sample would fail
            raise
        except Exception as e:  # noqa: BLE001 - any bad sample is counted and skipped
            skip(ValueError(f"{key}: {e}"))
            continue
        item = {"key": key, "prompt": text, "encoded": encoded}
        if first is not None:
            item["reference"] = messages[first]["content"]
        yield item
