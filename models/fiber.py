"""FIBER coarse-grained stage: ITC + hard-negative ITM + MLM with fusion in the image backbone."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import ImageTextBatch
from mmpt.eval.forgetting import eval_prefix
from mmpt.eval.rerank import reranked_metrics
from mmpt.models.adapters import AdapterSpec
from mmpt.models.backbone_fusion import (
    BackboneFusion,
    TextStream,
    text_embedding,
    vision_embedding,
)
from mmpt.models.contrastive import ContrastiveModule, first_text_per_item, text_owner
from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.fused_objectives import (
    mask_tokens,
    masked_lm_loss,
    matching_pairs,
    mlm_token_sets,
    sample_hard_negatives,
)
from mmpt.models.fused_objectives import mlm_head as build_mlm_head
from mmpt.models.fusion_towers import vision_stack
from mmpt.models.schedules import Schedule

#: Recall cut-offs of the validation retrieval.
RETRIEVAL_KS = (1, 5, 10)


class FiberModule(ContrastiveModule):
    """FIBER (Dou et al. 2022), coarse stage: an image-text dual encoder fused in the backbone.

    Gated cross-attention in the top ``fusion_layers`` layers of the image tower (timm ViT or
    Swin) and the BERT/RoBERTa text tower (:class:`~mmpt.models.backbone_fusion.BackboneFusion`,
    the code EgoVLPv2 uses for video); gates start at 0, so at initialisation the fused towers
    are exactly the dual encoder. Objectives:

    - ITC: the contrastive ``loss`` (CLIP InfoNCE) on the unfused towers.
    - ITM: a binary head on the fused pair state (the image tower's class token and the text
      pooled as the text tower pools: [CLS] in FIBER) of the N pairs, of every image with a
      hard negative caption and of every caption with a hard negative image, drawn from the
      softmax of the ITC logits (similarities over ``negative_temperature``, default the ITC
      temperature; identical captions are never negatives).
    - MLM: BERT masking of the captions, predicted from the fused text stream.

    ``train/loss = itc_weight * ITC + itm_weight * ITM + mlm_weight * MLM``. Validation and test
    report retrieval twice, ``<stage>/retrieval/itc/...`` (dual-encoder similarity) and
    ``<stage>/retrieval/itm/...`` (each query's top ``rerank_k`` re-ranked by the ITM
    probability), over the rank's own samples (``mmpt validate``/``mmpt test`` on one device
    for the full set).

    Args:
        vision: :class:`~mmpt.models.encoders.TimmVisionTower` (ViT or Swin).
        text: BERT/RoBERTa :class:`~mmpt.models.encoders.HFTextTower` with a mask token.
        loss: ITC loss (default ``ClipLoss``).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze.
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from.
        fusion_layers: K, fused top layers of each tower (6 in FIBER).
        fusion_ff_mult: Feed-forward multiple of the fusion blocks.
        itc_weight: Weight of the contrastive loss.
        itm_weight: Weight of image-text matching.
        mlm_weight: Weight of masked language modelling.
        mlm_probability: Share of non-special tokens masked.
        mlm_head: "auto": the checkpoint's ``AutoModelForMaskedLM`` head (falls back to "small").
        negative_temperature: Temperature of the hard-negative sampling softmax; None: the ITC
            loss's own (``1 / loss.scale``, learnable in CLIP's loss), as FIBER.
        fusion_lr_scale: Learning-rate multiple of the cross-modal parameters (fusion blocks with
            their gates, ITM and MLM heads; not the decoder tied to the word embeddings): 5 in
            FIBER. Adam moves a gate by about one learning rate per step, so at the towers' rate
            the gates stay near 0 for thousands of steps.
        rerank_k: Candidates per query the ITM head re-ranks at evaluation.
        rerank_batch: Pairs per fused forward at evaluation.
        init_from_strict: Refuse a checkpoint of which too little loads.
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).

    """

    def __init__(
        self,
        vision: nn.Module,
        text: HFTextTower,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        fusion_layers: int = 6,
        fusion_ff_mult: int = 4,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        mlm_probability: float = 0.15,
        mlm_head: Literal["auto", "small"] = "auto",
        negative_temperature: float | None = None,
        fusion_lr_scale: float = 5.0,
        rerank_k: int = 16,
        rerank_batch: int = 128,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            vision,
            text,
            loss,
            optimizer,
            lr_schedule,
            freeze,
            trainable,
            init_from,
            init_from_strict=init_from_strict,
            adapters=adapters,
        )
        if rerank_k < 0 or rerank_batch < 1:
            raise ValueError("model.rerank_k must be >= 0 and model.rerank_batch >= 1")
        if fusion_lr_scale <= 0:
            raise ValueError("model.fusion_lr_scale must be > 0 (1: the towers' learning rate)")
        self.fusion = BackboneFusion(vision, text, fusion_layers, fusion_ff_mult)
        stack = vision_stack(vision)
        dv, dt = stack.width(stack.depth - 1), int(text.model.config.hidden_size)
        self.itm_head = nn.Sequential(nn.Linear(dv + dt, dt), nn.GELU(), nn.Linear(dt, 2))
        self.mlm_head = build_mlm_head(text, mlm_head)
        self.mask_token_id, special, replacement = mlm_token_sets(text)
        self.register_buffer("special_ids", special, persistent=False)
        self.register_buffer("replacement_ids", replacement, persistent=False)
        self.loss_weights = {"itc": itc_weight, "itm": itm_weight, "mlm": mlm_weight}
        self.mlm_probability = mlm_probability
        self.negative_temperature = negative_temperature
        self.fusion_lr_scale = fusion_lr_scale
        self.rerank_k, self.rerank_batch = rerank_k, rerank_batch
        self._eval: dict[str, list[dict]] = {}

    def cross_modal_parameters(self) -> list[nn.Parameter]:
        """Fusion blocks (gates included) and the ITM/MLM heads, less the text tower's own."""
        tower = {id(p) for p in self.text.parameters()}
        heads = (self.fusion, self.itm_head, self.mlm_head)
        return [p for m in heads for p in m.parameters() if id(p) not in tower]

    def configure_optimizers(self) -> dict:
        """The optimizer and schedule of :class:`~mmpt.models.module.MMPTModule`, groups split.

        Each parameter group is split in two: the cross-modal parameters (``decay_fusion``,
        ``no_decay_fusion``) train at ``fusion_lr_scale`` times the learning rate (the schedule
        scales every group alike).
        """
        factory, fast = self.optimizer_factory, {id(p) for p in self.cross_modal_parameters()}

        def split(groups: list[dict]) -> torch.optim.Optimizer:
            parts = []
            for g in groups:
                parts.append(g | {"params": [p for p in g["params"] if id(p) not in fast]})
                quick = [p for p in g["params"] if id(p) in fast]
                parts.append(g | {"params": quick, "name": f"{g['name']}_fusion"})
            opt = factory([g for g in parts if g["params"]])
            for g in opt.param_groups:
                if g["name"].endswith("_fusion"):
                    g["lr"] = g["lr"] * self.fusion_lr_scale
            return opt

        self.optimizer_factory = split
        try:
            return super().configure_optimizers()
        finally:
            self.optimizer_factory = factory

    def encode_pairs(
        self, images: torch.Tensor, tokens: torch.Tensor, fuse: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Paired images (B, C, H, W) and captions (B, L) through both towers, fused or not.

        Returns:
            Image (B, E) and text (B, E) tower outputs (not normalised) and the (B, D_v + D_t)
            pair states for ITM.

        """
        state = self.fusion.vision_bottom(self.vision, images)
        stream = self.fusion.text_bottom(self.text, tokens)
        return self.fusion.pair_outputs(self.vision, self.text, state, stream, fuse=fuse)

    def itm_logits(self, state: torch.Tensor, stream: TextStream) -> torch.Tensor:
        """(B, 2) match logits of paired bottom states (:meth:`BackboneFusion.vision_bottom`)."""
        *_, cls = self.fusion.pair_outputs(self.vision, self.text, state, stream, fuse=True)
        return self.itm_head(cls)

    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor:
        """ITC + ITM + MLM on one batch; logs the total, each term and the ITM accuracy."""
        tokens = batch.text_tokens
        if tokens.shape[0] != len(batch):  # several captions per image: each image's first
            tokens = tokens[first_text_per_item(text_owner(batch).to(tokens.device), len(batch))]
        state = self.fusion.vision_bottom(self.vision, batch.images)
        stream = self.fusion.text_bottom(self.text, tokens)
        img, txt, _ = self.fusion.pair_outputs(self.vision, self.text, state, stream, fuse=False)
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        terms = {"itc": self.loss(img, txt)}

        same = (tokens[:, None] == tokens[None]).all(-1) | torch.eye(
            len(tokens), dtype=torch.bool, device=tokens.device
        )
        scale = (
            self.loss.scale if self.negative_temperature is None else 1 / self.negative_temperature
        )
        neg_txt, neg_img = sample_hard_negatives(img @ txt.T * scale, same)
        vi, ti, labels = matching_pairs(neg_txt, neg_img)
        itm_logits = self.itm_logits(state[vi], stream.select(ti))
        terms["itm"] = F.cross_entropy(itm_logits.float(), labels)

        inputs, mlm_labels = mask_tokens(
            tokens, self.mask_token_id, self.special_ids, self.replacement_ids, self.mlm_probability
        )
        masked = self.fusion.text_bottom(self.text, inputs, mask=stream.mask)
        _, hidden = self.fusion.top(self.vision, self.text, state, masked, fuse=True)
        terms["mlm"] = masked_lm_loss(self.mlm_head, hidden, mlm_labels)

        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        itm_acc = (itm_logits.argmax(-1) == labels).float().mean()
        self.log("train/itm_acc", itm_acc, batch_size=bs)
        self.log("train/logit_scale", self.loss.scale, batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)
        return loss

    def _eval_step(self, batch: ImageTextBatch, stage: str) -> dict[str, torch.Tensor]:
        """ITC loss; keeps embeddings and bottom states for retrieval at the epoch end."""
        owner = text_owner(batch)
        state = self.fusion.vision_bottom(self.vision, batch.images)
        stream = self.fusion.text_bottom(self.text, batch.text_tokens)
        final = self.fusion.vision_top(self.vision, state)
        hidden = self.fusion.text_top(self.text, stream).hidden
        img = F.normalize(vision_embedding(self.vision, final), dim=-1)
        txt = F.normalize(text_embedding(self.text, hidden, stream.mask), dim=-1)
        loss = self._pair_loss(img, txt, batch, gather=False)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), add_dataloader_idx=False)
        self._eval.setdefault(stage, []).append(
            {
                "image": img.detach().float().cpu(),
                "text": txt.detach().float().cpu(),
                "owner": owner.cpu(),
                "state": state.detach().cpu(),
                "hidden": stream.hidden.detach().cpu(),
                "mask": stream.mask.cpu(),
            }
        )
        return {"image_emb": img.detach(), "text_emb": txt.detach(), "text_to_image": owner}

    def retrieval_metrics(self, prefix: str = "val") -> dict[str, float]:
        """ITC and ITM-re-ranked retrieval over the samples of ``prefix`` seen since the start.

        Returns:
            ``itc/{t2i,i2t}/R@{1,5,10}``, ``itm/...`` and mean/median ranks; empty when no
            sample was seen.

        """
        parts = self._eval.get(prefix)
        if not parts:
            return {}
        offsets = torch.tensor([0] + [len(p["image"]) for p in parts]).cumsum(0)
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("image", "text", "state", "mask")}
        owner = torch.cat([p["owner"] + o for p, o in zip(parts, offsets[:-1], strict=True)])
        width = max(p["hidden"].shape[1] for p in parts)  # token rows may differ per batch
        hidden = torch.cat(
            [F.pad(p["hidden"], (0, 0, 0, width - p["hidden"].shape[1])) for p in parts]
        )
        mask = torch.cat([F.pad(p["mask"], (0, width - p["mask"].shape[1])) for p in parts])

        def score(ti: torch.Tensor, ii: torch.Tensor) -> torch.Tensor:
            out = []
            for s in range(0, len(ti), self.rerank_batch):
                t, i = ti[s : s + self.rerank_batch], ii[s : s + self.rerank_batch]
                stream = TextStream(hidden[t].to(self.device), mask[t].to(self.device))
                logits = self.itm_logits(cat["state"][i].to(self.device), stream)
                out.append(logits.float().softmax(-1)[:, 1].cpu())
            return torch.cat(out)

        sim = cat["text"] @ cat["image"].T
        with torch.no_grad():
            return reranked_metrics(sim, owner, self.rerank_k, score, ks=RETRIEVAL_KS)

    def _log_retrieval(self, stage: str) -> None:
        for prefix in list(self._eval):
            for name, value in self.retrieval_metrics(prefix).items():
                self.log(f"{prefix}/retrieval/{name}", value, add_dataloader_idx=False)
        self._eval = {}

    def validation_step(
        self, batch: ImageTextBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """See :meth:`_eval_step`; metrics under ``val/`` (``val/<set>/`` with several sets)."""
        return self._eval_step(batch, eval_prefix(self._trainer, "val", dataloader_idx))

    def test_step(self, batch: ImageTextBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """As :meth:`validation_step`, under ``test/``."""
        return self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        """Start fresh evaluation sets."""
        self._eval = {}

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        """Log both retrievals (not during the sanity check)."""
        if self.trainer.sanity_checking:
            self._eval = {}
            return
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        """As for validation, under ``test/``."""
        self._log_retrieval("test")
