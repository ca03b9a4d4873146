"""VILA-style VLM: vision tower -> connector -> LLM, by token injection or gated cross-attention.

Stages differ only in YAML (``trainable``, LR, data): stage 1 trains the connector, stage 2
the connector and the LLM on interleaved documents and pairs, stage 3 fine-tunes on chat data.
Speech is one more modality (BLSP): a speech encoder -> ``SpeechAdapter`` -> the same LLM, its
tokens injected at ``<audio>`` placeholders of the same packed rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmpt.batch import VLMBatch
from mmpt.datamodules.resolution import AnyResTiles, FixedResolution, NativeResolution
from mmpt.datamodules.templates import check_targets
from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.attention import hf_packing_kwargs, is_packed_implementation
from mmpt.models.connectors import ConnectorTokens, MLP2xGelu, SpeechAdapter
from mmpt.models.connectors.anyres import arrange_crops
from mmpt.models.fusion import (
    FusionBlocks,
    FusionConfig,
    fusion_context,
    insert_gated_cross_attention,
)
from mmpt.models.llm import CausalLM, shuffle_same_count, splice_tokens
from mmpt.models.module import MMPTModule, trains
from mmpt.models.schedules import Schedule
from mmpt.preprocess import VLMPreprocess

log = logging.getLogger("mmpt.vlm")

ResolutionPolicy = FixedResolution | AnyResTiles | NativeResolution


class VLMModule(MMPTModule):
    """Vision and/or speech encoders, their connectors and a causal LM on packed multimodal rows.

    With neither ``vision`` nor ``audio`` it is a plain LM on text (e.g. teaching a tiny LLM
    the text task before a frozen-LLM adapter stage).

    Args:
        llm: The LLM backbone and its tokenizer.
        vision: Vision tower with ``patch_features`` (B, C, H, W) -> (B, N, D) from its
            ``feature_layer``, ``patch_grid``, ``patch_size``, ``feature_dim`` and
            ``image_preprocess`` (``TimmVisionTower``, ``OpenCLIPVisionTower``,
            ``HFVisionTower``); None for a speech-only or text-only model.
        connector: ``(vision_dim, llm_dim) -> connector`` (YAML: a ``class_path`` with the
            other ``init_args``); default ``MLP2xGelu``.
        resolution: Dynamic resolution policy; default ``FixedResolution`` at the tower's size.
        fusion: Gated cross-attention instead of injecting image tokens into the sequence.
        val_shuffled_images: Also compute the validation loss with images shuffled across
            samples (``val/loss_shuffled_images``, ``val/image_gain``): how much the model uses
            the image.
        audio: Speech encoder with ``frame_features`` (B, N), (B,) -> (B, T, D), (B,),
            ``lengths``, ``feature_dim`` and ``audio_preprocess`` (``Wav2Vec2Tower``,
            ``LogMelTower``); None for no speech input.
        audio_adapter: ``(audio_dim, llm_dim) -> adapter`` with ``lengths`` (YAML: a
            ``class_path`` with the other ``init_args``); default ``SpeechAdapter``.
        audio_token: Placeholder token of one clip (added to the tokenizer when missing).
        val_no_audio: Also compute the validation loss with every audio token zeroed
            (``val/loss_no_audio``, ``val/audio_gain``): the no-audio baseline of the same
            rows, i.e. how much the model uses the speech.
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze (``vision.*``, ``llm.*``, ``connector.*``, ``fusion.*``,
            ``audio.*``, ``audio_adapter.*``).
        trainable: Patterns that alone train (stage 1: ``["connector.*"]``; BLSP:
            ``["audio_adapter.*"]``).
        init_from: The previous stage's checkpoint.
        init_from_strict: Refuse a checkpoint of which too little loads (see :class:`MMPTModule`).
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).
    """

    def __init__(
        self,
        llm: CausalLM,
        vision: nn.Module | None = None,
        connector: Callable[[int, int], nn.Module] | None = None,
        resolution: ResolutionPolicy | None = None,
        fusion: FusionConfig | None = None,
        val_shuffled_images: bool = True,
        audio: nn.Module | None = None,
        audio_adapter: Callable[[int, int], nn.Module] | None = None,
        audio_token: str = "<audio>",
        val_no_audio: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        if fusion is not None and (vision is None or audio is not None):
            raise ValueError(
                "model.fusion (gated cross-attention) fuses images: it needs model.vision and "
                "no model.audio (speech tokens are injected into the sequence)"
            )
        self.fusion_config = fusion
        #: Name of the data template the model trained with, when known (set by
        #: :meth:`from_export`; ``mmpt generate`` formats prompts with it).
        self.data_template: str | None = None
        if fusion is not None:  # registered first, so its parameters are named fusion.*
            self.fusion: FusionBlocks | None = insert_gated_cross_attention(
                llm.model, llm.hidden_size, fusion.every, fusion.heads, fusion.ff_mult
            )
        else:
            self.fusion = None
        self.llm, self.vision = llm, vision
        self.val_shuffled_images, self.val_no_audio = val_shuffled_images, val_no_audio
        self.audio = audio
        if audio is not None:
            self.audio_adapter = (audio_adapter or SpeechAdapter)(
                int(audio.feature_dim), llm.hidden_size
            )
            self.audio_token, self.audio_token_id = audio_token, llm.add_token(audio_token)
        if vision is None:
            self.connector, self.resolution = None, None
            return
        self.connector = (connector or MLP2xGelu)(int(vision.feature_dim), llm.hidden_size)
        self.resolution = resolution or FixedResolution(
            vision.image_preprocess.size, int(vision.patch_size)
        )
        if getattr(self.resolution, "row_end_token", False) and fusion is None:
            self._check_grid_preserving()
            width = llm.hidden_size
            # on the connector, so ``connector.*`` trains it and the connector export holds it
            newline = nn.Parameter(torch.randn(width) / width**0.5)
            self.connector.register_parameter("image_newline", newline)

    @property
    def image_newline(self) -> nn.Parameter | None:
        """The learned AnyRes row-end embedding (llm_dim,), a parameter of the connector."""
        return getattr(self.connector, "image_newline", None)

    def on_fit_start(self) -> None:
        """Apply :meth:`train` (Lightning keeps submodule modes: frozen towers go to eval)."""
        super().on_fit_start()
        self.train()

    def train(self, mode: bool = True) -> VLMModule:
        """Train mode, except for frozen encoders (their dropout/norm stats stay fixed)."""
        super().train(mode)
        for tower in (self.vision, self.audio):
            if mode and tower is not None and not trains(tower):
                tower.eval()
        return self

    def _zero_for_unused(self, batch: VLMBatch) -> torch.Tensor:
        """0 x every trainable weight of a modality the batch lacks, to add to its loss.

        It gives those weights a (zero) gradient, so DDP's reducer and the backward of a
        frozen LLM do not fail on rows without images or without audio.
        """
        unused: list[nn.Module | None] = []
        if not batch.images:
            unused += [self.vision, self.connector, self.fusion]
        if batch.audio is None and self.audio is not None:
            unused += [self.audio, self.audio_adapter]
        elif self.audio is not None:  # frame features never reach the pooled projection
            unused.append(getattr(self.audio, "proj", None))
        params = [
            p for mod in unused if mod is not None for p in mod.parameters() if p.requires_grad
        ]
        return sum((p.sum() * 0.0 for p in params), torch.zeros(()))

    def _check_grid_preserving(self) -> None:
        side = self.resolution.tile_size // self.resolution.patch_size
        if self.connector.num_output_tokens(side * side, (side, side)) != side * side:
            raise ValueError(
                f"model.resolution.row_end_token puts one token per patch row of the tiled "
                f"canvas, but {type(self.connector).__name__} changes the patch grid: use a "
                "grid-preserving connector (mlp2x_gelu) or set row_end_token: false"
            )

    @property
    def preprocess(self) -> VLMPreprocess:
        """Tokenizer, media tokens, resolution policy and token counts for the datamodule."""
        tok = self.llm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        vision, audio = self.vision is not None, self.audio is not None
        return VLMPreprocess(
            tokenizer=tok,
            image_token_id=self.llm.image_token_id if vision else None,
            pad_id=int(pad if pad is not None else 0),
            eos=tok.eos_token or "",
            policy=self.resolution,
            tokens_for_grid=(
                ConnectorTokens(self.connector) if vision and self.fusion is None else None
            ),
            image=self.vision.image_preprocess if vision else None,
            audio_token_id=self.audio_token_id if audio else None,
            tokens_for_samples=(
                self.audio.lengths.then(self.audio_adapter.lengths) if audio else None
            ),
            audio=self.audio.audio_preprocess if audio else None,
        )

    def image_tokens(self, batch: VLMBatch) -> list[torch.Tensor]:
        """Connector tokens of every image of the batch, in token order.

        Returns:
            One (K_i, llm_dim) tensor per image: its crops' tokens, with AnyRes tiles laid
            out as a canvas and a row-end token after each canvas row when configured.
        """
        if not batch.images:
            return []
        if self.vision is None:
            raise ValueError("the batch has images but the model has no vision tower")
        train_vision = torch.is_grad_enabled() and trains(self.vision)
        groups = []
        for pixels in batch.pixels:
            with torch.set_grad_enabled(train_vision):
                feats = self.vision.patch_features(pixels)
            grid = self.vision.patch_grid(pixels.shape[-2], pixels.shape[-1])
            groups.append(self.connector(feats, grid))
        crops = [[groups[g][i] for g, i in im.crops] for im in batch.images]
        if self.fusion is not None:  # cross-attention reads the crops' tokens as they are
            return [torch.cat(c) for c in crops]
        pairs = zip(crops, batch.images, strict=True)
        return [arrange_crops(c, im, self.image_newline) for c, im in pairs]

    def audio_tokens(self, batch: VLMBatch) -> list[torch.Tensor]:
        """Adapter tokens of every audio clip of the batch, in token order.

        Returns:
            One (K_i, llm_dim) tensor per clip, ``K_i = tokens_for_samples(length_i)``.
        """
        if batch.audio is None:
            return []
        if self.audio is None:
            raise ValueError("the batch has audio but the model has no speech encoder")
        assert batch.audio_lengths is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains(self.audio)):
            frames, frame_lengths = self.audio.frame_features(batch.audio, batch.audio_lengths)
        tokens, counts = self.audio_adapter(frames, frame_lengths)
        return [t[:n] for t, n in zip(tokens, counts.tolist(), strict=True)]

    shuffle_images = staticmethod(shuffle_same_count)

    def forward(
        self,
        batch: VLMBatch,
        shuffle_images: bool = False,
        zero_audio: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        """LLM output (logits (R, L, vocab), loss) on a packed batch.

        Args:
            batch: Packed rows and their images and audio clips.
            shuffle_images: Swap images between samples (a control: the loss it gives
                minus the true loss is how much the model relies on the images).
            zero_audio: Replace every audio token by zeros (the no-audio baseline).
            logits_to_keep: > 0: logits of the last this many positions only (R, k, vocab),
                as transformers' argument (scoring left-padded rows needs no more).

        Raises:
            ValueError: Media token and media counts disagree; packed rows with an LLM
                attention that would let packed samples see each other.
        """
        impl = getattr(self.llm.model.config, "_attn_implementation", None)
        if batch.num_samples > len(batch) and not is_packed_implementation(impl):
            raise ValueError(
                f"packed rows need block-diagonal attention, but the LLM uses {impl!r}: set "
                "model.llm.attn_implementation: packed (or data.packing: false)"
            )
        embeds = self.embed_inputs(batch, shuffle_images, zero_audio)
        return self.llm(
            inputs_embeds=embeds,
            position_ids=batch.position_ids,
            labels=batch.labels,
            use_cache=False,
            **hf_packing_kwargs(batch.cu_seqlens, batch.max_seqlen),
            logits_to_keep=logits_to_keep,  # transformers' argument; 0 keeps every position
        )

    def embed_inputs(
        self, batch: VLMBatch, shuffle_images: bool = False, zero_audio: bool = False
    ) -> torch.Tensor:
        """LLM input embeddings (R, L, llm_dim) of a batch, its media in place.

        With token injection the image and audio tokens replace their placeholders. Under
        fusion the image markers keep their embeddings and the gated blocks' context is set
        to the batch's images (it stays set until the next batch: keep it through backward,
        or through ``generate``).

        Args:
            batch: Rows (packed or left-padded) and their images and audio clips.
            shuffle_images: Swap images between samples (see :meth:`forward`).
            zero_audio: Replace every audio token by zeros.

        Raises:
            ValueError: Media token and media counts disagree.
        """
        tokens = self.image_tokens(batch)
        if shuffle_images:
            tokens = self.shuffle_images(tokens)
        marks = batch.input_ids == self.llm.image_token_id
        embeds = self.llm.embed(batch.input_ids)
        if self.fusion is not None:
            fusion_context(self.fusion, batch, tokens, marks, embeds)
            return embeds
        embeds = splice_tokens(embeds, marks, tokens, "image")
        if self.audio is not None:
            clips = self.audio_tokens(batch)
            if zero_audio:
                clips = [torch.zeros_like(t) for t in clips]
            audio_marks = batch.input_ids == self.audio_token_id
            embeds = splice_tokens(embeds, audio_marks, clips, "audio")
        return embeds

    def training_step(self, batch: VLMBatch, batch_idx: int) -> torch.Tensor:
        """Next-token loss on target text; logs fill fraction, skipped and truncated samples."""
        check_targets(batch.labels, batch.template)
        loss = self(batch).loss
        loss = loss + self._zero_for_unused(batch).to(loss)
        n = batch.num_samples
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/fill_fraction", batch.fill_fraction, batch_size=n)
        self.log("data/skipped", float(batch.skipped), reduce_fx="sum", batch_size=n)
        self.log("data/truncated", float(batch.num_truncated), reduce_fx="sum", batch_size=n)
        self.log_data_counts(batch, (), n)  # unreadable shards (data/skipped_shards ...)
        return loss

    def _eval_step(self, batch: VLMBatch, stage: str) -> None:
        """Losses under ``stage/`` (the metric prefix: ``val``, ``val/<set>`` or ``test``)."""
        check_targets(batch.labels, batch.template)
        n = batch.num_samples
        log = partial(self.log, batch_size=n, add_dataloader_idx=False)
        loss = self(batch).loss
        log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        if self.val_shuffled_images and len(batch.images) > 1:
            # not synced: a rank whose batches hold < 2 images never logs these keys
            shuffled = self(batch, shuffle_images=True).loss
            log(f"{stage}/loss_shuffled_images", shuffled)
            log(f"{stage}/image_gain", shuffled - loss)
        if self.val_no_audio and batch.audio is not None:
            # not synced either: a rank whose batches hold no audio never logs these keys
            silent = self(batch, zero_audio=True).loss
            log(f"{stage}/loss_no_audio", silent)
            log(f"{stage}/audio_gain", silent - loss)

    def validation_step(self, batch: VLMBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Held-out loss, and the loss with images shuffled (``val/<set>/`` with several sets)."""
        self._eval_step(batch, eval_prefix(self._trainer, "val", dataloader_idx))

    def test_step(self, batch: VLMBatch, batch_idx: int) -> None:
        """As validation, logged under ``test/``."""
        self._eval_step(batch, "test")

    def export_mmpt(self, path: str | Path, template: str | None = None) -> Path:
        """Write mmpt's ``mmpt-vlm/3`` folder to ``path``; returns it.

        ``template``: the data template the model trained with (None: unknown).
        """
        from mmpt.models.vlm_export import export_mmpt_vlm

        return export_mmpt_vlm(self, path, template)

    @classmethod
    def from_export(cls, path: str | Path, attn_implementation: str | None = None) -> VLMModule:
        """Rebuild the exact model of an ``mmpt-vlm/3`` export folder (no training config).

        Args:
            path: The folder written by :meth:`export_mmpt` (``mmpt export``).
            attn_implementation: The LLM's attention; default the one it trained with.

        Returns:
            The model in eval mode on the CPU, ``data_template`` set from the export.

        Raises:
            FileNotFoundError: No such folder, or a file of the export is missing (named).
            ValueError: Not an mmpt export, or another format version (both named).
        """
        from mmpt.models.vlm_load import load_export

        return load_export(path, attn_implementation)
