"""SatMAE++ (Noman et al., CVPR 2024): MAE with upsampling decoder blocks and multi-scale targets.

Tiles arrive at the top scale (``image_size * max(scales)`` px); the encoder sees them
downsampled to ``image_size`` (scale 1), the MAE decoder reconstructs that scale (masked MSE,
band groups as in :class:`~mmpt.models.mae.MAEModule`), and a chain of upsampling blocks turns
the decoder's predicted image into reconstructions at 2x, 4x ... scored with L1 against the
tile downsampled to those sizes. SatMAE++'s loss, ``0.6 * MSE_1x + 0.4 * (0.5 * L1_2x + 0.5 *
L1_4x)``, is ``scale_weights: [0.6, 0.2, 0.2]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from timm.layers import LayerNorm2d
from torch import nn

from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEModule
from mmpt.models.mae_patches import unpatchify
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess


def multiscale_targets(
    images: torch.Tensor, base_size: int, scales: Sequence[int]
) -> list[torch.Tensor]:
    """The images resized to ``base_size * s`` for every scale ``s`` (bilinear, antialiased).

    Args:
        images: (B, C, H, W) top-scale images (``H = W = base_size * max(scales)``).
        base_size: Side of scale 1 (the encoder's input).
        scales: Increasing scale factors, e.g. (1, 2, 4).

    Returns:
        One (B, C, base_size * s, base_size * s) tensor per scale; the top scale is
        ``images`` itself.
    """
    out = []
    for s in scales:
        side = base_size * s
        if tuple(images.shape[-2:]) == (side, side):
            out.append(images)
        else:
            out.append(F.interpolate(images, size=(side, side), mode="bilinear", antialias=True))
    return out


class _Residual(nn.Module):
    """``x + 0.5 * conv(relu(conv(x)))`` with 3 x 3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.relu(self.conv1(x)))


class UpsampleBlock(nn.Module):
    """2x upsampling: ConvTranspose(4, stride 2) -> LN -> LeakyReLU -> residual -> LN.

    ``forward`` returns the features (for the next block) and their 3 x 3 projection to the
    image channels (this scale's reconstruction).
    """

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1)
        self.up_norm = LayerNorm2d(width, eps=1e-6)
        self.res = _Residual(width)
        self.res_norm = LayerNorm2d(width, eps=1e-6)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, h, w) -> features (B, W, 2h, 2w) and image (B, C, 2h, 2w)."""
        x = self.res_norm(self.res(F.leaky_relu(self.up_norm(self.up(x)))))
        return x, self.out(x)


class MultiScaleUpsampler(nn.Module):
    """SatMAE++'s upsampling decoder: 1 x 1 conv C -> r * C, GELU, LN, then 2x blocks.

    Args:
        channels: Image channels C (the band-group channels the MAE reconstructs).
        levels: Upsampling blocks (scales 2, 4, ... 2 ** levels).
        ratio: Width of the blocks as a multiple of C (4 in SatMAE++).
    """

    def __init__(self, channels: int, levels: int, ratio: int = 4) -> None:
        super().__init__()
        width = channels * ratio
        self.proj = nn.Conv2d(channels, width, kernel_size=1)
        self.proj_norm = LayerNorm2d(width, eps=1e-6)
        self.blocks = nn.ModuleList(UpsampleBlock(width, channels) for _ in range(levels))
        for m in self.modules():  # SatMAE++'s init of the blocks' convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, h, w) -> [(B, C, 2h, 2w), (B, C, 4h, 4w), ...], one per block."""
        x = self.proj_norm(F.gelu(self.proj(image)))
        outs = []
        for block in self.blocks:
            x, out = block(x)
            outs.append(out)
        return outs


class SatMAEPPModule(MAEModule):
    """Multi-scale MAE (SatMAE++) on a timm ViT tower, with or without band groups.

    The datamodule reads tiles at ``image_size * max(scales)`` (:attr:`preprocess`); a
    checkpoint records the tower at ``image_size``, so ``mmpt eval probe`` feeds it that size.
    With ``scales: [1]`` no upsampler is built and the loss is the MAE's times
    ``scale_weights[0]``.

    Args:
        encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss,
            log_reconstructions: See :class:`MAEModule`.
        scales: 1, 2, 4, ... (each block doubles the side).
        scale_weights: Loss weight of each scale (masked MSE at 1x, L1 above).
        upsample_ratio: Width of the upsampling blocks per reconstructed channel.
        optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
            See :class:`~mmpt.models.module.MMPTModule`.

    Raises:
        ValueError: Scales that are not 1, 2, 4, ... or weights of another length.
    """

    def __init__(
        self,
        encoder: TimmVisionTower,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        log_reconstructions: int = 4,
        scales: list[int] | None = None,
        scale_weights: list[float] | None = None,
        upsample_ratio: int = 4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss,
            log_reconstructions, optimizer, lr_schedule, freeze, trainable, init_from,
            init_from_strict, adapters,
        )  # fmt: skip
        self.scales = [int(s) for s in (scales if scales is not None else [1, 2, 4])]
        weights = scale_weights if scale_weights is not None else [0.6, 0.2, 0.2]
        self.scale_weights = [float(w) for w in weights]
        if self.scales != [2**i for i in range(len(self.scales))]:
            raise ValueError(f"model.scales must be 1, 2, 4, ... (doubling), got {self.scales}")
        if len(self.scale_weights) != len(self.scales):
            raise ValueError(
                f"model.scale_weights has {len(self.scale_weights)} values for scales "
                f"{self.scales}: give one weight per scale"
            )
        self.base_size = int(encoder.image_preprocess.size)
        self.top_size = self.base_size * self.scales[-1]
        #: Reconstructed channels in group order (every channel without band groups).
        self.target_channels = [c for g in self._groups() for c in g]
        if len(self.scales) > 1:
            self.upsampler = MultiScaleUpsampler(
                len(self.target_channels), len(self.scales) - 1, upsample_ratio
            )

    @property
    def preprocess(self) -> Preprocess:
        """The encoder's preprocessing read at the top scale (tiles for every target)."""
        image = dataclasses.replace(self.encoder.image_preprocess, size=self.top_size)
        return Preprocess(image=image, tokenizer=None)

    def predicted_image(self, pred: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Decoder predictions (MAE layout) -> (B, C_t, h * p, w * p), channels in group order."""
        preds = pred if isinstance(pred, list) else [pred]
        grid = (self.base_size // self.patch_size,) * 2
        return torch.cat([unpatchify(pg, self.patch_size, grid) for pg in preds], dim=1)

    def scale_losses(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Per-scale losses of top-scale images.

        Args:
            images: (B, C, S, S) normalised images, ``S = image_size * max(scales)``.
            generator: Optional RNG for the mask.

        Returns:
            losses: One scalar per scale: the masked MSE at 1x (as :class:`MAEModule`), then
                the L1 of each upsampled reconstruction against the downsampled images.
            pred, mask: The MAE decoder's predictions and mask (see :meth:`MAEModule.forward`).
        """
        if tuple(images.shape[-2:]) != (self.top_size, self.top_size):
            raise ValueError(
                f"SatMAE++ takes {self.top_size} px tiles (image_size {self.base_size} x scale "
                f"{self.scales[-1]}), got {tuple(images.shape[-2:])}"
            )
        targets = multiscale_targets(images, self.base_size, self.scales)
        loss, pred, mask = MAEModule.forward(self, targets[0], generator)
        losses = [loss]
        if len(self.scales) > 1:
            ups = self.upsampler(self.predicted_image(pred))
            idx = self.target_channels
            for up, target in zip(ups, targets[1:], strict=True):
                losses.append(F.l1_loss(up.float(), target[:, idx].float()))
        return losses, pred, mask

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Weighted multi-scale loss of top-scale images (see :meth:`scale_losses`).

        Images at the encoder's own size give the single-scale MAE loss (used to draw
        reconstructions, :meth:`MAEModule.reconstruct`).
        """
        if self.top_size != self.base_size and images.shape[-1] == self.base_size:
            return MAEModule.forward(self, images, generator)
        losses, pred, mask = self.scale_losses(images, generator)
        total = sum(w * loss for w, loss in zip(self.scale_weights, losses, strict=True))
        self._last_losses = [loss.detach() for loss in losses]
        return total, pred, mask

    def encoder_images(self, images: torch.Tensor) -> torch.Tensor:
        """Top-scale tiles downsampled to the encoder's size (scale 1); others as they are."""
        if images.shape[-1] == self.top_size and self.top_size != self.base_size:
            return multiscale_targets(images, self.base_size, self.scales[:1])[0]
        return images

    def training_step(self, batch: object, batch_idx: int = 0) -> torch.Tensor:
        """Weighted loss (``train/loss``) and each scale's (``train/loss_<s>x``)."""
        loss = super().training_step(batch, batch_idx)
        n = self._images(batch).shape[0]
        for s, part in zip(self.scales, self._last_losses, strict=True):
            self.log(f"train/loss_{s}x", part, batch_size=n)
        return loss

    def validation_step(
        self, batch: object, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """As :meth:`MAEModule.validation_step`, on top-scale images; features at scale 1."""
        images = self._images(batch)
        loss = self(images)[0]
        base = self.encoder_images(images)
        trainer = self._trainer
        key = f"{eval_prefix(trainer, 'val', dataloader_idx)}/loss"
        self.log(key, loss, batch_size=images.shape[0], sync_dist=True, add_dataloader_idx=False)
        keep = (
            batch_idx == 0
            and dataloader_idx == 0
            and self.log_reconstructions > 0
            and self._recon_images is None
            and trainer is not None
            and not trainer.sanity_checking
            and trainer.is_global_zero
        )
        if keep:
            with torch.inference_mode(False):
                self._recon_images = base[: self.log_reconstructions].detach().cpu().clone()
        labels = getattr(batch, "labels", None)
        if not torch.is_tensor(labels) or not bool((labels >= 0).any()):
            return loss
        with torch.no_grad():
            feats = self.encoder.pooled_features(base, "avg")
        return {"loss": loss, "image_emb": feats, "labels": labels}


__all__ = ["MultiScaleUpsampler", "SatMAEPPModule", "UpsampleBlock", "multiscale_targets"]
