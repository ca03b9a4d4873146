"""Test helpers: tiny shard folders made on the fly, tiny model configs."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mmpt.shards import ShardWriter


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    """A small random JPEG."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(
    out: Path, n: int, per_shard: int, prefix: str = "shard", start: int = 0, tag: str = ""
) -> Path:
    """``n`` image-text samples (keys ``{tag}{i:06d}``) in shards of ``per_shard``."""
    with ShardWriter(
        out, samples_per_shard=per_shard, prefix=prefix, modalities=["image", "text"]
    ) as w:
        for i in range(start, start + n):
            w.write(
                {
                    "__key__": f"{tag}{i:06d}",
                    "jpg": jpeg_bytes(i),
                    "txt": f"caption {tag}{i}",
                    "json": {
                        "captions": [f"caption {tag}{i}", f"another {tag}{i}"],
                        "label": i % 3,
                    },
                }
            )
    return out


TINY_VISION = {
    "class_path": "mmpt.models.encoders.TimmVisionTower",
    "init_args": {
        "model_name": "vit_tiny_patch16_224",
        "image_size": 32,
        "embed_dim": 16,
        "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
}
TINY_TEXT = {
    "class_path": "mmpt.models.encoders.OpenCLIPTextTower",
    "init_args": {
        "model_name": "ViT-B-16",
        "embed_dim": 16,
        "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1},
    },
}

#: Tiny HF wav2vec 2.0 config (3 conv layers: 400 samples per frame), with codebooks.
TINY_WAV2VEC2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [32, 32, 32],
    "conv_kernel": [10, 3, 3],
    "conv_stride": [5, 4, 4],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "codevector_dim": 32,
    "proj_codevector_dim": 16,
    "num_codevectors_per_group": 32,
    "num_codevector_groups": 2,
    "mask_time_length": 2,
}

TINY_LOG_MEL = {
    "class_path": "mmpt.models.encoders.LogMelTower",
    "init_args": {"n_mels": 16, "width": 32, "depth": 1, "heads": 2, "subsample": 2},
}

TINY_LLM_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def write_tiny_bert(path: Path, words: list[str]) -> Path:
    """A 3-layer BERT (width 24, no dropout) + WordLevel tokenizer with [MASK], saved to path.

    ``words`` must start with [PAD], [UNK], [CLS], [SEP], [MASK] (ids 0-4).
    """
    from mmpt.synth.text_encoder import write_bert

    return write_bert(path, words, hidden_size=24, layers=3, heads=2, max_positions=16)


TINY_BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#c", "c", "a", "the", "opens"]
TINY_VIDEO = {
    "class_path": "mmpt.models.encoders.VideoViTTower",
    "init_args": {
        "model_name": "vit_tiny_patch16_224",
        "image_size": 32,
        "num_frames": 2,
        "embed_dim": 16,
        "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
}


def init_gloo(rank: int, init_file: str, world_size: int) -> None:
    """Join a CPU (gloo) process group through a shared file, with a 60 s timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def ddp_average_(grads: dict) -> dict:
    """DDP's gradient reduction by hand: all-reduce SUM, then divide by world size (in place)."""
    import torch.distributed as dist

    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


def write_img2dataset_shards(
    out: Path,
    n: int,
    per_shard: int,
    label: Callable[[int], object] | None = None,
    bad_images: bool = False,
) -> Path:
    """Shards as img2dataset writes them (``jpg``, ``txt``, ``json``; no ``index.json``).

    Written with webdataset's own ``TarWriter``, not mmpt's builder.

    Args:
        out: Folder for ``00000.tar``, ``00001.tar`` ...
        n: Samples.
        per_shard: Samples a shard.
        label: Sample index -> value of a json ``class`` field (None: no such field).
        bad_images: Write bytes that are no image in every ``jpg``.
    """
    import json

    from webdataset import TarWriter

    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with TarWriter(str(out / f"{s // per_shard:05d}.tar")) as tw:
            for i in range(s, min(n, s + per_shard)):
                key = f"{i:09d}"
                meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success"}
                meta |= {"caption": f"caption {i}", "width": 24, "height": 24}
                if label is not None:
                    meta["class"] = label(i)
                jpg = b"not a jpeg" if bad_images else jpeg_bytes(i)
                tw.write(
                    {"__key__": key, "jpg": jpg, "txt": f"caption {i}", "json": json.dumps(meta)}
                )
    return out
