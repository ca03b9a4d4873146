"""Continued wav2vec 2.0 pretraining: the loss, its fall on a tiny model, temperature, recipe."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from mmpt.batch import AudioTextBatch
from mmpt.cli import build_cli, main
from mmpt.models.encoders import Wav2Vec2Tower
from mmpt.models.wav2vec2_pretrain import Wav2Vec2PretrainModule, span_masks
from tests.test_audio_encoders import hf_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "wav2vec2_continued.yaml"


def tiny_module(norm: str = "layer", **kwargs) -> Wav2Vec2PretrainModule:
    torch.manual_seed(0)
    tower = Wav2Vec2Tower(config=hf_config(norm), pretraining_head=True)
    return Wav2Vec2PretrainModule(tower, mask_length=4, num_negatives=20, **kwargs)


def sine_batch(n: int = 4, samples: int = 4000, seed: int = 0) -> AudioTextBatch:
    """Clips of summed sines with random pitches (the last two shorter, zero-padded)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    freqs = 100 + 900 * torch.rand(n, 3, 1, generator=g)
    audio = torch.sin(2 * math.pi * freqs * t).sum(1)
    lengths = torch.tensor([samples] * (n - n // 2) + [samples * 3 // 4] * (n // 2))
    for i, length in enumerate(lengths.tolist()):
        audio[i, length:] = 0
        clip = audio[i, :length]
        audio[i, :length] = (clip - clip.mean()) / clip.std()
    empty = torch.zeros((0, 0), dtype=torch.long)
    keys = [str(i) for i in range(n)]
    return AudioTextBatch(audio, lengths, empty, torch.zeros(0, dtype=torch.long), keys=keys)


def test_span_masks_respect_lengths_and_seed() -> None:
    frames = torch.tensor([50, 30])
    mask, negatives = span_masks(frames, 50, 0.65, 4, 20, seed=3)
    assert mask.shape == (2, 50) and negatives.shape == (2, 50, 20)
    assert not mask[1, 30:].any() and (mask.sum(1) >= 4).all()
    state = torch.from_numpy(np.random.get_state()[1].copy())
    again, _ = span_masks(frames, 50, 0.65, 4, 20, seed=3)
    assert torch.equal(mask, again)  # seeded masks repeat ...
    assert torch.equal(state, torch.from_numpy(np.random.get_state()[1]))
    neg_rows = negatives[1][mask[1]] // 50  # ... and negatives come from the row's own frames
    assert (neg_rows == 1).all()


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_loss_is_finite_per_masked_frame(norm: str) -> None:
    module = tiny_module(norm).train()
    batch = sine_batch()
    outputs, mask = module(batch.audio, batch.audio_lengths, seed=0)
    loss = outputs.loss / mask.sum()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert module.encoder.model.quantizer.codevectors.grad is not None


def test_loss_falls_on_structured_audio() -> None:
    np.random.seed(0)  # the span masks and negatives are drawn with numpy
    module = tiny_module().train()
    batch = sine_batch(n=4)
    opt = torch.optim.AdamW(module.parameters(), lr=5e-3)
    losses = []
    for step in range(60):
        module.encoder.model.set_gumbel_temperature(module.temperature_at(step))
        outputs, mask = module(batch.audio, batch.audio_lengths)
        loss = outputs.loss / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_module_needs_the_pretraining_head() -> None:
    with pytest.raises(ValueError, match="pretraining_head"):
        Wav2Vec2PretrainModule(Wav2Vec2Tower(config=hf_config("group")))


def test_gumbel_temperature_decays_per_step_in_training(tmp_path: Path) -> None:
    module = tiny_module(gumbel_temperature=(2.0, 0.5, 0.9), diversity_loss_weight=0.3)
    assert module.encoder.model.config.diversity_loss_weight == 0.3
    assert module.temperature_at(0) == 2.0
    assert module.temperature_at(5) == pytest.approx(2.0 * 0.9**5)
    assert module.temperature_at(10_000) == 0.5
    batch = sine_batch()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(module, loader, loader)
    assert module.encoder.model.quantizer.temperature == pytest.approx(2.0 * 0.9**2)
    logged = trainer.logged_metrics
    for name in ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity"):
        assert torch.isfinite(logged[f"train/{name}"]) and f"val/{name}" in logged
    assert {"train/gumbel_temperature", "train/masked_frames", "data/skipped"} <= set(logged)
    assert "mmpt_image_tower" not in trainer._checkpoint_connector.dump_checkpoint()


def test_preprocess_is_the_towers() -> None:
    module = tiny_module()
    audio = module.preprocess.audio
    tower_audio = module.encoder.audio_preprocess
    assert module.preprocess.image is None and module.preprocess.tokenizer is None
    assert (audio.sample_rate, audio.max_seconds, audio.normalize) == (
        tower_audio.sample_rate, tower_audio.max_seconds, tower_audio.normalize,
    )  # fmt: skip
    # raised so every clip has mask_length + 1 frames
    assert module.encoder.lengths(audio.min_samples) == module.mask_length + 1
    assert module.encoder.lengths(audio.min_samples - 1) == module.mask_length


def test_recipe_parses_and_instantiates(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(RECIPE), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["encoder"]["init_args"]["pretraining_head"] is True

    cfg = yaml.safe_load(RECIPE.read_text())
    encoder = cfg["model"]["init_args"]["encoder"]["init_args"]
    encoder.update(pretrained=None, config=hf_config("layer"), gradient_checkpointing=False)
    cfg["trainer"].update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cli = build_cli(["-c", str(tmp_path / "tiny.yaml")], run=False)
    assert isinstance(cli.model, Wav2Vec2PretrainModule)
    assert cli.model.encoder.uses_attention_mask  # layer-norm feature encoder, as XLS-R
    assert cli.datamodule.preprocess.audio == cli.model.preprocess.audio
    opt = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == pytest.approx(5e-5)

    # The preflight names the flag and the recipe's repo before the tower is built.
    flag = re.escape(f"--model.encoder.pretrained {tmp_path / 'no'}")
    download = f"hf download facebook/wav2vec2-xls-r-300m --local-dir {tmp_path / 'no'}"
    with pytest.raises(ValueError, match=f"{flag}\n +{re.escape(download)}"):
        build_cli(["-c", str(RECIPE), "--model.encoder.pretrained", str(tmp_path / "no")], False)
