"""Speech with transcripts as CTC targets: label ids checked against the encoder's frames."""

from __future__ import annotations

import random
from typing import Any

import torch

from mmpt.batch import AudioTextBatch
from mmpt.ctc_vocab import CTCTokenizer, frames_needed, pad_labels
from mmpt.datamodules.audio import AudioReader, pad_audio
from mmpt.datamodules.audio_text import AudioTextDataModule
from mmpt.datamodules.decode import read_captions, read_label
from mmpt.preprocess import AudioPreprocess, Tokenizer


class CTCSample:
    """Raw sample -> (clip (N,), [label ids], label, key, oov count). Picklable for workers.

    Clips longer than the tower's ``max_seconds`` are not cropped (their transcript would
    no longer match) but skipped; so is a transcript that needs more CTC frames than the
    clip gives (each a ``ValueError``: counted under its reason in ``data/skipped``).

    Args:
        read_audio: Sample -> mono clip (with ``crop=False``).
        tokenizer: The model's :class:`~mmpt.ctc_vocab.CTCTokenizer`.
        text_key: Transcript field(s); one transcript (at random if several) is the target.
        label_key: Class id field, None for none.
        allow_unlabelled: A sample without a transcript gives an empty target (unlabelled
            audio, for semi-supervised training) instead of a skip.
    """

    def __init__(
        self,
        read_audio: AudioReader,
        tokenizer: CTCTokenizer,
        text_key: str,
        label_key: str | None,
        allow_unlabelled: bool = False,
    ) -> None:
        self.read_audio, self.tokenizer = read_audio, tokenizer
        self.text_key, self.label_key = text_key, label_key
        self.allow_unlabelled = allow_unlabelled

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list, int, str, int]:
        """Decode one sample; raises (a counted skip) on a bad clip or an unfit transcript."""
        try:
            transcripts = read_captions(sample, self.text_key)
        except KeyError:
            if not self.allow_unlabelled:
                raise
            clip = self.read_audio(sample)
            return clip, [[], ""], read_label(sample, self.label_key), sample["__key__"], 0
        text = transcripts[0] if len(transcripts) == 1 else random.choice(transcripts)
        ids, oov = self.tokenizer.vocab.encode(text)
        if not ids:
            raise ValueError("empty transcript after normalisation")
        clip = self.read_audio(sample)
        if frames_needed(ids) > int(self.tokenizer.frames(clip.shape[0])):
            raise ValueError(
                "CTC target longer than the encoder's frames of its clip (too many labels for "
                "the audio: check the transcript, or use a subword vocabulary)"
            )
        return clip, [ids, text], read_label(sample, self.label_key), sample["__key__"], oov


class CTCCollate:
    """Pad clips and label rows into an :class:`~mmpt.batch.AudioTextBatch`.

    ``text_tokens`` is (B, L) label ids padded with -100 (one row per clip, ``text_to_audio``
    is ``arange(B)``); the batch also carries ``transcripts`` (B strings, as read) and
    ``oov`` (characters mapped to ``<unk>`` in the batch).
    """

    def __call__(self, items: list[tuple[torch.Tensor, list, int, str, int]]) -> AudioTextBatch:
        """Collate decoded samples into one batch."""
        audio, lengths = pad_audio([it[0] for it in items])
        batch = AudioTextBatch(
            audio=audio,
            audio_lengths=lengths,
            text_tokens=pad_labels([it[1][0] for it in items]),
            text_to_audio=torch.arange(len(items)),
            keys=[it[3] for it in items],
            labels=torch.tensor([it[2] for it in items], dtype=torch.long),
        )
        batch.transcripts = [it[1][1] for it in items]
        batch.oov = sum(it[4] for it in items)
        return batch


class CTCDataModule(AudioTextDataModule):
    """Speech shards with transcripts -> CTC batches (see :class:`CTCCollate`).

    Takes :class:`~mmpt.datamodules.audio_text.AudioTextDataModule`'s arguments; the model
    must give a :class:`~mmpt.ctc_vocab.CTCTokenizer` (``mmpt.models.ctc.CTCModule``).
    ``text_key`` defaults to ``json:transcript;txt;json:text``.

    Args:
        allow_unlabelled: Keep training clips without a transcript as unlabelled rows (all
            -100 labels, empty transcript) for semi-supervised training (wav2vec-S: mix an
            unlabelled source with a labelled one by ``train.weights``); validation always
            needs transcripts.
        *args, **kwargs: :class:`~mmpt.datamodules.audio_text.AudioTextDataModule`'s.
    """

    def __init__(self, *args: Any, allow_unlabelled: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("text_key", "json:transcript;txt;json:text")
        kwargs.setdefault("label_key", None)
        super().__init__(*args, **kwargs)
        self.allow_unlabelled = allow_unlabelled

    def required_fields(self, meta: dict) -> dict[str, str]:
        """The transcript field (training and validation read it)."""
        return {"data.val_text_key": self.val_text_key} if self.val_text_key else {}

    def sample_fn(self, pre: AudioPreprocess, train: bool, text_key: str | None) -> CTCSample:
        """A :class:`CTCSample` (never crops; skips clips longer than ``max_seconds``).

        Raises:
            ValueError: The model gives no CTC tokenizer, or no transcript field is set.
        """
        tokenizer = self.preprocess.tokenizer
        if not isinstance(tokenizer, CTCTokenizer):
            raise ValueError(
                "data: CTCDataModule needs a CTC model (model.class_path: "
                "mmpt.models.ctc.CTCModule or WavSModule)"
            )
        if not text_key:
            raise ValueError("data.text_key: CTC training needs the transcript field")
        reader = AudioReader(pre, train, self.audio_key, crop=False)
        unlabelled = self.allow_unlabelled and train
        return CTCSample(reader, tokenizer, text_key, self.label_key, unlabelled)

    def collate_fn(self, tokenizer: Tokenizer | None) -> CTCCollate:
        """A :class:`CTCCollate`."""
        return CTCCollate()


__all__ = ["CTCCollate", "CTCDataModule", "CTCSample"]
