"""Export a speech tower (continued wav2vec 2.0, any ``Wav2Vec2Tower``) as an HF folder.

The folder is a ``save_pretrained`` one: ``config.json`` + ``model.safetensors`` (with the
quantizer and projections of a continued pretraining, so it can be pretrained further) and the
feature extractor's ``preprocessor_config.json`` (sampling rate, per-clip normalisation,
zero padding, and an attention mask only for the models trained with one). It loads with
``transformers.Wav2Vec2Model.from_pretrained`` (``AutoModel`` for HuBERT/WavLM/data2vec) and
``AutoFeatureExtractor.from_pretrained``; the hidden states equal the tower's frame features
(``hidden_states[feature_layer + 1]`` for a tower reading an inner layer). A torchaudio-backed
wav2vec 2.0 is converted (its modules are HF's under other prefixes, the inverse of torchaudio's
``import_huggingface_model``); its CTC head, if any, is left out. A tower's mmpt-side pooling and
projection (``embed_dim`` > 0) are not part of the HF model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower

#: torchaudio Wav2Vec2Model prefix -> transformers Wav2Vec2Model prefix
_PREFIXES = {
    "feature_extractor.": "feature_extractor.",
    "encoder.feature_projection.": "feature_projection.",
    "encoder.transformer.": "encoder.",
}


def _hf_config(model: nn.Module) -> Wav2Vec2Config:
    """The ``Wav2Vec2Config`` of a torchaudio ``Wav2Vec2Model``, read off its modules."""
    blocks = model.feature_extractor.conv_layers
    convs = [b.conv for b in blocks]
    transformer = model.encoder.transformer
    layer = transformer.layers[0]
    pos = transformer.pos_conv_embed.conv
    return Wav2Vec2Config(
        feat_extract_norm="layer" if isinstance(blocks[0].layer_norm, nn.LayerNorm) else "group",
        conv_dim=[c.out_channels for c in convs],
        conv_kernel=[c.kernel_size[0] for c in convs],
        conv_stride=[c.stride[0] for c in convs],
        conv_bias=convs[0].bias is not None,
        hidden_size=model.encoder.feature_projection.projection.out_features,
        num_conv_pos_embeddings=pos.kernel_size[0],
        num_conv_pos_embedding_groups=pos.groups,
        num_hidden_layers=len(transformer.layers),
        num_attention_heads=layer.attention.num_heads,
        intermediate_size=layer.feed_forward.intermediate_dense.out_features,
        do_stable_layer_norm=bool(layer.layer_norm_first),  # pre-norm layers
        layerdrop=float(transformer.layer_drop),
    )


def torchaudio_to_hf(model: nn.Module) -> Wav2Vec2Model:
    """A transformers ``Wav2Vec2Model`` with a torchaudio ``Wav2Vec2Model``'s weights.

    Raises:
        ValueError: A torchaudio model (WavLM, HuBERT pretraining) whose weights do not map.
    """
    hf = Wav2Vec2Model(_hf_config(model))
    state = {}
    for key, value in model.state_dict().items():
        for theirs, ours in _PREFIXES.items():
            if key.startswith(theirs):
                state[ours + key[len(theirs) :]] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    unused = [k for k in model.state_dict() if not k.startswith(("aux.", *_PREFIXES))]
    if [k for k in missing if k != "masked_spec_embed"] or unexpected or unused:
        raise ValueError(
            f"this torchaudio model does not map onto transformers' Wav2Vec2Model (missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, unused {unused[:5]}); only wav2vec 2.0 "
            "models convert"
        )
    return hf.eval()


def export_hf_wav2vec2(tower: nn.Module, out: str | Path) -> Path:
    """Write ``tower``'s speech model and feature extractor config as an HF folder.

    Args:
        tower: A :class:`~mmpt.models.encoders.Wav2Vec2Tower` (HF- or torchaudio-backed).
        out: Output folder (created).

    Returns:
        The folder.

    Raises:
        ValueError: Not a ``Wav2Vec2Tower``, or a torchaudio model that does not convert.
    """
    if not isinstance(tower, Wav2Vec2Tower):
        raise ValueError(f"the HF speech export supports Wav2Vec2Tower, not {type(tower).__name__}")
    out = Path(out)
    if tower.source == "hf":
        tower.save_pretrained(str(out))
    else:
        torchaudio_to_hf(tower.model).save_pretrained(str(out))
        tower.feature_extractor().save_pretrained(str(out))
    return out
