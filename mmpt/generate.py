"""Text generation from a VLM: images / audio clips + a prompt -> text, batched with left padding.

The prompt is formatted with the chat template the model trained with, media are encoded and
spliced as in training (:meth:`VLMModule.embed_inputs`), and decoding runs the LLM's own
Hugging Face ``generate`` on those embeddings (KV cache, greedy / sampling / beam search).
Gated cross-attention models keep their image context set for the whole ``generate`` call::

    gen = Generator(mmpt.load("export/"))
    gen.generate(["Describe the image."], [[Image.open("cat.jpg")]], max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mmpt.batch import VLMBatch
from mmpt.datamodules.audio import normalize_audio, pad_audio
from mmpt.datamodules.packing import IGNORE_INDEX
from mmpt.datamodules.resolution import ImageCrops
from mmpt.datamodules.templates import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    Segment,
    encode,
    get_template,
    stop_token_ids,
)
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import group_crops

Encoded = tuple[torch.Tensor, list[ImageCrops], list[torch.Tensor]]
"""One encoded prompt: input_ids (L,) long, its images' ``ImageCrops``, its clips (N_i,)."""

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule


@dataclass
class Decoding:
    """How to pick tokens (greedy by default).

    Attributes:
        max_new_tokens: Most tokens generated per prompt.
        temperature: > 0 samples at this temperature; 0 is greedy (or beam search).
        top_p: Nucleus sampling mass (1.0: off).
        top_k: Sample among the k likeliest tokens (0: off).
        num_beams: Beam search width (1: off).
        stop: Strings that end a generation; the output is cut before the first one.
        seed: Seed of the sampling RNG (reproducible samples); None draws from the global RNG.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None


def prompt_content(prompt: str, images: int, clips: int) -> str:
    """The user turn: ``prompt`` with ``<image>`` / ``<audio>`` placeholders, as in training.

    Placeholders are added when the prompt has none (images before the text, a clip after
    it, as the pair and speech samples put them).

    Raises:
        ValueError: The prompt has placeholders but not one per image / clip.
    """
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found == 0 and images:
        prompt = IMAGE_PLACEHOLDER * images + (f"\n{prompt}" if prompt else "")
    elif found != images:
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders for {images} images: "
            "give one image per placeholder"
        )
    found = prompt.count(AUDIO_PLACEHOLDER)
    if found == 0 and clips:
        prompt = (f"{prompt}\n" if prompt else "") + AUDIO_PLACEHOLDER * clips
    elif found != clips:
        raise ValueError(
            f"the prompt has {found} {AUDIO_PLACEHOLDER} placeholders for {clips} audio clips: "
            "give one clip per placeholder"
        )
    return prompt


class Generator:
    """Batched generation with a :class:`VLMModule` (on the device and dtype it is on).

    Args:
        model: The model (``mmpt.load`` or a checkpoint); put it in eval mode on its device.
        template: Chat template name; default the one it trained with
            (``model.data_template``), else ``plain``.
        system: System prompt (none by default).

    Raises:
        ValueError: Unknown template.
    """

    def __init__(
        self, model: VLMModule, template: str | None = None, system: str | None = None
    ) -> None:
        self.model = model.eval()
        self.template = get_template(template or model.data_template or "plain", "template")
        self.system = system
        self.pre = model.preprocess
        self.eos_ids = stop_token_ids(self.pre.tokenizer, self.template.name)

    @property
    def device(self) -> torch.device:
        """Device of the LLM."""
        return self.model.llm.model.get_input_embeddings().weight.device

    def encode(
        self, prompt: str, images: Sequence[Image.Image], clips: Sequence[torch.Tensor]
    ) -> Encoded:
        """One prompt -> (input_ids (L,) long, its images' ``ImageCrops``, its clips (N_i,)).

        Raises:
            ValueError: Placeholder counts differ from the media; media the model lacks.
        """
        if images and self.model.vision is None:
            raise ValueError("images given but the model has no vision tower")
        if clips and self.model.audio is None:
            raise ValueError("audio given but the model has no speech encoder")
        content = prompt_content(prompt, len(images), len(clips))
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": content})
        segments = self.template.render(messages, self.pre.eos)
        segments.append(Segment(self.template.assistant_prefix, False))
        crops = [self.pre.policy(img.convert("RGB")) for img in images]
        clip_tokens = [self.pre.tokens_for_samples(c.shape[0]) for c in clips] if clips else []
        ids = encode(
            [s for s in segments if s.text],
            self.pre.tokenizer,
            self.pre.image_token_id,
            [self.pre.image_tokens(c) for c in crops],
            self.pre.audio_token_id,
            clip_tokens,
        )["input_ids"]
        return ids, crops, list(clips)

    def batch(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        audio: Sequence[Sequence[torch.Tensor]] | None = None,
    ) -> tuple[VLMBatch, torch.Tensor]:
        """Left-padded rows of the prompts, their media normalised, on the model's device.

        Returns:
            The batch (one row and segment per prompt) and its attention mask (B, L) long.
        """
        n = len(prompts)
        images = images or [[] for _ in range(n)]
        audio = audio or [[] for _ in range(n)]
        if not len(images) == len(audio) == n:
            raise ValueError(f"{n} prompts but {len(images)} image lists, {len(audio)} audio")
        return self.collate(
            [self.encode(p, i, a) for p, i, a in zip(prompts, images, audio, strict=True)]
        )

    def collate(self, encoded: Sequence[Encoded]) -> tuple[VLMBatch, torch.Tensor]:
        """Left-padded rows of prompts already encoded by :meth:`encode`, on the model's device.

        Returns:
            The batch (one row and segment per prompt) and its attention mask (B, L) long.
        """
        n = len(encoded)
        length = max(int(ids.shape[0]) for ids, _, _ in encoded)
        input_ids = torch.full((n, length), self.pre.pad_id, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for row, (ids, _, _) in enumerate(encoded):
            input_ids[row, length - ids.shape[0] :] = ids
            mask[row, length - ids.shape[0] :] = 1
        pixels, layouts = group_crops([c for _, crops, _ in encoded for c in crops])
        clips = [c for _, _, cs in encoded for c in cs]
        dev = self.device
        batch = VLMBatch(
            input_ids=input_ids.to(dev),
            labels=torch.full_like(input_ids, IGNORE_INDEX).to(dev),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(dev),
            cu_seqlens=torch.arange(0, n * length + 1, length, dtype=torch.int32, device=dev),
            max_seqlen=length,
            images=layouts,
            template=self.template.name,
            num_samples=n,
        )
        if pixels:
            pre, dtype = self.pre.image, _dtype(self.model.vision)
            batch.pixels = [normalize_images(p, pre.mean, pre.std).to(dev, dtype) for p in pixels]
        if clips:
            wave, lengths = pad_audio(clips)
            if self.pre.audio.normalize:
                wave = normalize_audio(wave, lengths)
            batch.audio, batch.audio_lengths = (
                wave.to(dev, _dtype(self.model.audio)),
                lengths.to(dev),
            )
        return batch, mask.to(dev)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        audio: Sequence[Sequence[torch.Tensor]] | None = None,
        decoding: Decoding | None = None,
    ) -> list[list[int]]:
        """New token ids of each prompt (up to, without, the first end-of-turn token)."""
        return self._generate(*self.batch(prompts, images, audio), decoding or Decoding())

    def generate_encoded(self, encoded: Sequence[Encoded], **decoding: object) -> list[str]:
        """:meth:`generate` for prompts already encoded by :meth:`encode` (no second encoding).

        Args:
            encoded: B results of :meth:`encode`.
            **decoding: :class:`Decoding` fields.

        Returns:
            B texts, as :meth:`generate` returns them.
        """
        settings = Decoding(**decoding)  # type: ignore[arg-type]
        with torch.no_grad():
            ids = self._generate(*self.collate(encoded), settings)
        return self._texts(ids, settings)

    def _generate(self, batch: VLMBatch, mask: torch.Tensor, settings: Decoding) -> list[list[int]]:
        """New token ids of each row of a collated batch (see :meth:`generate_ids`)."""
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.temperature > 0,
            temperature=settings.temperature if settings.temperature > 0 else 1.0,
            top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else None,
            num_beams=settings.num_beams,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pre.pad_id,
            use_cache=True,
        )
        fusion = self.model.fusion
        try:
            embeds = self.model.embed_inputs(batch)
            with _seeded(settings.seed, self.device), _hf_sdpa(self.model.llm.model):
                out = self.model.llm.model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList(
                        [StopOnText(self.pre.tokenizer, settings.stop)] if settings.stop else []
                    ),
                )
        finally:
            if fusion is not None:
                fusion.context.clear()
        rows = []
        for seq in out.tolist():
            cut = next((i for i, t in enumerate(seq) if t in self.eos_ids), len(seq))
            rows.append(seq[:cut])
        return rows

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]] | None = None,
        audio: Sequence[Sequence[torch.Tensor]] | None = None,
        **decoding: object,
    ) -> list[str]:
        """Generate one text per prompt.

        Args:
            prompts: B user prompts (``<image>`` / ``<audio>`` placeholders optional).
            images: B lists of PIL images (None: no images).
            audio: B lists of mono float32 clips (N,) at the model's sample rate.
            **decoding: :class:`Decoding` fields (``max_new_tokens``, ``temperature`` ...).

        Returns:
            B texts, special tokens dropped, cut before the first ``stop`` string.
        """
        settings = Decoding(**decoding)  # type: ignore[arg-type]
        return self._texts(self.generate_ids(prompts, images, audio, settings), settings)

    def _texts(self, ids: list[list[int]], settings: Decoding) -> list[str]:
        """Decoded texts of new token ids, special tokens dropped, cut at the stop strings."""
        texts = self.pre.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [cut_at_stop(t, settings.stop) for t in texts]


class StopOnText(StoppingCriteria):
    """Ends a sequence once its decoded new text holds a stop string (any tokenizer).

    transformers' own ``stop_strings`` needs a BPE / SentencePiece vocabulary; this decodes
    the generated ids, so word-level tokenizers work too.
    """

    def __init__(self, tokenizer: object, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        # A stop string first completes within the last len(stop) tokens (a token decodes to
        # at least one character), so each step decodes a short tail, not the whole text.
        self.window = max((len(s) for s in self.stop), default=0) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, T) generated ids -> (B,) bool, True where a stop string appeared."""
        tail = input_ids[:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    ends = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def _hf_sdpa(llm: torch.nn.Module) -> Iterator[None]:
    """Decode with transformers' SDPA attention when the LLM trained with mmpt's packed one.

    Generation rows are left-padded, not packed: HF's SDPA path is made for that (its padding
    mask and cache), while the packed path would read the pads as a segment of their own.
    """
    impl = getattr(llm.config, "_attn_implementation", None) or ""
    if not impl.startswith("mmpt_packed"):
        yield
        return
    llm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        llm.set_attn_implementation(impl)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNGs sampling uses, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


__all__ = ["Decoding", "Generator", "StopOnText", "cut_at_stop", "prompt_content"]
