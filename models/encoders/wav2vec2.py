"""Speech tower: a wav2vec 2.0-family model (HF wav2vec2/HuBERT/WavLM/data2vec or torchaudio)."""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, Wav2Vec2ForPreTraining

from mmpt.preflight import missing_weights_error
from mmpt.preprocess import AudioPreprocess

from . import class_path, resolve_feature_layer
from .hf_vision import _NOT_ARCHITECTURE, _preprocessor_config
from .lengths import ConvLengths, length_mask, pool_frames
from .tokenizers import resolve_hf_path

# The tower sits at model.audio (BLSP, CLAP) or model.encoder (wav2vec 2.0 pretraining), so its
# errors name the class's argument; the missing-weights one names both flags.
FLAG = "Wav2Vec2Tower"
PRETRAINED_FLAG = "--model.audio.pretrained (or --model.encoder.pretrained)"
SOURCES = ("hf", "torchaudio")


def _missing_weights(path: str, source: str, repo_id: str | None) -> Exception:
    """The offline error: what to fetch, where, and which argument sets it."""
    if source == "hf":
        return missing_weights_error("Speech weights", path, repo_id, PRETRAINED_FLAG)
    return FileNotFoundError(
        f"Speech weights not found at {path!r} (nothing is downloaded at run time). Save a "
        "torchaudio model's state dict there (e.g. `torch.save(torchaudio.pipelines."
        f"WAV2VEC2_BASE.get_model().state_dict(), {path!r})`); {PRETRAINED_FLAG} sets where "
        "it is read."
    )


def _hf_lengths(cfg: PretrainedConfig) -> ConvLengths:
    """Samples -> frames of an HF speech model (conv feature encoder [+ adapter])."""
    lengths = ConvLengths(tuple(cfg.conv_kernel), tuple(cfg.conv_stride))
    if getattr(cfg, "add_adapter", False):  # each adapter conv: (n - 1) // stride + 1
        n = cfg.num_adapter_layers
        lengths = lengths.then(ConvLengths((1,) * n, (cfg.adapter_stride,) * n))
    return lengths


def _load_hf(pretrained: str, pretraining_head: bool, repo_id: str | None) -> nn.Module:
    """Load an HF speech model offline (float32), with the pretraining head when asked."""
    try:
        path = resolve_hf_path(pretrained, "config.json", PRETRAINED_FLAG)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json")
        loader = Wav2Vec2ForPreTraining if pretraining_head else AutoModel
        model, info = loader.from_pretrained(
            path, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except OSError as err:  # no folder / config.json / weights file
        raise _missing_weights(pretrained, "hf", repo_id) from err
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{pretrained}: the checkpoint lacks {len(missing)} weights of "
            f"{type(model).__name__} ({missing[:5]} ...); check {FLAG}.pretrained "
            "(continued pretraining needs a checkpoint with its quantizer, e.g. XLS-R)."
        )
    return model.train()  # not from_pretrained's eval mode: SpecAugment, LayerDrop, dropout


def _build_torchaudio(pretrained: str | None, config: dict | None, builder: str) -> nn.Module:
    """A torchaudio ``Wav2Vec2Model`` from ``wav2vec2_model(**config)`` or a builder + .pt."""
    import torchaudio.models

    if config is not None:
        return torchaudio.models.wav2vec2_model(**config)
    assert pretrained is not None
    if not os.path.isfile(pretrained):
        raise _missing_weights(pretrained, "torchaudio", None)
    if not hasattr(torchaudio.models, builder):
        raise ValueError(f"{FLAG}.torchaudio_builder: torchaudio.models has no {builder!r}")
    model = getattr(torchaudio.models, builder)()
    from mmpt.safe_load import load_tensors

    model.load_state_dict(load_tensors(pretrained))
    return model


class Wav2Vec2Tower(nn.Module):
    """A wav2vec 2.0-family speech encoder: raw 16 kHz samples -> 50 Hz frame features.

    Padding rule (wav2vec 2.0): models whose conv feature encoder uses group norm (base
    models) were trained without an attention mask and must get zero padding only; models with
    a layer-norm feature encoder (large, XLS-R) get one. ``attention_mask="auto"`` follows it.

    Attributes:
        model: The HF model (``Wav2Vec2ForPreTraining`` with ``pretraining_head``) or the
            torchaudio ``Wav2Vec2Model``.
        source: ``"hf"`` or ``"torchaudio"``.
        pretraining_head: Whether ``model`` carries the quantizer and projections.
        uses_attention_mask: Whether padded batches get an attention mask (lengths).
        feature_dim: Width D of the frame features.
        output_dim: Width of ``forward``: ``embed_dim`` if > 0, else ``feature_dim``.
        proj: Linear ``feature_dim -> embed_dim``, or None.
    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("pretrained",)

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        source: str = "hf",
        torchaudio_builder: str = "wav2vec2_base",
        pretraining_head: bool = False,
        attention_mask: str | bool = "auto",
        feature_layer: int = -1,
        embed_dim: int = 0,
        sample_rate: int = 16000,
        max_seconds: float = 20.0,
        normalize: bool | None = None,
        freeze_feature_encoder: bool = False,
        gradient_checkpointing: bool = False,
        repo_id: str | None = None,
    ) -> None:
        """Load or build the speech model.

        Args:
            pretrained: HF: a folder with ``config.json`` (+ ``preprocessor_config.json``) or
                a cached repo id. torchaudio: a state-dict ``.pt`` of ``torchaudio_builder``.
            config: Random-init architecture. HF: ``Wav2Vec2Config`` fields (``model_type``
                optional, default ``wav2vec2``; also ``hubert``, ``wavlm``,
                ``data2vec-audio``). torchaudio: kwargs of ``torchaudio.models.wav2vec2_model``.
            source: ``"hf"`` or ``"torchaudio"``.
            torchaudio_builder: Function of ``torchaudio.models`` that builds the model the
                ``pretrained`` state dict belongs to.
            pretraining_head: HF only: build ``Wav2Vec2ForPreTraining`` (quantizer, project_q)
                for continued pretraining; features come from its ``wav2vec2``.
            attention_mask: ``"auto"`` (only for layer-norm feature encoders), True or False.
            feature_layer: Transformer layer whose output is the feature; -1 the last (after
                the final norm of pre-norm models), 0 the first layer's output.
            embed_dim: Projection width of ``forward``; 0 for none.
            sample_rate: Input rate in Hz.
            max_seconds: Longest clip (longer clips are cropped by the datamodule).
            normalize: Per-clip standardisation of the samples; None: the folder's
                ``preprocessor_config.json`` ``do_normalize``, else True.
            freeze_feature_encoder: Freeze the conv feature encoder.
            gradient_checkpointing: Recompute transformer activations in backward (HF only).
            repo_id: The hub repo an HF ``pretrained`` folder is a local copy of
                (``facebook/wav2vec2-xls-r-300m``), named in the missing-weights error.

        Raises:
            FileNotFoundError: The weights are not available offline.
            ValueError: Both or neither of ``pretrained``/``config``, an unknown source or
                mask rule, an HF-only option with torchaudio, a ``feature_layer`` out of range.
        """
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                f"Set exactly one of {FLAG}.pretrained (weights) and {FLAG}.config "
                f"(architecture for random init); got {'both' if config else 'neither'}."
            )
        if source not in SOURCES:
            raise ValueError(f"{FLAG}.source must be one of {SOURCES}, got {source!r}")
        if attention_mask not in ("auto", True, False):
            raise ValueError(f"{FLAG}.attention_mask must be auto, true or false")
        if source == "torchaudio" and (pretraining_head or gradient_checkpointing):
            raise ValueError("pretraining_head and gradient_checkpointing need source hf")
        self.source = source
        self.pretraining_head = pretraining_head
        preprocessor: dict[str, Any] = {}
        if source == "hf":
            if pretrained is not None:
                self.model = _load_hf(pretrained, pretraining_head, repo_id)
                preprocessor = _preprocessor_config(pretrained)
            else:
                fields = dict(config or {})
                cfg = AutoConfig.for_model(fields.pop("model_type", "wav2vec2"))
                unknown = sorted(set(fields) - set(cfg.to_dict()))
                if unknown:  # from_config would silently keep a typo as an unused attribute
                    raise ValueError(
                        f"{FLAG}.config: {unknown} are not {type(cfg).__name__} fields "
                        "(check the spelling)"
                    )
                cfg = AutoConfig.for_model(cfg.model_type, **fields)
                self.model = (
                    Wav2Vec2ForPreTraining(cfg) if pretraining_head else AutoModel.from_config(cfg)
                )
            cfg = self.model.config
            if pretraining_head and cfg.model_type != "wav2vec2":
                raise ValueError(f"pretraining_head needs a wav2vec2 model, got {cfg.model_type}")
            self._lengths = _hf_lengths(cfg)
            layer_norm = cfg.feat_extract_norm == "layer"
            num_layers, width = int(cfg.num_hidden_layers), int(cfg.hidden_size)
            arch = {k: v for k, v in cfg.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}
            config_out: dict | None = {**arch, "model_type": cfg.model_type}
            pretrained_out = None  # weights travel separately
        else:
            self.model = _build_torchaudio(pretrained, config, torchaudio_builder)
            blocks = self.model.feature_extractor.conv_layers
            self._lengths = ConvLengths(
                tuple(int(b.kernel_size) for b in blocks), tuple(int(b.stride) for b in blocks)
            )
            layer_norm = any(isinstance(m, nn.LayerNorm) for m in blocks.modules())
            num_layers = len(self.model.encoder.transformer.layers)
            width = int(self.model.encoder.feature_projection.projection.out_features)
            config_out, pretrained_out = copy.deepcopy(config), pretrained
        self.uses_attention_mask = layer_norm if attention_mask == "auto" else bool(attention_mask)
        self.feature_layer = feature_layer
        self._layer = resolve_feature_layer(feature_layer, num_layers, f"{source} speech model")
        self._last = self._layer == num_layers - 1
        self.feature_dim = width
        self.output_dim = embed_dim if embed_dim > 0 else width
        self.proj = nn.Linear(width, embed_dim) if embed_dim > 0 else None
        if normalize is None:
            normalize = bool(preprocessor.get("do_normalize", True))
        self._audio_preprocess = AudioPreprocess(
            sample_rate=sample_rate,
            max_seconds=max_seconds,
            min_seconds=self._lengths.min_input() / sample_rate,
            normalize=normalize,
        )
        if freeze_feature_encoder:
            if source == "hf":
                self.model.freeze_feature_encoder()
            else:
                self.model.feature_extractor.requires_grad_(False)
        if gradient_checkpointing:
            new_api = hasattr(self.model, "activation_checkpointing_enable")
            getattr(self.model, f"{'activation' if new_api else 'gradient'}_checkpointing_enable")()
        self._init_args: dict[str, Any] = {
            "pretrained": pretrained_out,
            "config": config_out,
            "source": source,
            "torchaudio_builder": torchaudio_builder,
            "pretraining_head": pretraining_head,
            "attention_mask": attention_mask,
            "feature_layer": feature_layer,
            "embed_dim": embed_dim,
            "sample_rate": sample_rate,
            "max_seconds": max_seconds,
            "normalize": normalize,
            "freeze_feature_encoder": freeze_feature_encoder,
            "gradient_checkpointing": gradient_checkpointing,
        }

    @property
    def audio_preprocess(self) -> AudioPreprocess:
        """Sample rate, crop length, minimum length and normalisation the model expects."""
        return self._audio_preprocess

    @property
    def lengths(self) -> ConvLengths:
        """Samples -> frames of the feature encoder (exact, weight-free, picklable)."""
        return self._lengths

    @property
    def backbone(self) -> nn.Module:
        """The feature model: ``model.wav2vec2`` under a pretraining head, else ``model``."""
        return self.model.wav2vec2 if self.pretraining_head else self.model

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames (B,) for clip lengths (B,) in samples."""
        return self.lengths(lengths)

    def model_inputs(self, audio: torch.Tensor, lengths: torch.Tensor) -> dict[str, Any]:
        """HF model inputs of a padded batch, following the padding rule.

        Args:
            audio: (B, N) float waveforms.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            ``input_values``: (B, N) with every sample past a clip's length set to 0;
            ``attention_mask``: (B, N) long sample mask, or None when ``uses_attention_mask``
            is False.
        """
        valid = length_mask(lengths, audio.shape[1])
        return {
            "input_values": audio * valid.to(audio.dtype),
            "attention_mask": valid.long() if self.uses_attention_mask else None,
        }

    def frame_features(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features of a zero-padded batch.

        Args:
            audio: (B, N) float waveforms (standardised when ``audio_preprocess.normalize``).
            lengths: Long tensor (B,), true length of each clip in samples.

        Returns:
            features: (B, T, D) with T = ``lengths(N)``; frames past a row's length are padding.
            frame_lengths: Long tensor (B,), ``lengths(lengths)`` valid frames per row.
        """
        inputs = self.model_inputs(audio, lengths)
        if self.source == "hf":
            out = self.backbone(**inputs, output_hidden_states=not self._last)
            feats = out.last_hidden_state if self._last else out.hidden_states[self._layer + 1]
        else:
            audio = inputs["input_values"]
            ta_lengths = lengths if self.uses_attention_mask else None
            if self._last:
                feats = self.model(audio, ta_lengths)[0]
            else:
                layers = self.model.extract_features(audio, ta_lengths, self._layer + 1)[0]
                feats = layers[self._layer]
        return feats, self.output_lengths(lengths)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled clip embeddings.

        Args:
            audio: (B, N) float waveforms, zero-padded.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            (B, output_dim): mean over valid frames, projected when ``embed_dim`` > 0.
        """
        return pool_frames(*self.frame_features(audio, lengths), self.proj)

    def save_pretrained(self, path: str) -> None:
        """Write an HF folder (config, weights, ``preprocessor_config.json``) for ``pretrained``.

        Raises:
            ValueError: For a torchaudio model (save its ``state_dict()`` with ``torch.save``).
        """
        if self.source != "hf":
            raise ValueError("save_pretrained is for HF models; torch.save(model.state_dict())")
        self.model.save_pretrained(path)
        self.feature_extractor().save_pretrained(path)

    def feature_extractor(self) -> Any:
        """The HF ``Wav2Vec2FeatureExtractor`` preparing inputs as this tower was trained.

        Sampling rate, per-clip standardisation and zero padding; ``return_attention_mask``
        only for towers that use an attention mask (the wav2vec 2.0 padding rule).
        """
        from transformers import Wav2Vec2FeatureExtractor

        pre = self.audio_preprocess
        return Wav2Vec2FeatureExtractor(
            sampling_rate=pre.sample_rate,
            do_normalize=pre.normalize,
            padding_value=0.0,
            return_attention_mask=self.uses_attention_mask,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        HF: ``pretrained`` is None and ``config`` the model config (weights travel
        separately); torchaudio keeps its ``pretrained`` file or ``config``.
        """
        return {"class_path": class_path(self), "init_args": copy.deepcopy(self._init_args)}
