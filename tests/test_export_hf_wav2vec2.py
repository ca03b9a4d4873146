"""HF wav2vec 2.0 export: transformers loads the folder and its hidden states equal the tower's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoFeatureExtractor, Wav2Vec2Model

from mmpt.datamodules.audio import normalize_audio
from mmpt.export.hf_wav2vec2 import export_hf_wav2vec2
from mmpt.models.encoders import Wav2Vec2Tower
from tests.test_audio_encoders import hf_config, ta_config

CLIP_LENGTHS = (3000, 1700)


def clips() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) * 3 + 1 for n in CLIP_LENGTHS]


def mmpt_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What mmpt's datamodule feeds the tower: zero-padded, standardised per clip."""
    lengths = torch.tensor([len(w) for w in waves])
    audio = torch.zeros(len(waves), int(lengths.max()))
    for row, w in zip(audio, waves, strict=True):
        row[: len(w)] = w
    return normalize_audio(audio, lengths), lengths


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_hidden_states_equal_the_towers(tmp_path: Path, norm: str) -> None:
    torch.manual_seed(0)
    tower = Wav2Vec2Tower(config=hf_config(norm), pretraining_head=True)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tower.eval()
    out = export_hf_wav2vec2(tower, tmp_path / "w2v2")
    model = Wav2Vec2Model.from_pretrained(out).eval()
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert extractor.sampling_rate == 16000 and extractor.do_normalize
    assert extractor.padding_value == 0.0
    assert extractor.return_attention_mask == (norm == "layer")  # as trained: mask or zeros
    waves = clips()
    # statistics over each clip's own samples; a group-norm model then gets no mask
    enc = extractor(
        [w.numpy() for w in waves],
        sampling_rate=16000,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    audio, lengths = mmpt_batch(waves)
    torch.testing.assert_close(enc.input_values, audio, atol=1e-5, rtol=0)
    mask = enc.attention_mask if extractor.return_attention_mask else None
    with torch.no_grad():
        ours, frames = tower.frame_features(audio, lengths)
        theirs = model(enc.input_values, attention_mask=mask).last_hidden_state
    for row, n in enumerate(frames.tolist()):
        torch.testing.assert_close(theirs[row, :n], ours[row, :n], atol=1e-5, rtol=0)


def test_torchaudio_tower_is_refused(tmp_path: Path) -> None:
    tower = Wav2Vec2Tower(config=ta_config("group"), source="torchaudio")
    with pytest.raises(ValueError, match="torchaudio-backed"):
        export_hf_wav2vec2(tower, tmp_path / "ta")
    with pytest.raises(ValueError, match="supports Wav2Vec2Tower"):
        export_hf_wav2vec2(torch.nn.Linear(2, 2), tmp_path / "x")
