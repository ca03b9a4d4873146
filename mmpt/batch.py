"""Typed batches: the only objects that cross from datamodules to models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageTextBatch:
    """A collated batch of images with one or more captions each.

    Captions are flattened: ``text_tokens`` holds every caption of every image in the batch,
    and ``text_to_image`` says which image (row of ``images``) each caption belongs to. In
    training each image has exactly one caption, so ``text_to_image == arange(B)``.

    Attributes:
        images: (B, C, H, W) uint8 pixels (RGB) or float32 raw values (multispectral tiles) as
            produced by the workers; the datamodule turns them into normalised float32 on the
            device (``on_after_batch_transfer``).
        text_tokens: Long tensor (M, L) of token ids, M >= B.
        text_to_image: Long tensor (M,), index into ``images`` for each caption.
        keys: The ``__key__`` of each image sample, length B.
        labels: Optional long tensor (B,) of class ids (for zero-shot classification), -1 when
            a sample has no label (or a class name not yet mapped to an id).
        skipped: Samples the producing worker dropped as corrupt or incomplete since its
            previous batch (summed and logged as ``data/skipped``).
        label_names: Class names of the samples whose label is a name with no known class
            list ("" for the others), length B; None when there are none. ``mmpt eval
            zeroshot`` builds the classes from them.
    """

    images: torch.Tensor
    text_tokens: torch.Tensor
    text_to_image: torch.Tensor
    keys: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    skipped: int = 0
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_texts(self) -> int:
        """Number of captions M in the batch."""
        return self.text_tokens.shape[0]


@dataclass
class ImageBatch:
    """A collated batch of images with optional class labels (MAE pretraining, probes).

    Attributes:
        images: (B, C, H, W) uint8 pixels (RGB) or float32 raw values (multispectral tiles) as
            produced by the workers; normalised float32 on the device after
            ``on_after_batch_transfer``.
        labels: Long tensor (B,) of class ids, -1 when a sample has no label.
        keys: The ``__key__`` of each sample, length B.
        skipped: Samples the producing worker dropped as corrupt or incomplete since its
            previous batch (summed and logged as ``data/skipped``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class AudioTextBatch:
    """A collated batch of audio clips with one or more captions (or transcripts) each.

    Attributes:
        audio: (B, N) float32 mono waveforms at the model's sample rate, zero-padded after
            each clip's true length; standardised per clip on the device after
            ``on_after_batch_transfer`` when the model asks for it.
        audio_lengths: Long tensor (B,), the true length of each clip in samples.
        text_tokens: Long tensor (M, L) of token ids, M >= B; (0, 0) when the model takes no
            text (self-supervised speech pretraining).
        text_to_audio: Long tensor (M,), index into ``audio`` for each caption.
        keys: The ``__key__`` of each clip, length B.
        labels: Optional long tensor (B,) of class ids, -1 when a clip has no label.
        skipped: Samples dropped as corrupt, empty or too short since the previous batch.
    """

    audio: torch.Tensor
    audio_lengths: torch.Tensor
    text_tokens: torch.Tensor
    text_to_audio: torch.Tensor
    keys: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return self.audio.shape[0]

    @property
    def num_texts(self) -> int:
        """Number of captions M in the batch."""
        return self.text_tokens.shape[0]


@dataclass
class ImageLayout:
    """Where one image's crops are in a :class:`VLMBatch` and how its tokens are arranged.

    Attributes:
        crops: (group, index) of each crop in ``VLMBatch.pixels``, in the LLM's order.
        grids: Vision-tower patch grid (h, w) of each crop.
        row_end_tokens: Row-end separator tokens after the tiled canvas rows (AnyRes), else 0.
        tiles: AnyRes tile grid (rows, cols), else None.
        global_view: Whether crop 0 is a global view rather than a tile.
    """

    crops: list[tuple[int, int]]
    grids: list[tuple[int, int]]
    row_end_tokens: int = 0
    tiles: tuple[int, int] | None = None
    global_view: bool = False


@dataclass
class VLMBatch:
    """Packed token rows with the images whose tokens they hold.

    The image tokens in row-major order over ``input_ids`` are those of ``images[0]``, then
    ``images[1]`` ... (token injection: as many as the image's tokens, so adjacent images
    form one run; fusion: one marker token per image).

    Attributes:
        input_ids: (R, L) long token ids.
        labels: (R, L) long targets, -100 on prompts, image tokens, padding and each sample's
            first token.
        position_ids: (R, L) positions restarting at 0 for every packed sample.
        cu_seqlens: int32 (S + 1,) offsets of every segment (pad tails too) in the flattened
            R * L tokens.
        max_seqlen: Longest segment.
        pixels: One uint8 (n_g, 3, H_g, W_g) tensor per distinct crop size (normalised float
            after ``on_after_batch_transfer``).
        images: Layout of every image, in token order.
        keys: ``__key__`` of every packed sample, in row order.
        template: Name of the data template (quoted by errors on all-masked labels).
        num_samples: Samples packed in the batch.
        num_real_tokens: Non-pad tokens.
        num_truncated: Samples cut to ``max_seq_len``.
        skipped: Samples dropped as corrupt, incomplete or overlong since the previous batch.
        audio: (A, N) float32 waveforms of the batch's audio clips in token order (audio
            token runs in row-major order over ``input_ids`` are clip 0, 1 ...), zero-padded;
            None when the batch has no audio.
        audio_lengths: Long tensor (A,), true length of each clip in samples.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixels: list[torch.Tensor] = field(default_factory=list)
    images: list[ImageLayout] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    template: str = "plain"
    num_samples: int = 0
    num_real_tokens: int = 0
    num_truncated: int = 0
    skipped: int = 0
    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def fill_fraction(self) -> float:
        """Non-pad tokens / all tokens."""
        return self.num_real_tokens / max(1, self.input_ids.numel())


@dataclass
class VideoTextBatch:
    """A collated batch of video clips with one or more narrations each (EgoClip-style).

    Training batches hold 2B clips for EgoNCE's scene-aware negatives: rows ``0..B-1`` are the
    anchors and row ``B + i`` is a clip of the same video as anchor ``i`` (within the
    neighbour window) when one was available, else a clip of another video (counted in
    ``no_neighbour``). Both halves are ordinary pairs for the loss.

    Attributes:
        videos: (N, T, C, H, W) uint8 frames from the workers; normalised float32 on the device
            after ``on_after_batch_transfer``.
        text_tokens: Long tensor (M, L) of token ids, M >= N (several narrations per clip in
            evaluation).
        text_to_video: Long tensor (M,), index into ``videos`` for each narration.
        nouns: (N, num_nouns) float multi-hot noun tags (all zero when the data has none).
        verbs: (N, num_verbs) float multi-hot verb tags.
        keys: ``__key__`` of each clip.
        video_uids: The source video of each clip.
        skipped: Samples dropped as corrupt or incomplete since the previous batch.
        clamped: Clips whose time window ran past the video and was clamped.
        no_neighbour: Anchors for which no same-video clip was at hand.
    """

    videos: torch.Tensor
    text_tokens: torch.Tensor
    text_to_video: torch.Tensor
    nouns: torch.Tensor
    verbs: torch.Tensor
    keys: list[str] = field(default_factory=list)
    video_uids: list[str] = field(default_factory=list)
    skipped: int = 0
    clamped: int = 0
    no_neighbour: int = 0

    def __len__(self) -> int:
        return self.videos.shape[0]


@dataclass
class VideoFeatureBatch:
    """Precomputed clip features (e.g. S3D, one vector per second) with candidate captions.

    Attributes:
        features: (N, T, D) float32 feature sequences, zero-padded after each clip's length.
        frame_mask: (N, T) bool, True on real feature steps.
        text_tokens: Long tensor (M, L), every clip's candidate captions (M >= N).
        text_to_video: Long tensor (M,), the clip of each caption; a clip's first caption is
            the one its generative objectives use.
        captions: The M caption strings (references for caption metrics).
        keys: ``__key__`` of each clip.
        skipped: Samples dropped as corrupt or incomplete since the previous batch.
    """

    features: torch.Tensor
    frame_mask: torch.Tensor
    text_tokens: torch.Tensor
    text_to_video: torch.Tensor
    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass
class GroundingBatch:
    """Images with a caption each, the caption's phrases and the boxes they name.

    Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1] of the (resized) image. Phrases are
    token masks of the caption (from character spans); a phrase names one or more boxes.

    Attributes:
        images: (B, C, H, W) uint8 pixels from the workers, normalised float32 on the device.
        text_tokens: (B, L) long caption ids.
        boxes: (B, G, 4) float boxes, padded.
        box_mask: (B, G) bool, real boxes.
        phrase_tokens: (B, P, L) bool, the tokens of each phrase, padded.
        phrase_boxes: (B, P, G) bool, the boxes each phrase names.
        phrase_mask: (B, P) bool, real phrases.
        keys: The ``__key__`` of each sample, length B.
        skipped: Samples the producing worker dropped as corrupt since its previous batch.
    """

    images: torch.Tensor
    text_tokens: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    phrase_tokens: torch.Tensor
    phrase_boxes: torch.Tensor
    phrase_mask: torch.Tensor
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def box_tokens(self) -> torch.Tensor:
        """(B, G, L) bool: the tokens of every phrase that names each box."""
        named = self.phrase_boxes.transpose(1, 2).float() @ self.phrase_tokens.float()
        return named > 0


@dataclass
class DenseBatch:
    """A collated batch of dense-task samples (semantic masks, instances, oriented boxes).

    Samples of a multi-task mixture carry different annotations; each task's loss uses the
    samples that have its annotation.

    Attributes:
        images: (B, 3, H, W) uint8 pixels from the workers; normalised float32 on the device.
        masks: (B, H, W) long class ids, 255 (ignored) where a sample has no mask.
        has_mask: (B,) bool, the sample has a semantic mask.
        instances: Per sample None (no instance annotation) or ``boxes`` (M, 4) xyxy float,
            ``labels`` (M,) long, ``masks`` (M, H, W) uint8.
        obbs: Per sample None (no oriented boxes) or ``boxes`` (M, 5) ``(cx, cy, w, h,
            angle)`` float, ``labels`` (M,) long, ``difficult`` (M,) bool.
        keys: The ``__key__`` of each sample.
        skipped: Samples the producing worker dropped as corrupt since its previous batch.
    """

    images: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    instances: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    obbs: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]
