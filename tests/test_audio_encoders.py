"""Audio towers: exact frame counts, the wav2vec 2.0 padding rule, offline loading, pooling."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from mmpt.models.encoders import LogMelTower, Wav2Vec2Tower
from tests.helpers import TINY_WAV2VEC2

TINY_TA = {
    "extractor_conv_layer_config": [[32, 10, 5], [32, 3, 4], [32, 3, 4]],
    "extractor_conv_bias": False,
    "encoder_embed_dim": 32,
    "encoder_projection_dropout": 0.0,
    "encoder_pos_conv_kernel": 16,
    "encoder_pos_conv_groups": 4,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_features": 64,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
    "aux_num_out": None,
}
NORMS = ("group", "layer")
LENGTHS = (400, 401, 555, 1000, 1279, 1280, 2047, 3000)


def hf_config(norm: str) -> dict:
    """Tiny HF wav2vec2 config with a group- or layer-norm feature encoder."""
    return {**TINY_WAV2VEC2, "feat_extract_norm": norm, "do_stable_layer_norm": norm == "layer"}


def ta_config(norm: str) -> dict:
    """Tiny torchaudio ``wav2vec2_model`` kwargs (group_norm or layer_norm extractor)."""
    return {
        **TINY_TA,
        "extractor_mode": f"{norm}_norm",
        "encoder_layer_norm_first": norm == "layer",
    }


def tower(source: str, norm: str, **kwargs) -> Wav2Vec2Tower:
    torch.manual_seed(0)
    config = hf_config(norm) if source == "hf" else ta_config(norm)
    return Wav2Vec2Tower(config=config, source=source, **kwargs).eval()


def padded_pair(n_long: int = 3000, n_short: int = 1700) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of a long clip and a zero-padded short clip, and their lengths."""
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, n_long, generator=g)
    audio[1, n_short:] = 0
    return audio, torch.tensor([n_long, n_short])


@pytest.mark.parametrize("source", ["hf", "torchaudio"])
def test_wav2vec2_lengths_match_real_frames(source: str) -> None:
    model = tower(source, "group")
    assert pickle.loads(pickle.dumps(model.lengths)) == model.lengths
    shortest = model.lengths.min_input()
    assert model.audio_preprocess.min_samples == shortest == 60  # tiny: 10 + 5 * (3 - 1 + 4 * 2)
    assert model.lengths(shortest - 1) == 0
    with torch.no_grad():
        for n in (shortest, 79, 80, *LENGTHS):
            feats, frames = model.frame_features(torch.randn(1, n), torch.tensor([n]))
            assert feats.shape == (1, model.lengths(n), model.feature_dim)
            assert frames.tolist() == [model.lengths(n)]


def test_log_mel_lengths_match_stft_and_output() -> None:
    model = LogMelTower(n_mels=16, width=32, depth=1, heads=2, subsample=4, max_seconds=1.0)
    stft = model.lengths.__class__((400,), (160,), (200,))
    with torch.no_grad():
        for n in (1, 159, 160, 161, *LENGTHS, 16000):
            assert model.mel(torch.randn(1, n)).shape[-1] == stft(n) == n // 160 + 1
            feats, frames = model.frame_features(torch.randn(1, n), torch.tensor([n]))
            assert feats.shape[1] == frames.item() == model.output_lengths(torch.tensor(n))


@pytest.mark.parametrize("source", ["hf", "torchaudio"])
def test_group_norm_models_get_zero_padding_only(source: str) -> None:
    model = tower(source, "group")
    assert not model.uses_attention_mask
    audio, lengths = padded_pair()
    with torch.no_grad():
        feats, _ = model.frame_features(audio, lengths)
        if source == "hf":
            plain = model.model(input_values=audio).last_hidden_state
        else:
            plain = model.model(audio)[0]
    torch.testing.assert_close(feats, plain)


@pytest.mark.parametrize("source", ["hf", "torchaudio"])
def test_layer_norm_models_mask_padding(source: str) -> None:
    model = tower(source, "layer")
    assert model.uses_attention_mask
    audio, lengths = padded_pair()
    with torch.no_grad():
        feats, frames = model.frame_features(audio, lengths)
        alone, _ = model.frame_features(audio[1:, :1700], lengths[1:])
        n = int(frames[1])
        assert alone.shape[1] == n
        torch.testing.assert_close(feats[1, :n], alone[0], atol=1e-4, rtol=1e-4)
        # the pooled clip ignores padding: alone == padded in a batch
        torch.testing.assert_close(
            model(audio, lengths)[1], model(audio[1:, :1700], lengths[1:])[0]
        )


def test_feature_layer_and_projection() -> None:
    model = tower("hf", "layer", feature_layer=0, embed_dim=8)
    audio, lengths = padded_pair()
    with torch.no_grad():
        feats, _ = model.frame_features(audio, lengths)
        hidden = model.model(**model.model_inputs(audio, lengths), output_hidden_states=True)
        torch.testing.assert_close(feats, hidden.hidden_states[1])
        assert model(audio, lengths).shape == (2, model.output_dim) == (2, 8)
    with pytest.raises(ValueError, match="feature_layer"):
        tower("hf", "layer", feature_layer=2)


def test_hf_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = tower("hf", "layer", pretraining_head=True, normalize=False)
    model.save_pretrained(str(tmp_path / "w2v"))
    loaded = Wav2Vec2Tower(pretrained=str(tmp_path / "w2v"), pretraining_head=True).eval()
    assert loaded.audio_preprocess == model.audio_preprocess  # do_normalize read back
    audio, lengths = padded_pair()
    with torch.no_grad():
        torch.testing.assert_close(loaded(audio, lengths), model(audio, lengths))
    features_only = Wav2Vec2Tower(pretrained=str(tmp_path / "w2v")).eval()
    with torch.no_grad():
        torch.testing.assert_close(features_only(audio, lengths), model(audio, lengths))
    rebuilt = Wav2Vec2Tower(**model.describe()["init_args"])
    assert rebuilt.model.config.hidden_size == 32 and rebuilt.pretraining_head


def test_torchaudio_state_dict_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchaudio

    def tiny_w2v() -> torch.nn.Module:
        return torchaudio.models.wav2vec2_model(**ta_config("layer"))

    monkeypatch.setattr(torchaudio.models, "tiny_w2v", tiny_w2v, raising=False)
    model = tower("torchaudio", "layer")
    torch.save(model.model.state_dict(), tmp_path / "w.pt")
    loaded = Wav2Vec2Tower(
        pretrained=str(tmp_path / "w.pt"), source="torchaudio", torchaudio_builder="tiny_w2v"
    ).eval()
    audio, lengths = padded_pair()
    with torch.no_grad():
        torch.testing.assert_close(loaded(audio, lengths), model(audio, lengths))
    assert loaded.describe()["init_args"]["pretrained"] == str(tmp_path / "w.pt")
    assert model.describe()["init_args"]["config"] == ta_config("layer")


def test_offline_errors(tmp_path: Path) -> None:
    flag = re.escape("--model.audio.pretrained (or --model.encoder.pretrained)")
    repo = "facebook/wav2vec2-xls-r-300m"
    with pytest.raises(
        FileNotFoundError, match=rf"hf download {repo} --local-dir .*nowhere.*{flag}"
    ):
        Wav2Vec2Tower(pretrained=str(tmp_path / "nowhere"), repo_id=repo)
    with pytest.raises(
        FileNotFoundError, match=r"run `hf download someone/not-cached-w2v`.*" + flag
    ):
        Wav2Vec2Tower(pretrained="someone/not-cached-w2v")
    with pytest.raises(FileNotFoundError, match=flag):
        Wav2Vec2Tower(pretrained=str(tmp_path / "w.pt"), source="torchaudio")
    with pytest.raises(ValueError, match="exactly one"):
        Wav2Vec2Tower()
    with pytest.raises(ValueError, match="exactly one"):
        Wav2Vec2Tower(pretrained=str(tmp_path), config=hf_config("group"))


def test_freeze_feature_encoder() -> None:
    for source in ("hf", "torchaudio"):
        model = tower(source, "group", freeze_feature_encoder=True)
        frozen = [p.requires_grad for p in model.model.feature_extractor.parameters()]
        assert frozen and not any(frozen)
        assert any(p.requires_grad for p in model.parameters())


def test_log_mel_pooling_ignores_padding_and_describes() -> None:
    torch.manual_seed(0)
    for positions, subsample in (("sinusoidal", 2), ("learned", 4), ("sinusoidal", 1)):
        model = LogMelTower(
            n_mels=16, width=32, depth=2, heads=2, subsample=subsample, embed_dim=8,
            max_seconds=1.0, positions=positions,
        ).eval()  # fmt: skip
        assert not model.audio_preprocess.normalize
        audio, lengths = padded_pair()
        with torch.no_grad():
            pooled = model(audio, lengths)
            assert pooled.shape == (2, 8)
            torch.testing.assert_close(pooled[1], model(audio[1:, :1700], lengths[1:])[0])
        rebuilt = LogMelTower(**model.describe()["init_args"])
        assert model.describe()["class_path"] == "mmpt.models.encoders.LogMelTower"
        assert sum(p.numel() for p in rebuilt.parameters()) == sum(
            p.numel() for p in model.parameters()
        )
    with pytest.raises(ValueError, match="max_seconds"):
        model(torch.zeros(1, 20000), torch.tensor([20000]))


def test_config_typo_is_refused() -> None:
    with pytest.raises(ValueError, match="hiden_size"):
        Wav2Vec2Tower(config={**TINY_WAV2VEC2, "hiden_size": 8})
