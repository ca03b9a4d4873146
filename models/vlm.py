"""VILA-style VLM: vision tower -> connector -> LLM, by token injection or gated cross-attention.

Stages differ only in YAML (``trainable``, LR, data): stage 1 trains the connector, stage 2
the connector and the LLM on interleaved documents and pairs, stage 3 fine-tunes on chat data.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmpt.batch import ImageLayout, VLMBatch
from mmpt.datamodules.resolution import AnyResTiles, FixedResolution, NativeResolution
from mmpt.datamodules.templates import check_targets
from mmpt.io import atomic_write_text
from mmpt.models.attention import hf_packing_kwargs
from mmpt.models.connectors import MLP2xGelu
from mmpt.models.fusion import FusionBlocks, insert_gated_cross_attention
from mmpt.models.llm import CausalLM
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import VLMPreprocess

log = logging.getLogger("mmpt.vlm")

ResolutionPolicy = FixedResolution | AnyResTiles | NativeResolution
PACKED_ATTENTION = ("mmpt_packed", "flash_attention_2")


@dataclass
class FusionConfig:
    """Gated cross-attention fusion (Flamingo) instead of token injection.

    Attributes:
        every: A block before every k-th decoder layer.
        heads: Cross-attention heads (default: the LLM's).
        ff_mult: Feed-forward width multiple of the blocks.
    """

    every: int = 4
    heads: int | None = None
    ff_mult: int = 4


class ConnectorTokens:
    """Picklable ``(h, w) -> tokens`` of a connector, for the data workers (no weights)."""

    def __init__(self, connector: nn.Module) -> None:
        self.connector = copy.deepcopy(connector).to("meta")

    def __call__(self, grid: tuple[int, int]) -> int:
        """Connector output tokens for one crop whose patch grid is ``grid``."""
        return int(self.connector.num_output_tokens(grid[0] * grid[1], tuple(grid)))


def _init_args(obj: Any) -> dict[str, Any]:
    """Constructor arguments of ``obj`` that it keeps as attributes (for export configs)."""
    names = inspect.signature(type(obj).__init__).parameters
    out = {n: getattr(obj, n) for n in names if n != "self" and hasattr(obj, n)}
    return json.loads(json.dumps(out, default=list))


class VLMModule(MMPTModule):
    """A vision tower, a connector and a causal LM trained on packed multimodal rows.

    Args:
        llm: The LLM backbone and its tokenizer.
        vision: Vision tower with ``patch_features`` (B, C, H, W) -> (B, N, D) from its
            ``feature_layer``, ``patch_grid``, ``patch_size``, ``feature_dim`` and
            ``image_preprocess`` (``TimmVisionTower``, ``OpenCLIPVisionTower``,
            ``HFVisionTower``).
        connector: ``(vision_dim, llm_dim) -> connector`` (YAML: a ``class_path`` with the
            other ``init_args``); default ``MLP2xGelu``.
        resolution: Dynamic resolution policy; default ``FixedResolution`` at the tower's size.
        fusion: Gated cross-attention instead of injecting image tokens into the sequence.
        val_shuffled_images: Also compute the validation loss with images shuffled across
            samples (``val/loss_shuffled_images``, ``val/image_gain``): how much the model uses
            the image.
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze (``vision.*``, ``llm.*``, ``connector.*``, ``fusion.*``).
        trainable: Patterns that alone train (stage 1: ``["connector.*"]``).
        init_from: The previous stage's checkpoint.
    """

    def __init__(
        self,
        llm: CausalLM,
        vision: nn.Module,
        connector: Callable[[int, int], nn.Module] | None = None,
        resolution: ResolutionPolicy | None = None,
        fusion: FusionConfig | None = None,
        val_shuffled_images: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr_schedule, freeze, trainable, init_from)
        self.fusion_config = fusion
        if fusion is not None:  # registered first, so its parameters are named fusion.*
            self.fusion: FusionBlocks | None = insert_gated_cross_attention(
                llm.model, llm.hidden_size, fusion.every, fusion.heads, fusion.ff_mult
            )
        else:
            self.fusion = None
        self.llm, self.vision = llm, vision
        self.connector = (connector or MLP2xGelu)(int(vision.feature_dim), llm.hidden_size)
        self.resolution = resolution or FixedResolution(
            vision.image_preprocess.size, int(vision.patch_size)
        )
        self.val_shuffled_images = val_shuffled_images
        if getattr(self.resolution, "row_end_token", False) and fusion is None:
            self._check_grid_preserving()
            width = llm.hidden_size
            # on the connector, so ``connector.*`` trains it and the connector export holds it
            newline = nn.Parameter(torch.randn(width) / width**0.5)
            self.connector.register_parameter("image_newline", newline)

    @property
    def image_newline(self) -> nn.Parameter | None:
        """The learned AnyRes row-end embedding (llm_dim,), a parameter of the connector."""
        return getattr(self.connector, "image_newline", None)

    def train(self, mode: bool = True) -> VLMModule:
        """Train mode, except for a frozen vision tower (its dropout/norm stats stay fixed)."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    def _zero_for_unused(self) -> torch.Tensor:
        """0 x every trainable image-side weight, to add to the loss of an image-less batch.

        It gives those weights a (zero) gradient, so DDP's reducer and the backward of a
        frozen LLM do not fail on text-only rows.
        """
        params = [
            p
            for mod in (self.vision, self.connector, self.fusion)
            if mod is not None
            for p in mod.parameters()
            if p.requires_grad
        ]
        return sum((p.sum() * 0.0 for p in params), torch.zeros(()))

    def _check_grid_preserving(self) -> None:
        side = self.resolution.tile_size // self.resolution.patch_size
        if self.connector.num_output_tokens(side * side, (side, side)) != side * side:
            raise ValueError(
                f"model.resolution.row_end_token puts one token per patch row of the tiled "
                f"canvas, but {type(self.connector).__name__} changes the patch grid: use a "
                "grid-preserving connector (mlp2x_gelu) or set row_end_token: false"
            )

    @property
    def preprocess(self) -> VLMPreprocess:
        """Tokenizer, image token, resolution policy and token counts for the datamodule."""
        tok = self.llm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return VLMPreprocess(
            tokenizer=tok,
            image_token_id=self.llm.image_token_id,
            pad_id=int(pad if pad is not None else 0),
            eos=tok.eos_token or "",
            policy=self.resolution,
            tokens_for_grid=None if self.fusion is not None else ConnectorTokens(self.connector),
            image=self.vision.image_preprocess,
        )

    # ---- images -> LLM-width tokens -------------------------------------------------------

    def image_tokens(self, batch: VLMBatch) -> list[torch.Tensor]:
        """Connector tokens of every image of the batch, in token order.

        Returns:
            One (K_i, llm_dim) tensor per image: its crops' tokens, with AnyRes tiles laid
            out as a canvas and a row-end token after each canvas row when configured.
        """
        if not batch.images:
            return []
        train_vision = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.vision.parameters()
        )
        groups = []
        for pixels in batch.pixels:
            with torch.set_grad_enabled(train_vision):
                feats = self.vision.patch_features(pixels)
            grid = self.vision.patch_grid(pixels.shape[-2], pixels.shape[-1])
            groups.append(self.connector(feats, grid))
        return [self._arrange([groups[g][i] for g, i in im.crops], im) for im in batch.images]

    def _arrange(self, crops: list[torch.Tensor], layout: ImageLayout) -> torch.Tensor:
        if not layout.row_end_tokens or self.fusion is not None:
            return torch.cat(crops)
        if self.image_newline is None or layout.tiles is None:
            raise ValueError("row-end tokens in the data but the model has no image_newline")
        start = int(layout.global_view)
        rows, cols = layout.tiles
        h, w = layout.grids[start]
        if rows * h != layout.row_end_tokens:
            raise ValueError(f"{layout.row_end_tokens} row-end tokens for {rows} x {h} rows")
        dim = crops[0].shape[-1]
        canvas = torch.stack(crops[start:]).view(rows, cols, h, w, dim)
        canvas = canvas.permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, dim)
        newline = self.image_newline.to(canvas.dtype).expand(rows * h, 1, dim)
        canvas = torch.cat([canvas, newline], dim=1).reshape(-1, dim)
        return torch.cat([*crops[:start], canvas])

    @staticmethod
    def shuffle_images(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Give every image the tokens of another image with the same token count.

        Images are rolled by one inside each group of equal count; an image alone in its group
        keeps its own tokens.
        """
        by_count: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            by_count.setdefault(t.shape[0], []).append(i)
        out = list(tokens)
        for idx in by_count.values():
            for src, dst in zip(idx[1:] + idx[:1], idx, strict=True):
                out[dst] = tokens[src]
        return out

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, batch: VLMBatch, shuffle_images: bool = False) -> CausalLMOutputWithPast:
        """LLM output (logits (R, L, vocab), loss) on a packed batch.

        Args:
            batch: Packed rows and their images.
            shuffle_images: Swap images between samples (a control: the loss it gives
                minus the true loss is how much the model relies on the images).

        Raises:
            ValueError: Image token and image counts disagree; packed rows with an LLM
                attention that would let packed samples see each other.
        """
        impl = getattr(self.llm.model.config, "_attn_implementation", None)
        if batch.num_samples > len(batch) and impl not in PACKED_ATTENTION:
            raise ValueError(
                f"packed rows need block-diagonal attention, but the LLM uses {impl!r}: set "
                "model.llm.attn_implementation: packed (or data.packing: false)"
            )
        tokens = self.image_tokens(batch)
        if shuffle_images:
            tokens = self.shuffle_images(tokens)
        packing = hf_packing_kwargs(batch.cu_seqlens, batch.max_seqlen)
        marks = batch.input_ids == self.llm.image_token_id
        if self.fusion is not None:
            self._set_fusion(batch, tokens, marks)
            return self.llm(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                labels=batch.labels,
                use_cache=False,
                **packing,
            )
        embeds = self.llm.embed(batch.input_ids)
        n_marks = int(marks.sum())
        n_tokens = sum(t.shape[0] for t in tokens)
        if n_marks != n_tokens:
            raise ValueError(
                f"{n_marks} image tokens in the text but {n_tokens} image tokens from "
                f"{len(tokens)} images: the data and the model disagree on token counts"
            )
        if tokens:
            flat = torch.cat(tokens).to(embeds.dtype)
            embeds = embeds.masked_scatter(marks.unsqueeze(-1), flat)
        return self.llm(
            inputs_embeds=embeds,
            position_ids=batch.position_ids,
            labels=batch.labels,
            use_cache=False,
            **packing,
        )

    def _set_fusion(self, batch: VLMBatch, tokens: list[torch.Tensor], marks: torch.Tensor) -> None:
        """Visual tokens per row and the masks: a token sees its own sample's earlier images."""
        assert self.fusion is not None
        rows, length = batch.input_ids.shape
        pos = marks.reshape(-1).nonzero().squeeze(1)
        if pos.numel() != len(tokens):
            raise ValueError(f"{pos.numel()} image markers for {len(tokens)} images")
        flat = torch.arange(rows * length, device=marks.device)
        segment = torch.searchsorted(batch.cu_seqlens[1:].to(flat), flat, right=True)
        segment = segment.view(rows, length)
        per_row = [0] * rows
        for p, t in zip(pos.tolist(), tokens, strict=True):
            per_row[p // length] += t.shape[0]
        width = max([*per_row, 1])
        dim = self.llm.hidden_size
        ref = self.llm.embed(batch.input_ids[:1, :1])
        feats = ref.new_zeros(rows, width, dim)
        visual = torch.zeros(rows, width, dtype=torch.bool, device=marks.device)
        cross = torch.zeros(rows, length, width, dtype=torch.bool, device=marks.device)
        fill = [0] * rows
        cols = torch.arange(length, device=marks.device)
        for p, t in zip(pos.tolist(), tokens, strict=True):
            r, c = divmod(p, length)
            a, b = fill[r], fill[r] + t.shape[0]
            feats[r, a:b] = t.to(feats.dtype)
            visual[r, a:b] = True
            sees = (segment[r] == segment[r, c]) & (cols >= c)
            cross[r, :, a:b] = sees.unsqueeze(1)
            fill[r] = b
        self.fusion.context.set(feats, visual, cross.any(-1), cross)

    # ---- steps ------------------------------------------------------------------------------

    def training_step(self, batch: VLMBatch, batch_idx: int) -> torch.Tensor:
        """Next-token loss on target text; logs fill fraction, skipped and truncated samples."""
        check_targets(batch.labels, batch.template)
        loss = self(batch).loss
        if not batch.images:
            loss = loss + self._zero_for_unused().to(loss)
        n = batch.num_samples
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/fill_fraction", batch.fill_fraction, batch_size=n)
        self.log("data/skipped", float(batch.skipped), reduce_fx="sum", batch_size=n)
        self.log("data/truncated", float(batch.num_truncated), reduce_fx="sum", batch_size=n)
        return loss

    def _eval_step(self, batch: VLMBatch, stage: str) -> None:
        check_targets(batch.labels, batch.template)
        n = batch.num_samples
        loss = self(batch).loss
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        if self.val_shuffled_images and len(batch.images) > 1:
            # not synced: a rank whose batches hold < 2 images never logs these keys
            shuffled = self(batch, shuffle_images=True).loss
            self.log(f"{stage}/loss_shuffled_images", shuffled, batch_size=n)
            self.log(f"{stage}/image_gain", shuffled - loss, batch_size=n)

    def validation_step(self, batch: VLMBatch, batch_idx: int) -> None:
        """Held-out loss, and the loss with images shuffled across samples."""
        self._eval_step(batch, "val")

    def test_step(self, batch: VLMBatch, batch_idx: int) -> None:
        """As validation, logged under ``test/``."""
        self._eval_step(batch, "test")

    # ---- export -----------------------------------------------------------------------------

    def export_hf(self, path: str | Path) -> Path:
        """Write an HF-style folder of the model.

        The LLM and tokenizer (``save_pretrained``) at the root, ``connector.safetensors``
        (with ``image_newline`` when used), ``vision.safetensors`` and ``mmpt_vlm.json``
        (connector, vision tower, resolution policy and fusion configs).

        Args:
            path: Output folder.

        Returns:
            The folder.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(out)
        contiguous = lambda m: {k: v.detach().contiguous().cpu() for k, v in m.items()}  # noqa: E731
        save_file(contiguous(self.connector.state_dict()), out / "connector.safetensors")
        save_file(contiguous(self.vision.state_dict()), out / "vision.safetensors")
        cls = lambda o: f"{type(o).__module__}.{type(o).__qualname__}"  # noqa: E731
        config = {
            "format": "mmpt-vlm/1",
            "image_token": self.llm.image_token,
            "image_token_id": self.llm.image_token_id,
            "connector": {
                "class_path": cls(self.connector),
                "init_args": _init_args(self.connector),
            },
            "vision": self.vision.describe(),
            "feature_layer": getattr(self.vision, "feature_layer", None),
            "resolution": {
                "class_path": cls(self.resolution),
                "init_args": _init_args(self.resolution),
            },
            "fusion": asdict(self.fusion_config) if self.fusion_config else None,
        }
        atomic_write_text(out / "mmpt_vlm.json", json.dumps(config, indent=2) + "\n")
        log.info("exported VLM to %s", out)
        return out
