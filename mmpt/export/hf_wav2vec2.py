"""Export a speech tower (continued wav2vec 2.0, any HF-backed ``Wav2Vec2Tower``) as an HF folder.

The folder is a ``save_pretrained`` one: ``config.json`` + ``model.safetensors`` (with the
quantizer and projections of a continued pretraining, so it can be pretrained further) and the
feature extractor's ``preprocessor_config.json`` (sampling rate, per-clip normalisation,
zero padding, and an attention mask only for the models trained with one). It loads with
``transformers.Wav2Vec2Model.from_pretrained`` (``AutoModel`` for HuBERT/WavLM/data2vec) and
``AutoFeatureExtractor.from_pretrained``; the hidden states equal the tower's frame features
(``hidden_states[feature_layer + 1]`` for a tower reading an inner layer). A tower's mmpt-side
pooling and projection (``embed_dim`` > 0) are not part of the HF model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower


def export_hf_wav2vec2(tower: nn.Module, out: str | Path) -> Path:
    """Write ``tower``'s speech model and feature extractor config as an HF folder.

    Args:
        tower: An HF-backed :class:`~mmpt.models.encoders.Wav2Vec2Tower` (``source: hf``).
        out: Output folder (created).

    Returns:
        The folder.

    Raises:
        ValueError: Not a ``Wav2Vec2Tower``, or a torchaudio-backed one (its weights use
            torchaudio's layout, which transformers does not read).
    """
    if not isinstance(tower, Wav2Vec2Tower):
        raise ValueError(
            f"the HF speech export supports Wav2Vec2Tower (source: hf), not {type(tower).__name__}"
        )
    if tower.source != "hf":
        raise ValueError(
            "this Wav2Vec2Tower is torchaudio-backed (source: torchaudio): transformers cannot "
            "read torchaudio's weight layout; train from an HF checkpoint (source: hf) to export "
            "it, or save the torchaudio model's state_dict"
        )
    out = Path(out)
    tower.save_pretrained(str(out))
    return out
