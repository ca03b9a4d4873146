"""Shared pieces of the VLM data tests: a word tokenizer, preprocess, shards, samples."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer

from mmpt.batch import VLMBatch
from mmpt.datamodules.packing import IGNORE_INDEX
from mmpt.datamodules.resolution import FixedResolution
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.vlm import VLMDataModule, VLMSample
from mmpt.preprocess import ImagePreprocess, VLMPreprocess
from mmpt.shards import ShardWriter
from mmpt.synth.vocab import write_word_tokenizer

WORDS = [
    *("hello", "world", "a", "red", "circle", "the", "end", "what", "is", "this"),
    *("user", "assistant", "system", "USER", "ASSISTANT", ":"),
]


def grid_tokens(grid: tuple[int, int]) -> int:
    """One LLM token per vision patch (module level: picklable)."""
    return grid[0] * grid[1]


def make_pre(tok: Any, policy: Any = None, tokens_for_grid: Any = grid_tokens) -> VLMPreprocess:
    """Default policy FixedResolution(32, 8): a 4 x 4 grid, so 16 tokens an image."""
    return VLMPreprocess(
        tokenizer=tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_id=tok.pad_token_id,
        eos="</s>",
        policy=policy or FixedResolution(32, 8),
        tokens_for_grid=tokens_for_grid,
        image=ImagePreprocess(size=32),
    )


def image_bytes(size: tuple[int, int], fmt: str = "PNG", seed: int = 0) -> bytes:
    """A ``size`` = (width, height) image with distinct, non-black pixels."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(30, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format=fmt)
    return buf.getvalue()


def doc(key: str, texts: list[str | None], images: list[str | None], **members: bytes) -> dict:
    """An interleaved sample as webdataset yields it (bytes values)."""
    return {
        "__key__": key,
        "json": json.dumps({"texts": texts, "images": images}).encode(),
        **members,
    }


def runs(ids: torch.Tensor, value: int) -> list[int]:
    """Lengths of the runs of ``value`` over ``ids`` flattened row-major."""
    out, n = [], 0
    for v in ids.flatten().tolist():
        if v == value:
            n += 1
        elif n:
            out, n = [*out, n], 0
    return [*out, n] if n else out


def kept_text(tok: Any, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def write_shard(folder: Path, samples: list[dict]) -> Path:
    with ShardWriter(folder, samples_per_shard=1000, modalities=["image", "text"]) as w:
        for s in samples:
            w.write(s)
    return folder


def train_batches(urls: Path, pre: VLMPreprocess, **kw: Any) -> list[VLMBatch]:
    """One plain pass (no shuffling, no workers) over ``urls`` as a VLMDataModule streams it."""
    kw = {"batch_size": 2, "max_seq_len": 128, **kw}
    dm = VLMDataModule(
        train=StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False),
        num_workers=0,
        preprocess=pre,
        **kw,
    )
    dm.setup("fit")
    return list(dm.train_dataloader())


def word_tokenizer(folder: Path) -> Any:
    """The tests' word-level tokenizer, saved under ``folder`` and loaded back."""
    return AutoTokenizer.from_pretrained(write_word_tokenizer(folder / "tokenizer", WORDS))


def sample_fn(pre: VLMPreprocess, template: str = "plain", max_seq_len: int = 256, **kw):
    return VLMSample(pre, get_template(template), max_seq_len, **kw)
