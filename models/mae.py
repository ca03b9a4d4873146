"""Masked autoencoder (He et al., 2022) pre-pretraining for timm ViTs.

The encoder is a :class:`TimmVisionTower` stored as ``encoder``: an MAE checkpoint's
``encoder.model.*`` weights initialise a tower used as ``vision`` elsewhere after mapping the
prefix ``encoder.`` -> ``vision.`` (same tower arguments). Use ``embed_dim=0`` for the MAE
tower: MAE does not use a projection head, which would get no gradient (DDP would complain).
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (random-shuffle masking).

    Args:
        x: (B, N, D) tokens.
        mask_ratio: Fraction of tokens to mask; every sample keeps ``int(N * (1 - ratio))``.
        generator: Optional RNG on ``x.device`` for reproducible masks.

    Returns:
        x_visible: (B, N_keep, D) kept tokens, in shuffled order.
        mask: (B, N) float, 1 = masked, in the original token order.
        ids_restore: (B, N) long; ``gather(cat(visible, masked), 1, ids_restore)`` restores the
            original order.
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x_visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return x_visible, mask.gather(1, ids_restore), ids_restore


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Split (B, C, H, W) images (H, W divisible by ``p``) into p x p patches.

    Returns:
        (B, N, p * p * C) patches, row-major over the (H / p, W / p) grid, each flattened in
        (row, column, channel) order.
    """
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p * p * C) -> (B, C, h * p, w * p).

    ``grid`` is the patch grid (h, w) with h * w = N; a square one when None.
    """
    b, n, dim = x.shape
    h, w = grid = grid or (math.isqrt(n), math.isqrt(n))
    if h * w != n or dim % (p * p):
        raise ValueError(f"{n} patches of width {dim} do not fit grid {grid} and patch {p}")
    c = dim // (p * p)
    x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * p, w * p)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(t - mean) / sqrt(var + eps)`` per patch (last dim); unbiased var as in MAE."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error on masked patches only.

    Args:
        pred: (B, N, p * p * C) predicted patches.
        target: (B, N, p * p * C) patches of the input (:func:`patchify`).
        mask: (B, N), 1 = masked (counted), 0 = visible (ignored).
        norm_pix: Compare with per-patch normalised target pixels (:func:`normalize_patches`).

    Returns:
        Scalar, the per-patch MSE averaged over the masked patches.
    """
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """Light transformer that predicts the pixels of every patch from the visible latents.

    The position embedding is learned (truncated normal, std 0.02) rather than the fixed 2-D
    sin-cos of the paper, so any patch count (non-square grids included) works.
    """

    def __init__(
        self,
        num_patches: int,
        patch_dim: int,
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        num_prefix_tokens: int = 1,
    ) -> None:
        """Build the decoder.

        Args:
            num_patches, patch_dim, encoder_dim: N, pixels per patch (p * p * C), latent width.
            dim, depth, heads: Width, number of timm ``Block``s, attention heads per block.
            num_prefix_tokens: Leading (class/register) tokens of the latent sequence.
        """
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + num_patches, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)
        for param in (self.pos_embed, self.mask_token):
            trunc_normal_(param, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict all patches in the original order: (B, N, patch_dim).

        Args:
            latent: (B, P + N_keep, D_enc) encoder output, P prefix (class) tokens first.
            ids_restore: (B, N) from :func:`random_masking`.
        """
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1).to(x.dtype)
        idx = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = torch.cat([visible, masked], dim=1).gather(1, idx)
        x = torch.cat([prefix, full], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, self.num_prefix_tokens :]


class MAEModule(MMPTModule):
    """MAE pre-pretraining of a timm ``VisionTransformer`` tower (any size, any ``in_chans``).

    The encoder runs only on the visible patches: patch_embed -> position embedding ->
    masking -> prefix (class) tokens with their position embedding -> blocks -> norm.
    """

    image_tower_attr = "encoder"

    def __init__(
        self,
        encoder: TimmVisionTower,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        optimizer=torch.optim.AdamW,  # noqa: ANN001 - OptimizerCallable
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | None = None,
    ) -> None:
        """Build encoder and decoder.

        Args:
            encoder: Vision tower whose timm model is a ``VisionTransformer`` with a fixed
                input size and square patches.
            mask_ratio: Fraction of patches masked per image.
            decoder_dim, decoder_depth, decoder_heads: Decoder width, blocks, attention heads.
            norm_pix_loss: Regress per-patch normalised pixels.
            optimizer, lr_schedule, freeze, trainable, init_from: See :class:`MMPTModule`.

        Raises:
            TypeError: The tower's model is not a timm ``VisionTransformer``.
            ValueError: Non-square patches or a mask ratio that leaves no visible patch.
        """
        super().__init__(optimizer, lr_schedule, freeze, trainable, init_from)
        vit = encoder.model
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"MAE needs a timm VisionTransformer, got {type(vit).__name__}")
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"MAE needs square patches, got {(ph, pw)}")
        num_patches = vit.patch_embed.num_patches
        if not 0 <= mask_ratio < 1 or int(num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(ph)
        self.channels = int(vit.patch_embed.proj.in_channels)
        patch_dim, dec = self.patch_size**2 * self.channels, (decoder_dim, decoder_depth)
        self.decoder = MAEDecoder(
            num_patches, patch_dim, vit.embed_dim, *dec, decoder_heads, vit.num_prefix_tokens
        )

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of a random mask of (B, C, H, W) normalised images.

        Returns:
            latent: (B, P + N_keep, D) normed tokens, P prefix (class/register) tokens first.
            mask, ids_restore: (B, N) each, as from :func:`random_masking`.
        """
        vit = self.encoder.model
        # _pos_embed prepends prefix tokens and adds pos embeds; masking after it is equivalent
        x = vit._pos_embed(vit.patch_embed(images))
        p = vit.num_prefix_tokens
        visible, mask, ids_restore = random_masking(x[:, p:], self.mask_ratio, generator)
        x = vit.norm_pre(torch.cat([x[:, :p], visible], dim=1))
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x), mask, ids_restore

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE loss of (B, C, H, W) normalised images, masked with ``generator`` if given.

        Returns:
            loss: Scalar.
            pred: (B, N, p * p * C) predictions (per-patch normalised when ``norm_pix_loss``).
            mask: (B, N), 1 = masked.
        """
        latent, mask, ids_restore = self.encode(images, generator)
        pred = self.decoder(latent, ids_restore)
        loss = mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
        return loss, pred, mask

    @staticmethod
    def _images(batch: object) -> torch.Tensor:
        images = getattr(batch, "images", batch)
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError("MAE expects normalised float images (B, C, H, W)")
        return images

    def training_step(self, batch: object, batch_idx: int = 0) -> torch.Tensor:
        """Loss on an ``ImageTextBatch`` (text ignored) or a (B, C, H, W) tensor."""
        loss = self(images := self._images(batch))[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: object, batch_idx: int = 0) -> torch.Tensor:
        """Rank-local loss on one batch, logged as ``val/loss``."""
        loss = self(images := self._images(batch))[0]
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        return loss

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions of (B, C, H, W) normalised images, for logging.

        With ``norm_pix_loss`` the model predicts normalised patches whose true mean and
        variance are unknown to it; as in the MAE visualisation, each masked patch is mapped
        back with the mean/std of the ORIGINAL patch (information the model never saw), so
        only the structure within a patch is the model's. Visible patches are the input.

        Returns:
            pred_images: (B, C, H, W) in [0, 1]-scaled pixel space (normalisation undone with
                ``encoder.image_preprocess`` mean/std), not clamped.
            mask_images: (B, 1, H, W), 1 = masked pixel; ``images * (1 - mask_images)`` is the
                masked input.
        """
        _, pred, mask = self(images, generator)
        target = patchify(images, self.patch_size)
        pred = pred.to(target.dtype)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1).to(target.dtype)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        out = unpatchify(pred * m + target * (1 - m), self.patch_size, grid)
        mask_images = unpatchify(m.expand(-1, -1, self.patch_size**2), self.patch_size, grid)
        pp = self.encoder.image_preprocess
        mean, std = (out.new_tensor(v).view(1, -1, 1, 1) for v in (pp.mean, pp.std))
        return out * std + mean, mask_images
