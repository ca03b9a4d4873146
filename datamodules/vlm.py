"""VLM data: packed rows of pairs, interleaved documents, conversations, speech and text.

The sample shapes are read by :class:`~mmpt.datamodules.vlm_sample.VLMSample`; this module
builds the packed stream of each split.
"""

from __future__ import annotations

import logging

from mmpt.batch import VLMBatch
from mmpt.datamodules.audio import AUDIO_EXTENSIONS, normalize_audio
from mmpt.datamodules.image_text import ImageTextDataModule, SyntheticData
from mmpt.datamodules.packing import OVERLONG_POLICIES
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.templates import get_template
from mmpt.datamodules.transforms import normalize_images
from mmpt.datamodules.vlm_batching import PackedBatcher, VLMCollate
from mmpt.datamodules.vlm_sample import Overlong, VLMSample, check_speech_input
from mmpt.preprocess import Preprocess, VLMPreprocess

log = logging.getLogger("mmpt.data")


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
        buffer_size: Samples the packer looks at together (each holds its image bytes or
            decoded clip).
        min_fill: Fill a row needs to leave the packing buffer before the stream ends.
        audio_key: Audio extensions that make a sample a speech sample.
        speech_input: ``audio`` (the clip's adapter tokens) or ``transcript`` (its text; a
            text-only LLM stage on the same shards, or the text upper bound).
        speech_prompt: Instruction before the clip in the user turn (empty: none).
        speech_target_key: Target of a speech sample (BLSP: the continuation).
        transcript_key: Transcript field, for ``speech_input: transcript``.

    The other arguments are :class:`ImageTextDataModule`'s (``train``, ``val``, ``test``,
    ``batch_size``, ``num_workers``, ``image_key``, ``text_key``, ``seed``, ``synthetic``,
    ``preprocess``, ``eval_sets``, ``max_skipped_fraction``).
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
        audio_key: str = AUDIO_EXTENSIONS,
        speech_input: str = "audio",
        speech_prompt: str = "",
        speech_target_key: str = "json:continuation;json:transcript;txt",
        transcript_key: str = "json:transcript;txt",
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: VLMPreprocess | Preprocess | None = None,
        eval_sets: dict[str, StreamConfig] | None = None,
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
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
            eval_sets=eval_sets,
            max_skipped_fraction=max_skipped_fraction,
        )
        self.template = get_template(template)
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.max_seq_len, self.packing, self.overlong = max_seq_len, packing, overlong
        self.max_images, self.caption_prompt = max_images, caption_prompt
        self.buffer_size, self.min_fill = buffer_size, min_fill
        check_speech_input(speech_input)
        self.speech = {
            "audio_key": audio_key,
            "speech_input": speech_input,
            "speech_prompt": speech_prompt,
            "speech_target_key": speech_target_key,
            "transcript_key": transcript_key,
        }

    def required_fields(self, meta: dict) -> dict[str, str]:
        """None: pairs, interleaved documents and conversations each hold their text apart."""
        return {}

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
            **self.speech,
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
        """uint8 crops -> normalised float (the vision tower's mean and std).

        Clips are standardised per clip over their true length when the encoder asks for it.
        """
        pre = self.preprocess
        if pre.image is not None:  # type: ignore[union-attr]
            mean, std = pre.image.mean, pre.image.std  # type: ignore[union-attr]
            batch.pixels = [normalize_images(p, mean, std) for p in batch.pixels]
        audio = pre.audio  # type: ignore[union-attr]
        if batch.audio is not None and audio is not None and audio.normalize:
            batch.audio = normalize_audio(batch.audio, batch.audio_lengths)
        return batch


__all__ = ["Overlong", "PackedBatcher", "VLMCollate", "VLMDataModule", "VLMSample"]
