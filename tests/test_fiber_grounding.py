"""FIBER fine-grained stage: grounding losses vs direct formulas, Hungarian matching, metrics,
the grounding data (synth, RefCOCO-style builder, datamodule collate) and the module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmpt.datamodules.grounding import GroundingSample, collate_grounding, span_tokens
from mmpt.eval.grounding import centre_boxes, grounding_metrics
from mmpt.models.losses.grounding import (
    GroundingLoss,
    box_losses,
    hungarian_match,
    token_alignment_loss,
)


def test_hungarian_match_finds_the_global_optimum_not_the_greedy_one() -> None:
    # Prediction 0 is the closest to both targets; greedy would give it target 0 and leave
    # target 1 to the far prediction 2. The optimum pairs (0, 1) and (1, 0).
    boxes = torch.tensor([[0.4, 0.4, 0.6, 0.6], [0.1, 0.1, 0.3, 0.3], [0.8, 0.8, 1.0, 1.0]])
    targets = torch.tensor([[0.12, 0.12, 0.32, 0.32], [0.42, 0.42, 0.62, 0.62]])
    probs = torch.full((3, 3), 1 / 3)  # 2 tokens + no-object: no alignment preference
    tokens = torch.tensor([[True, False], [False, True]])
    q, g = hungarian_match(boxes, probs, targets, tokens)
    assert q.tolist() == [0, 1] and g.tolist() == [1, 0]
    # alignment alone decides when the boxes are equal
    same = torch.tensor([[0.2, 0.2, 0.4, 0.4]]).expand(2, 4)
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    q, g = hungarian_match(same, probs, same, tokens, l1_weight=0, giou_weight=0)
    assert q.tolist() == [0, 1] and g.tolist() == [1, 0]


def test_box_losses_equal_the_formula() -> None:
    pred = torch.tensor([[0.0, 0.0, 0.4, 0.4]])
    tgt = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    l1, giou = box_losses(pred, tgt)
    # cxcywh (0.2, 0.2, 0.4, 0.4) vs (0.4, 0.4, 0.4, 0.4): |d| = 0.2 + 0.2
    assert abs(l1.item() - 0.4) < 1e-6
    inter, union, hull = 0.2 * 0.2, 2 * 0.16 - 0.04, 0.6 * 0.6
    direct = 1 - (inter / union - (hull - union) / hull)
    assert abs(giou.item() - direct) < 1e-6


def test_token_alignment_loss_equals_the_formula() -> None:
    logits = torch.tensor([[2.0, 0.0, float("-inf"), 1.0], [0.5, 0.5, float("-inf"), 3.0]])
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    lse0 = math.log(math.exp(2) + math.exp(0) + math.exp(1))
    lse1 = math.log(2 * math.exp(0.5) + math.exp(3))
    q0 = 0.5 * (lse0 - 2) + 0.5 * (lse0 - 0)
    q1 = lse1 - 3
    direct = (1.0 * q0 + 0.1 * q1) / 1.1
    assert abs(token_alignment_loss(logits, target, 0.1).item() - direct) < 1e-6


def test_grounding_loss_matches_then_averages_over_boxes() -> None:
    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]])
    targets = torch.tensor([[[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]]])
    logits = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]]])  # 2 tokens + no-object
    tokens = torch.tensor([[[True, False], [False, False]]])
    mask = torch.tensor([[True, False]])
    terms = GroundingLoss(no_object_weight=0.5)(boxes, logits, targets, mask, tokens)
    assert terms["l1"].item() < 1e-6 and terms["giou"].item() < 1e-6  # the exact box matched
    lse1 = math.log(math.exp(2) + 1 + math.exp(1))
    lse0 = math.log(1 + math.exp(1) + 1)
    direct = ((lse1 - 2) + 0.5 * (lse0 - 0)) / 1.5  # query 1 -> token 0, query 0 -> no-object
    assert abs(terms["align"].item() - direct) < 1e-6
    assert abs(terms["loss"].item() - direct) < 1e-6


def test_grounding_metrics_and_centre_baseline_on_a_hand_case() -> None:
    targets = torch.tensor(
        [[[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.8, 0.8]], [[0.4, 0.4, 0.6, 0.6], [0, 0, 0, 0]]]
    )
    mask = torch.tensor([[True, True], [True, False]])
    ranked = torch.tensor(
        [
            [[0.6, 0.6, 0.8, 0.79], [0.0, 0.0, 0.1, 0.1]],  # phrase 0: top box hits its 2nd box
            [[0.0, 0.0, 0.2, 0.2], [0.41, 0.41, 0.6, 0.6]],  # phrase 1: 2nd box hits
        ]
    )
    referent = torch.tensor([True, False])
    out = grounding_metrics(ranked, targets, mask, referent, ks=(1, 2))
    assert out == {"R@1": 0.5, "R@2": 1.0, "accuracy": 1.0}
    centre = centre_boxes(targets, mask)
    torch.testing.assert_close(centre[0, 0], torch.tensor([0.4, 0.4, 0.6, 0.6]))
    assert grounding_metrics(centre, targets, mask, referent, ks=(1,))["R@1"] == 0.5


@pytest.fixture(scope="module")
def grounding_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmpt.synth import make_synthetic

    out = tmp_path_factory.mktemp("grounding")
    make_synthetic("grounding", out, train_samples=8, val_samples=6, image_size=32)
    return out


def _samples(folder: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False))


def test_synthetic_expressions_are_true_of_their_boxes(grounding_set: Path) -> None:
    for sample in _samples(grounding_set / "val"):
        info = json.loads(sample["json"])
        (head,), (tail,) = (p["spans"] for p in info["phrases"])
        t, a = (p["boxes"][0] for p in info["phrases"])
        caption = info["caption"]
        assert caption[head[0] : head[1]].startswith("the ") and caption[tail[1] :] == ""
        ct = [(info["boxes"][t][i] + info["boxes"][t][i + 2]) / 2 for i in (0, 1)]
        ca = [(info["boxes"][a][i] + info["boxes"][a][i + 2]) / 2 for i in (0, 1)]
        relation = caption[head[1] : tail[0]].strip()
        sign = {"left of": ct[0] < ca[0], "right of": ct[0] > ca[0]}
        sign |= {"above": ct[1] < ca[1], "below": ct[1] > ca[1]}
        assert sign[relation], (caption, info["boxes"])
        assert len(info["boxes"]) == 3 and t != a


def test_sample_and_collate_map_spans_to_tokens(grounding_set: Path) -> None:
    fn = GroundingSample(32, str(grounding_set / "text_encoder"), context_length=16)
    items = [fn(s) for s in _samples(grounding_set / "val")[:3]]
    batch = collate_grounding(items)
    assert batch.images.shape == (3, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.boxes.shape == (3, 3, 4) and bool(batch.box_mask.all())
    assert batch.phrase_tokens.shape == (3, 2, 16)
    # "the big red circle right of the blue square": phrase 0 = tokens 1-4 (after [CLS])
    for row in range(3):
        words = fn._tok.convert_ids_to_tokens(batch.text_tokens[row][batch.phrase_tokens[row, 0]])
        assert words[0] == "the" and len(words) == 4
    assert batch.box_tokens().shape == (3, 3, 16)
    offsets = torch.tensor([[0, 0], [0, 3], [4, 9], [10, 13], [0, 0]])
    assert span_tokens(offsets, [[4, 13]]).tolist() == [False, False, True, True, False]


def test_builder_reads_a_refcoco_style_file(tmp_path: Path) -> None:
    from mmpt.shards.grounding import build_grounding_shards

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 100), (10, 20, 30)).save(images / "a.jpg")
    caption = "the man left of the dog and the red ball"
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "caption": caption, "width": 200, "height": 100},
            {"id": 2, "file_name": "a.jpg", "caption": "a dog", "width": 200, "height": 100},
            {"id": 3, "file_name": "missing.jpg", "caption": "x", "width": 10, "height": 10},
        ],
        "annotations": [
            {"image_id": 1, "bbox": [20, 10, 40, 50], "tokens_positive": [[0, 7]]},
            {"image_id": 1, "bbox": [100, 50, 50, 25], "tokens_positive": [[16, 23]]},
            {"image_id": 1, "bbox": [150, 0, 50, 20], "tokens_positive": [[16, 23]]},
            {"image_id": 1, "bbox": [0, 0, 10, 10], "tokens_positive": [[28, 40]]},
            {"image_id": 2, "bbox": [150, 80, 80, 40], "tokens_positive": [[2, 5]]},  # outside
            {"image_id": 3, "bbox": [0, 0, 5, 5], "tokens_positive": [[0, 1]]},
        ],
    }
    (tmp_path / "refs.json").write_text(json.dumps(data))
    report = build_grounding_shards(
        tmp_path / "refs.json", tmp_path / "out", images, progress=False
    )
    assert report.written == 1
    assert report.skipped == {"bad_annotation": 1, "missing_image": 1}
    (sample,) = _samples(tmp_path / "out")
    info = json.loads(sample["json"])
    assert info["caption"] == caption
    assert info["boxes"][0] == [0.1, 0.1, 0.3, 0.6]
    assert info["boxes"][1] == [0.5, 0.5, 0.75, 0.75]
    assert info["phrases"] == [
        {"spans": [[0, 7]], "boxes": [0]},
        {"spans": [[16, 23]], "boxes": [1, 2]},
        {"spans": [[28, 40]], "boxes": [3]},
    ]
    with pytest.raises(ValueError, match="expected a COCO-style grounding file"):
        (tmp_path / "bad.json").write_text("[]")
        build_grounding_shards(tmp_path / "bad.json", tmp_path / "out2", images, progress=False)


def test_module_trains_and_evaluates_on_a_batch(grounding_set: Path) -> None:
    from mmpt.models.encoders import HFTextTower, TimmVisionTower
    from mmpt.models.fiber_grounding import FiberGroundingModule

    torch.manual_seed(0)
    bert = grounding_set / "text_encoder"  # the synthetic set's 4-layer BERT
    vision = TimmVisionTower(
        "vit_tiny_patch16_224", embed_dim=16, image_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    )  # fmt: skip
    model = FiberGroundingModule(
        vision, HFTextTower(str(bert), 16, context_length=16), fusion_layers=1
    )
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(
        name, float(torch.as_tensor(value).detach())
    )
    fn = GroundingSample(32, str(bert), context_length=16)
    batch = collate_grounding([fn(s) for s in _samples(grounding_set / "train")[:4]])
    batch.images = batch.images.float() / 255
    boxes, logits = model(batch.images, batch.text_tokens)
    assert boxes.shape == (4, 16, 4) and logits.shape == (4, 16, 17)
    assert bool((boxes[..., 2:] >= boxes[..., :2]).all())
    loss = model.training_step(batch, 0)
    loss.backward()
    assert all(math.isfinite(logged[f"train/{k}"]) for k in ("loss", "l1", "giou", "align"))
    assert model.box_head[0].weight.grad is not None
    assert any(g.grad is not None for g in model.fusion.gates())
    model.eval()
    with torch.no_grad():
        model._eval_step(batch, "val")
    metrics = model.grounding_metrics()
    assert set(metrics) == {"R@1", "R@5", "accuracy", "centre_R@1", "centre_accuracy"}


def test_real_size_swin_b_fuses_fibers_blocks() -> None:
    """Swin-B (depths 2, 2, 18, 2): the top 6 blocks are stage-3 blocks 14-17 + stage 4."""
    import timm

    from mmpt.models.fusion_towers import vision_stack

    with torch.device("meta"):
        model = timm.create_model("swin_base_patch4_window12_384", num_classes=256)
    tower = torch.nn.Module()
    tower.model = model
    stack = vision_stack(tower)
    assert stack.depth == 24
    top = range(stack.depth - 6, stack.depth)
    assert [stack.width(i) for i in top] == [512] * 4 + [1024] * 2
    assert [stack.blocks[i][0] for i in top] == [2] * 4 + [3] * 2
    assert [stack.heads(i) for i in top] == [16] * 4 + [32] * 2
