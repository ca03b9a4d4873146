"""UniVLModule on a tiny BERT: each objective equals its formula on the model's own tensors,
StagedP stage 1 trains only the encoders, EnhancedV masks whole captions, decoding, stage
checkpoints load into stage 2."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mmpt.batch import VideoFeatureBatch
from mmpt.generate import Decoding
from mmpt.models.egovlpv2 import mask_tokens
from mmpt.models.encoders import HFTextTower
from mmpt.models.univl import UniVLModule
from mmpt.models.univl_decode import decode_captions
from mmpt.models.univl_losses import mask_frames
from tests.helpers import write_tiny_bert

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
WORDS += ["moves", "left", "right", "the", "grows"]
CAPTIONS = ["a red circle moves left", "a blue square moves right", "the red square grows",
            "a blue circle moves left"]  # fmt: skip


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("univl_bert"), WORDS))


def make_model(bert_dir: str, **kw: Any) -> UniVLModule:
    torch.manual_seed(0)
    text = HFTextTower(bert_dir, embed_dim=16, context_length=8)
    args = dict(video_dim=6, video_layers=2, cross_layers=1, decoder_layers=1, num_heads=2,
                max_frames=8, max_caption_len=8, dropout=0.0, mlm_head="small")  # fmt: skip
    return UniVLModule(text, **(args | kw))


def make_batch(model: UniVLModule, candidates: int = 2) -> VideoFeatureBatch:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 3:] = False
    texts = [CAPTIONS[(i + j) % 4] for i in range(4) for j in range(candidates)]
    return VideoFeatureBatch(
        features=torch.randn(4, 5, 6, generator=g) * mask[..., None],
        frame_mask=mask,
        text_tokens=model.preprocess.tokenizer(texts),
        text_to_video=torch.arange(4).repeat_interleave(candidates),
        captions=texts,
    )


def _ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean of -log softmax(logits)[target] over rows, written out."""
    total = 0.0
    for row, t in zip(logits.double().tolist(), target.tolist(), strict=True):
        total += math.log(sum(math.exp(x) for x in row)) - row[t]
    return total / len(row and target.tolist())


def test_each_objective_equals_its_formula(bert_dir: str) -> None:
    model = make_model(bert_dir, mlm_probability=0.5, mfm_probability=0.5).eval()
    batch = make_batch(model)
    terms = model.losses(batch, torch.Generator().manual_seed(3))
    assert set(terms) == {"joint", "mlm", "mfm", "align", "decoder"}

    with torch.no_grad():
        g = torch.Generator().manual_seed(3)  # the same draws, in the same order
        f, m = batch.features, batch.frame_mask
        states = model.video(f, m)
        v = model.video_embedding(states, m).double()
        t = model.encode_text(batch.text_tokens).double()
        s = model.joint_loss.logit_scale.exp().item()
        owner = batch.text_to_video.tolist()
        joint = 0.0
        for i in range(4):
            pos = [j for j in range(len(owner)) if owner[j] == i]
            num = sum(math.exp(s * float(v[i] @ t[j])) for j in pos)
            den = sum(math.exp(s * float(v[i] @ t[j])) for j in range(len(owner)))
            den += sum(math.exp(s * float(v[k] @ t[j])) for k in range(4) for j in pos)
            joint -= math.log(num / den) / 4
        assert terms["joint"].item() == pytest.approx(joint, abs=1e-6)

        caption = batch.text_tokens[::2]
        inputs, labels = mask_tokens(caption, model.mask_token_id, model.special_ids,
                                     model.replacement_ids, 0.5, g)  # fmt: skip
        frames = mask_frames(m, 0.5, g)
        assert labels.ne(-100).any() and frames.any()
        masked = model.video(f.masked_fill(frames[..., None], 0.0), m)
        fused, fmask = model.fuse(inputs, masked, m)
        picked = labels != -100
        mlm = _ce(model.mlm_head(fused[:, :8][picked]), labels[picked])
        assert terms["mlm"].item() == pytest.approx(mlm, abs=1e-6)

        recon = model.mfm_head(fused[:, 8:])
        rows = [(n, k) for n in range(4) for k in range(5) if frames[n, k]]
        cols = [(n, k) for n in range(4) for k in range(5) if m[n, k]]
        logits = torch.stack([torch.stack([recon[r] @ f[c] for c in cols]) for r in rows])
        target = torch.tensor([cols.index(r) for r in rows])
        assert terms["mfm"].item() == pytest.approx(_ce(logits, target), abs=1e-5)

        pairs = torch.stack([
            torch.stack([model.alignment_scores(model.text.hidden_states(caption[i : i + 1]),
                                                states[j : j + 1], m[j : j + 1])[0]
                         for j in range(4)])
            for i in range(4)
        ])  # fmt: skip
        assert terms["align"].item() == pytest.approx(_ce(pairs, torch.arange(4)), abs=1e-6)

        dec = model.decoder(caption[:, :-1], fused, fmask)
        nxt = caption[:, 1:]
        keep = nxt != model.text.pad_id
        assert terms["decoder"].item() == pytest.approx(_ce(dec[keep], nxt[keep]), abs=1e-6)


def test_hard_negative_alignment_scores_own_video_first(bert_dir: str) -> None:
    model = make_model(bert_dir, align_negatives=2).eval()
    batch = make_batch(model, candidates=1)
    caption, f, m = batch.text_tokens, batch.features, batch.frame_mask
    with torch.no_grad():
        states = model.video(f, m)
        sim = model.encode_text(caption) @ model.video_embedding(states, m).T
        got = model._alignment(caption, states, m, sim)
        cand = torch.cat([torch.arange(4)[:, None],
                          sim.fill_diagonal_(float("-inf")).topk(2, 1).indices], 1)  # fmt: skip
        scores = model.pair_scores(caption, states, m, cand)
    assert got.item() == pytest.approx(_ce(scores, torch.zeros(4, dtype=torch.long)), abs=1e-6)


def test_stage1_trains_only_the_encoders(bert_dir: str) -> None:
    model = make_model(bert_dir, stage=1)
    batch = make_batch(model)
    terms = model.losses(batch)
    assert set(terms) == {"joint"}
    terms["joint"].backward()
    for name, p in model.named_parameters():
        encoder = name.startswith(("text.", "video.", "video_proj.", "joint_loss."))
        assert p.requires_grad == encoder, name
        if encoder and not name.startswith(("text.proj", "joint_loss")) and "pooler" not in name:
            assert p.grad is not None, name
    words = model.text.model.get_input_embeddings().weight
    assert model.decoder.embed.weight is words and words.requires_grad  # tied, trains
    assert model.video.proj.weight.grad.abs().sum() > 0


def test_enhanced_v_masks_whole_captions(bert_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    for enhanced in (True, False):
        model = make_model(bert_dir, enhanced_v=enhanced, enhanced_v_probability=1.0,
                           mlm_probability=0.15)  # fmt: skip
        fuse = model.fuse
        monkeypatch.setattr(
            model, "fuse", lambda tok, *a, _f=fuse: (seen.append(tok), _f(tok, *a))[1]
        )
        model.losses(make_batch(model), torch.Generator().manual_seed(0))
    special = torch.isin(make_batch(model).text_tokens[::2], model.special_ids)
    assert (~special).sum() >= 8
    assert (seen[0][~special] == model.mask_token_id).all()
    assert (seen[1][~special] != model.mask_token_id).any()


def test_greedy_decoding_is_the_argmax_loop_and_one_beam_is_greedy(bert_dir: str) -> None:
    model = make_model(bert_dir).eval()
    batch = make_batch(model, candidates=1)
    with torch.no_grad():
        states = model.video(batch.features, batch.frame_mask)
        empty = model.text.tokenizer([""] * 4)
        fused, fmask = model.fuse(empty, states, batch.frame_mask)
        greedy = decode_captions(model.decoder, fused, fmask, model.bos_id, model.eos_id, 5, 1)
        for i in range(4):
            seq = [model.bos_id]
            for _ in range(5):
                nxt = int(model.decoder(torch.tensor([seq]), fused[i : i + 1], fmask[i : i + 1])
                          [0, -1].argmax())  # fmt: skip
                if nxt == model.eos_id:
                    break
                seq.append(nxt)
            assert greedy[i] == seq[1:]
        beams = decode_captions(model.decoder, fused, fmask, model.bos_id, model.eos_id, 5, 3)
    assert len(beams) == 4 and all(len(b) <= 5 for b in beams)
    text = model.generate_captions(batch.features, batch.frame_mask, Decoding(max_new_tokens=5))
    assert len(text) == 4 and all(w in WORDS for c in text for w in c.split())
    with pytest.raises(ValueError, match="temperature"):
        model.generate_captions(batch.features, batch.frame_mask, Decoding(temperature=1.0))


def test_stage1_checkpoint_loads_into_stage2(bert_dir: str) -> None:
    stage1, stage2 = make_model(bert_dir, stage=1), make_model(bert_dir, stage=2)
    result = stage2.load_state_dict(stage1.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(p.requires_grad for p in stage2.parameters())


def test_bad_settings_raise(bert_dir: str) -> None:
    with pytest.raises(ValueError, match="stage"):
        make_model(bert_dir, stage=3)
    with pytest.raises(ValueError, match="num_heads"):
        make_model(bert_dir, num_heads=5)
    model = make_model(bert_dir)
    with pytest.raises(ValueError, match="max_frames"):
        model.video(torch.zeros(1, 9, 6), torch.ones(1, 9, dtype=torch.bool))
