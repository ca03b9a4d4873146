"""Speech as one more modality of VLMModule (BLSP): adapter lengths, speech samples, forward."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mmpt.datamodules.stages import DataError
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.vlm import PackedBatcher, VLMCollate, VLMDataModule
from mmpt.models.connectors import SpeechAdapter
from mmpt.models.encoders import LogMelTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from mmpt.synth import make_synthetic
from tests.helpers import TINY_LLM_CONFIG


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tones")
    make_synthetic("audio-text", out, train_samples=24, val_samples=8)
    return out


def tiny_tower() -> LogMelTower:
    return LogMelTower(n_mels=16, width=32, depth=1, heads=2, subsample=2, max_seconds=2.0)


def speech_lm(tones: Path, audio: bool = True, **kw) -> VLMModule:
    torch.manual_seed(0)
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(tones / "tokenizer"))
    if not audio:
        return VLMModule(llm, **kw)
    adapter = lambda a, b: SpeechAdapter(a, b, subsample=4, bottleneck=16)  # noqa: E731
    return VLMModule(llm, audio=tiny_tower(), audio_adapter=adapter, **kw)


def items(model: VLMModule, tones: Path, n: int = 4, **data) -> list[dict]:
    dm = VLMDataModule(
        train=StreamConfig(urls=str(tones / "train"), shuffle_buffer=0, shuffle_shards=False),
        max_seq_len=128,
        num_workers=0,
        preprocess=model.preprocess,
        **data,
    )
    dm.setup("fit")
    raw = iter(wds.WebDataset(dm.train_stream.urls, shardshuffle=False))
    return [dm.train_stream.sample_fn(next(raw)) for _ in range(n)], dm


def batch_of(model: VLMModule, rows: list[dict], dm: VLMDataModule):
    batcher = PackedBatcher(128, model.preprocess.pad_id, rows=len(rows), packing=False)
    packed = next(iter(batcher(iter(rows))))
    return dm.normalize(VLMCollate(model.preprocess, "plain")(packed))


@pytest.mark.parametrize("subsample", [1, 2, 4, 8])
def test_adapter_output_length_matches_subsampling_factor(subsample):
    adapter = SpeechAdapter(12, 20, subsample=subsample, bottleneck=8)
    for frames in (1, 7, 8, 50, 101):
        out, lengths = adapter(
            torch.randn(2, frames, 12), torch.tensor([frames, max(1, frames // 2)])
        )
        assert out.shape == (2, math.ceil(frames / subsample), 20)
        assert adapter.lengths(frames) == math.ceil(frames / subsample)
        assert lengths.tolist() == [adapter.lengths(frames), adapter.lengths(max(1, frames // 2))]


def test_adapter_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        SpeechAdapter(8, 8, subsample=3)


def test_clip_tokens_are_the_same_alone_and_padded_in_a_batch(tones):
    model = speech_lm(tones).eval()
    tower, adapter = model.audio, model.audio_adapter
    short, long = torch.randn(5000), torch.randn(9000)
    with torch.no_grad():
        feats, flen = tower.frame_features(short[None], torch.tensor([5000]))
        alone, n_alone = adapter(feats, flen)
        batch = torch.stack([torch.cat([short, torch.zeros(4000)]), long])
        feats, flen = tower.frame_features(batch, torch.tensor([5000, 9000]))
        padded, n_padded = adapter(feats, flen)
    n = int(n_alone[0])
    assert n == int(n_padded[0]) == model.preprocess.tokens_for_samples(5000)
    torch.testing.assert_close(padded[0, :n], alone[0, :n], atol=1e-5, rtol=1e-4)


def test_speech_sample_budgets_the_clip_and_targets_the_continuation(tones):
    model = speech_lm(tones)
    pre = model.preprocess
    rows, _ = items(model, tones)
    tok = model.llm.tokenizer
    for row in rows:
        (clip,) = row["audio"]
        n_audio = int((row["input_ids"] == pre.audio_token_id).sum())
        assert n_audio == pre.tokens_for_samples(clip.shape[0]) > 0
        target = tok.decode(row["labels"][row["labels"] != -100])
        assert target.split()[:2] == ["deep", "sound"] or target.split()[:2] == ["thin", "sound"]
        assert not bool((row["labels"][row["input_ids"] == pre.audio_token_id] != -100).any())


def test_transcript_input_trains_a_text_only_llm_on_the_same_shards(tones):
    model = speech_lm(tones, audio=False)
    rows, _ = items(model, tones, speech_input="transcript")
    tok = model.llm.tokenizer
    for row in rows:
        assert row["audio"] == []
        prompt = tok.decode(row["input_ids"][row["labels"] == -100])
        assert "tone" in prompt and "then" in prompt


def test_speech_samples_for_a_model_without_speech_encoder_stop_clearly(tones):
    model = speech_lm(tones, audio=False)
    with pytest.raises(DataError, match="speech_input: transcript"):
        items(model, tones, n=1)


def test_forward_splices_clips_and_the_no_audio_control_differs(tones):
    model = speech_lm(tones).eval()
    rows, dm = items(model, tones)
    batch = batch_of(model, rows, dm)
    assert batch.audio is not None and batch.audio.shape[0] == len(rows)
    assert batch.audio_lengths.tolist() == [r["audio"][0].shape[0] for r in rows]
    n0 = int(batch.audio_lengths[0])
    assert not bool(batch.audio[0, n0:].any())  # zero padding
    # a tower that asks for it gets each clip standardised over its true length
    dm.preprocess = dataclasses.replace(
        dm.preprocess, audio=dataclasses.replace(dm.preprocess.audio, normalize=True)
    )
    normed = dm.normalize(copy.deepcopy(batch)).audio
    first = normed[0, :n0]
    assert abs(float(first.mean())) < 1e-4 and abs(float(first.std()) - 1) < 1e-2
    assert not bool(normed[0, n0:].any())
    with torch.no_grad():
        loss = model(batch).loss
        silent = model(batch, zero_audio=True).loss
    assert torch.isfinite(loss) and torch.isfinite(silent)
    assert abs(float(loss) - float(silent)) > 1e-6


def test_token_count_mismatch_is_refused(tones):
    model = speech_lm(tones).eval()
    rows, dm = items(model, tones, n=2)
    batch = batch_of(model, rows, dm)
    batch.audio_lengths = batch.audio_lengths // 2
    with pytest.raises(ValueError, match="audio tokens"):
        model(batch)


def test_frozen_llm_and_encoder_only_the_adapter_learns(tones):
    model = speech_lm(tones, trainable=["audio_adapter.*"])
    model.configure_model()
    rows, dm = items(model, tones, n=6)
    batch = batch_of(model, rows, dm)
    model.train()
    assert not model.audio.training  # a frozen encoder stays in eval mode
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(40):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.audio.parameters())
    assert all(p.grad is not None for p in model.audio_adapter.parameters())
    # a random frozen LLM is hard to steer: the adapter alone still lowers the loss
    assert losses[-1] < losses[0] - 0.1


def test_export_writes_the_speech_parts(tones, tmp_path):
    model = speech_lm(tones)
    out = model.export_mmpt(tmp_path / "hf")
    config = json.loads((out / "mmpt_vlm.json").read_text())
    assert config["audio_token_id"] == model.audio_token_id
    assert config["audio"]["class_path"].endswith("LogMelTower")
    assert (out / "audio.safetensors").is_file() and (out / "audio_adapter.safetensors").is_file()
    assert not (out / "vision.safetensors").exists()


def test_fusion_needs_vision(tones):
    from mmpt.models.vlm import FusionConfig

    with pytest.raises(ValueError, match="fusion"):
        speech_lm(tones, fusion=FusionConfig())


def test_packed_rows_keep_clips_in_placeholder_order(tones):
    model = speech_lm(tones).eval()
    rows, dm = items(model, tones, n=6)
    pre = model.preprocess
    batcher = PackedBatcher(128, pre.pad_id, rows=2, packing=True, buffer_size=6, min_fill=0.0)
    packed = [r for batch in batcher(iter(rows)) for r in batch]
    batch = dm.normalize(VLMCollate(pre, "plain")(packed))
    assert batch.num_samples == 6 and len(batch) < 6  # several samples share a row
    flat = (batch.input_ids == pre.audio_token_id).reshape(-1).int()
    starts = ((flat[1:] - flat[:-1]) == 1).nonzero().squeeze(1) + 1
    runs = []
    for s in ([0] if flat[0] else []) + starts.tolist():
        n = 0
        while s + n < flat.numel() and flat[s + n]:
            n += 1
        runs.append(n)
    assert runs == [pre.tokens_for_samples(int(n)) for n in batch.audio_lengths]
    with torch.no_grad():
        assert torch.isfinite(model(batch).loss)


def test_clip_longer_than_the_encoder_takes_is_a_counted_skip(tones):
    from mmpt.datamodules.vlm import Overlong

    torch.manual_seed(0)
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(tones / "tokenizer"))
    short = LogMelTower(n_mels=16, width=32, depth=1, heads=2, max_seconds=0.5)
    model = VLMModule(llm, audio=short)
    with pytest.raises(Overlong, match="max_seconds"):
        items(model, tones, n=1)


def test_placeholders_of_a_missing_modality_are_plain_text(tones):
    from mmpt.datamodules.templates import Segment, encode

    tok = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(tones / "tokenizer")).tokenizer
    segments = [Segment("a <audio> tone then <image>", True)]
    image_only = encode(segments, tok, 5, [3])  # an image VLM: <audio> is text, not skipped
    assert int((image_only["input_ids"] == 5).sum()) == 3
    assert image_only["input_ids"].shape[0] > 3 + len(["a", "tone", "then"])
    with pytest.raises(ValueError, match="1 <audio> placeholders for 0 audio clips"):
        encode(segments, tok, 5, [3], audio_token_id=7, audio_tokens=[])
