"""VLM data: pairs, interleaved documents, conversations and text -> packed token rows.

One sample function reads every shape, so sources of different shapes mix in one stream:

- **conversation**: ``json`` with ``messages`` (``role``/``content``) or LLaVA's
  ``conversations`` (``from``/``value``), images named by ``json.images`` (member names) or
  the sample's single image; a conversation without ``<image>`` gets it in its first user
  turn;
- **interleaved** (OBELICS/MMC4-like): ``json`` with parallel lists ``texts`` and ``images``
  (member names such as ``"0.jpg"``); at most ``max_images`` images are kept, later ones are
  dropped with their placeholders while their text stays;
- **pair**: an image and a caption (``txt`` / ``json:caption``);
- **text**: a ``txt`` (or ``json:text``) without image.

Images are not decoded in the sample function: the token count of each comes from its size
(read from the header) through the resolution policy, so the packer can budget rows before
any pixel is decoded. The batcher packs samples into rows (first-fit-decreasing) and the
collate function decodes the images of the rows it emits.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from mmpt.batch import VLMBatch
from mmpt.datamodules.decode import MissingField, read_field
from mmpt.datamodules.image_text import ImageTextDataModule, SyntheticData
from mmpt.datamodules.packing import OVERLONG_POLICIES
from mmpt.datamodules.resolution import header_size
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.templates import IMAGE_PLACEHOLDER, Template, encode, get_template
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import PackedBatcher, VLMCollate
from mmpt.preprocess import Preprocess, VLMPreprocess

log = logging.getLogger("mmpt.data")

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class Overlong(ValueError):
    """A sample longer than ``max_seq_len`` under ``overlong: drop`` (counted as a skip)."""


class VLMSample:
    """Raw shard sample -> ``input_ids``, ``labels``, undecoded images. Picklable.

    Args:
        preprocess: The model's ``VLMPreprocess``.
        template: Prompt template.
        max_seq_len: Longest sample kept.
        overlong: ``truncate`` (cut at ``max_seq_len``, never inside an image; images after
            the cut are dropped) or ``drop`` (skip and count the sample).
        max_images: Most images a sample keeps.
        caption_prompt: User prompt of a pair, after its image (empty: the image alone, as in
            VILA's stage-1 "plain" format).
        image_key: Image extensions of a pair, ``;``-separated.
        text_key: Caption field of a pair / text of a text sample.
    """

    def __init__(
        self,
        preprocess: VLMPreprocess,
        template: Template,
        max_seq_len: int,
        overlong: str = "truncate",
        max_images: int = 6,
        caption_prompt: str = "",
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt;json:caption;json:text",
    ) -> None:
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.pre, self.template, self.max_seq_len = preprocess, template, max_seq_len
        self.overlong, self.max_images, self.caption_prompt = overlong, max_images, caption_prompt
        self.image_key, self.text_key = image_key, text_key

    def messages(self, sample: dict[str, Any]) -> tuple[list[dict[str, str]], list[bytes]]:
        """The sample as messages with ``<image>`` placeholders, and its image bytes in order.

        Raises:
            MissingField: A named image member or the text is missing.
        """
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            meta = {}
        turns = meta.get("messages") or meta.get("conversations")
        if turns:
            return self._conversation(sample, meta, turns)
        if "texts" in meta and "images" in meta:
            return self._interleaved(sample, meta)
        text = str(read_field(sample, self.text_key)).strip()
        if not text:
            raise MissingField(f"empty text in {self.text_key!r}")
        image_ext = next((k for k in self.image_key.split(";") if k in sample), None)
        if image_ext is None:
            return [{"role": "text", "content": text}], []
        prompt = IMAGE_PLACEHOLDER + (f"\n{self.caption_prompt}" if self.caption_prompt else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return messages, [sample[image_ext]]

    def _member(self, sample: dict[str, Any], name: str) -> bytes:
        if name not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise MissingField(f"image member {name!r} is missing (sample has {members})")
        return sample[name]

    def _conversation(
        self, sample: dict[str, Any], meta: dict[str, Any], turns: list[dict[str, Any]]
    ) -> tuple[list[dict[str, str]], list[bytes]]:
        messages = []
        for turn in turns:
            if "from" in turn:
                turn = {
                    "role": _LLAVA_ROLES.get(turn["from"], turn["from"]),
                    "content": turn.get("value"),
                }
            messages.append({"role": turn.get("role"), "content": turn.get("content")})
        names = meta.get("images")
        if names is None:
            ext = next((k for k in self.image_key.split(";") if k in sample), None)
            names = [ext] if ext else []
        images = [self._member(sample, n) for n in names[: self.max_images]]
        placeholders = sum(str(m["content"]).count(IMAGE_PLACEHOLDER) for m in messages)
        if images and placeholders == 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise MissingField("conversation has images but no user turn to put them in")
            first_user["content"] = IMAGE_PLACEHOLDER * len(images) + "\n" + first_user["content"]
        elif placeholders > len(images):
            messages = _drop_placeholders(messages, keep=len(images))
        return messages, images

    def _interleaved(
        self, sample: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[list[dict[str, str]], list[bytes]]:
        texts, names = meta["texts"], meta["images"]
        if len(texts) != len(names):
            raise ValueError(f"interleaved json: {len(texts)} texts for {len(names)} images")
        parts, images = [], []
        for text, name in zip(texts, names, strict=True):
            if name is not None:
                if len(images) < self.max_images:
                    images.append(self._member(sample, name))
                    parts.append(IMAGE_PLACEHOLDER)
            elif text:
                parts.append(str(text).strip())
        if not parts:
            raise MissingField("interleaved document has no text and no image")
        return [{"role": "text", "content": " ".join(parts)}], images

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tokenise one sample; raises (a counted skip) when it is bad or dropped as overlong.

        Returns:
            ``input_ids`` (L,), ``labels`` (L,), ``images`` (list of encoded image bytes),
            ``image_tokens`` (tokens reserved per image), ``key``, ``truncated`` (0/1).
        """
        messages, images = self.messages(sample)
        sizes = [header_size(b) for b in images]
        counts = [self._tokens(w, h) for w, h in sizes]
        segments = self.template.render(messages, self.pre.eos)
        enc = encode(segments, self.pre.tokenizer, self.pre.image_token_id, counts)
        marks = int((enc["input_ids"] == self.pre.image_token_id).sum())
        if marks != sum(counts):
            raise ValueError(
                f"the text holds the image token itself ({marks} image tokens for "
                f"{len(counts)} images needing {sum(counts)}): it must only come from placeholders"
            )
        n, truncated = int(enc["input_ids"].shape[0]), 0
        if n > self.max_seq_len:
            if self.overlong == "drop":
                raise Overlong(f"{n} tokens > max_seq_len={self.max_seq_len} (overlong: drop)")
            cut, kept = self._cut(enc["input_ids"], counts)
            if cut == 0:
                raise Overlong(f"its first image alone ({counts[0]} tokens) exceeds max_seq_len")
            enc = {k: v[:cut] for k, v in enc.items()}
            images, counts, truncated = images[:kept], counts[:kept], 1
            if not bool((enc["labels"][1:] != -100).any()):  # label 0 is masked when packed
                raise Overlong(f"no target token left after cutting to max_seq_len={cut}")
        if not bool((enc["labels"] != -100).any()):
            log.debug("sample %s has no target token", sample.get("__key__"))
        return {
            **enc,
            "images": images,
            "image_tokens": counts,
            "key": sample["__key__"],
            "truncated": truncated,
        }

    def _tokens(self, width: int, height: int) -> int:
        if self.pre.tokens_for_grid is None:
            return 1
        return self.pre.policy.num_tokens(width, height, self.pre.tokens_for_grid)

    def _cut(self, ids: torch.Tensor, counts: list[int]) -> tuple[int, int]:
        """Where to cut to ``max_seq_len`` without splitting an image, and images kept."""
        cut = self.max_seq_len
        pos = (ids == self.pre.image_token_id).nonzero().squeeze(1).tolist()
        start = 0
        for i, c in enumerate(counts):
            first, last = pos[start], pos[start + c - 1]
            if last >= cut:
                return (min(cut, first), i)
            start += c
        return cut, len(counts)


def _drop_placeholders(messages: list[dict[str, str]], keep: int) -> list[dict[str, str]]:
    """Remove the ``<image>`` placeholders after the first ``keep``."""
    out, seen = [], 0
    for m in messages:
        pieces = str(m["content"]).split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            text += (IMAGE_PLACEHOLDER if seen < keep else "") + piece
            seen += 1
        out.append({**m, "content": text})
    return out


class VLMDataModule(ImageTextDataModule):
    """Image-text pairs, interleaved documents, conversations and text as packed VLM batches.

    Streams, sources, mixing (``resampled`` + ``weights``), workers, synthetic data and
    validation work as in :class:`ImageTextDataModule`. ``batch_size`` counts rows of
    ``max_seq_len`` tokens when packing. Training length: a packed stream's batch count is
    known only after packing, so set ``trainer.max_steps`` (plain mode reads each shard once
    an epoch) or use ``resampled`` with ``epoch_samples`` counted in rows. Under DDP use
    ``resampled``: in plain mode ranks could pack to different row counts.

    Args:
        template: Prompt template name (``plain``, ``chatml``, ``llama3``, ``vicuna``).
        max_seq_len: Row length (packing) / longest sample.
        packing: Pack samples into rows; False pads each sample to its batch's longest.
        overlong: ``truncate`` or ``drop`` samples longer than ``max_seq_len`` (counted).
        max_images: Most images a sample keeps (VILA keeps 6 in interleaved documents).
        caption_prompt: User prompt after a pair's image (empty for "plain" pretraining).
        buffer_size: Samples the packer looks at together (each holds its image bytes).
        min_fill: Fill a row needs to leave the packing buffer before the stream ends.
        **kwargs: :class:`ImageTextDataModule` arguments (``train``, ``val``, ``test``,
            ``batch_size``, ``num_workers``, ``image_key``, ``text_key``, ``seed``,
            ``synthetic``, ``preprocess``).
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        template: str = "plain",
        max_seq_len: int = 4096,
        packing: bool = True,
        overlong: str = "truncate",
        max_images: int = 6,
        caption_prompt: str = "",
        buffer_size: int = 256,
        min_fill: float = 0.95,
        image_key: str = "jpg;jpeg;png;webp",
        text_key: str = "txt;json:caption;json:text",
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: VLMPreprocess | Preprocess | None = None,
    ) -> None:
        super().__init__(
            train=train,
            val=val,
            test=test,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            image_key=image_key,
            text_key=text_key,
            label_key=None,
            seed=seed,
            synthetic=synthetic,
            preprocess=preprocess,  # type: ignore[arg-type]
        )
        self.template = get_template(template)
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.max_seq_len, self.packing, self.overlong = max_seq_len, packing, overlong
        self.max_images, self.caption_prompt = max_images, caption_prompt
        self.buffer_size, self.min_fill = buffer_size, min_fill

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """The packed stream of one split."""
        pre = self.preprocess
        if not isinstance(pre, VLMPreprocess):
            raise ValueError(
                "VLMDataModule needs a VLM model (data.preprocess is linked from model."
                f"preprocess, got {type(pre).__name__}): use mmpt.models.vlm.VLMModule"
            )
        rank, world = self._world()
        if train and world > 1 and not config.resampled:
            raise ValueError(
                f"{field}: packed VLM streams under DDP need {field}.resampled: true with "
                f"{field}.epoch_samples (rows an epoch), so every rank takes the same steps"
            )
        sample_fn = VLMSample(
            pre,
            self.template,
            self.max_seq_len,
            self.overlong,
            self.max_images,
            self.caption_prompt,
            self.image_key,
            self.text_key,
        )
        rows = self.batch_size if train else self.val_batch_size
        batcher = PackedBatcher(
            self.max_seq_len,
            pre.pad_id,
            rows,
            self.packing,
            self.buffer_size,
            self.min_fill,
        )
        return ShardStream(
            config.sources(field),
            config,
            sample_fn,
            VLMCollate(pre, self.template.name),
            batch_size=rows,
            partial=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            batcher=batcher,
        )

    def normalize(self, batch: VLMBatch) -> VLMBatch:  # type: ignore[override]
        """uint8 crops -> normalised float, with the vision tower's mean and std."""
        pre = self.preprocess.image  # type: ignore[union-attr]
        batch.pixels = [normalize_images(p, pre.mean, pre.std) for p in batch.pixels]
        return batch


__all__ = ["PackedBatcher", "VLMCollate", "VLMDataModule", "VLMSample"]
