"""Masked autoencoder (He et al., 2022) pre-pretraining for timm ViTs.

The encoder is a :class:`TimmVisionTower` stored as ``encoder``: an MAE checkpoint's
``encoder.model.*`` weights initialise a tower used as ``vision`` elsewhere after mapping the
prefix ``encoder.`` -> ``vision.`` (same tower arguments). Use ``embed_dim=0`` for the MAE
tower: MAE does not use a projection head, which would get no gradient (DDP would complain).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mmpt.eval.forgetting import eval_prefix
from mmpt.eval.report import save_figure
from mmpt.models.adapters import AdapterSpec
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae_figure import figure_pixels, reconstruction_figure
from mmpt.models.mae_patches import (  # re-exported: the MAE's patch, mask and loss functions
    mae_loss,
    masked_mean,
    patch_errors,
    patchify,
    random_masking,
    unpatchify,
)
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess


class MAEDecoder(nn.Module):
    """Light transformer that predicts the pixels of every patch from the visible latents.

    The position embedding is learned (truncated normal, std 0.02) rather than the fixed 2-D
    sin-cos of the paper, so any patch count (non-square grids included) works. With band
    groups (``patch_dim`` a sequence) the N tokens are G group-major blocks of N / G tokens and
    each group has its own prediction head (``heads``) instead of the single ``head``.
    """

    def __init__(
        self,
        num_patches: int,
        patch_dim: int | Sequence[int],
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        num_prefix_tokens: int = 1,
    ) -> None:
        """Build the decoder.

        Args:
            num_patches, patch_dim, encoder_dim: N, pixels per patch (p * p * C), latent width.
                ``patch_dim`` as one value per band group (p * p * C_g) gives one head per group.
            dim, depth, heads: Width, number of timm ``Block``s, attention heads per block.
            num_prefix_tokens: Leading (class/register) tokens of the latent sequence.
        """
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + num_patches, dim))
        norm = functools.partial(nn.LayerNorm, eps=1e-6)  # facebookresearch/mae's decoder
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)
        if isinstance(patch_dim, int):
            self.head = nn.Linear(dim, patch_dim)
        else:
            if not patch_dim or num_patches % len(patch_dim):
                raise ValueError(f"{num_patches} tokens do not split into groups {patch_dim}")
            self.heads = nn.ModuleList(nn.Linear(dim, d) for d in patch_dim)
        for param in (self.pos_embed, self.mask_token):
            trunc_normal_(param, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor | list[torch.Tensor]:
        """Predict all patches in the original order.

        Args:
            latent: (B, P + N_keep, D_enc) encoder output, P prefix (class) tokens first.
            ids_restore: (B, N) from :func:`random_masking`.

        Returns:
            (B, N, patch_dim); with band groups a list of G tensors (B, N / G, p * p * C_g),
            the predictions of each group's tokens.
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
        x = self.norm(x)[:, self.num_prefix_tokens :]
        if not hasattr(self, "heads"):
            return self.head(x)
        return [
            head(t) for head, t in zip(self.heads, x.chunk(len(self.heads), dim=1), strict=True)
        ]


class MAEModule(MMPTModule):
    """MAE pre-pretraining of a timm ``VisionTransformer`` tower (any size, any ``in_chans``).

    The encoder runs only on the visible patches: patch_embed -> position embedding ->
    masking -> prefix (class) tokens with their position embedding -> blocks -> norm.

    With band groups (a tower built with ``band_groups``, SatMAE) every patch gives one token
    per group, group-major; masking runs over all G * N tokens (independently per group), each
    group has its own decoder head and a token's target is its group's channels of its patch.

    Each validation epoch (rank 0, after the sanity check) draws the reconstructions of the
    first ``log_reconstructions`` images of the first validation batch, masked with a fixed
    seed, to ``<log_dir>/reconstructions/epochEEE.png`` (and to TensorBoard when logging there).
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
        log_reconstructions: int = 4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        """Build encoder and decoder.

        Args:
            encoder: Vision tower whose timm model is a ``VisionTransformer`` with a fixed
                input size and square patches (``band_groups`` set or not).
            mask_ratio: Fraction of tokens masked per image.
            decoder_dim, decoder_depth, decoder_heads: Decoder width, blocks, attention heads.
            norm_pix_loss: Regress per-patch normalised pixels.
            log_reconstructions: Images drawn per validation epoch; 0 turns drawing off.
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict,
                adapters: See :class:`MMPTModule`.

        Raises:
            TypeError: The tower's model is not a timm ``VisionTransformer``.
            ValueError: Non-square patches or a mask ratio that leaves no visible patch.
        """
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
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
        self.log_reconstructions = int(log_reconstructions)
        self.patch_size = int(ph)
        #: Channel indices of each band group, None without groups.
        self.band_groups: tuple[tuple[int, ...], ...] | None = getattr(encoder, "band_groups", None)
        if self.band_groups is None:
            self.channels = int(vit.patch_embed.proj.in_channels)
            patch_dim: int | list[int] = self.patch_size**2 * self.channels
        else:
            self.channels = int(vit.in_chans)
            patch_dim = [self.patch_size**2 * len(g) for g in self.band_groups]
        dec = (decoder_dim, decoder_depth, decoder_heads)
        self.decoder = MAEDecoder(
            num_patches, patch_dim, vit.embed_dim, *dec, num_prefix_tokens=vit.num_prefix_tokens
        )
        self._recon_images: torch.Tensor | None = None

    @property
    def preprocess(self) -> Preprocess:
        """Image preprocessing of the encoder (no tokenizer: MAE reads no text)."""
        return Preprocess(image=self.encoder.image_preprocess, tokenizer=None)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible tokens of a random mask of (B, C, H, W) normalised images.

        Returns:
            latent: (B, P + N_keep, D) normed tokens, P prefix (class/register) tokens first.
            mask, ids_restore: (B, N) each, as from :func:`random_masking`; N counts tokens
                (G * h * w with band groups, group-major).
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

    def _groups(self) -> tuple[tuple[int, ...], ...]:
        """Channel groups whose patches are the targets: every channel as one group if none."""
        return self.band_groups or (tuple(range(self.channels)),)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """MAE loss of (B, C, H, W) normalised images, masked with ``generator`` if given.

        Returns:
            loss: Scalar, the mean over masked tokens of each token's own per-patch MSE.
            pred: (B, N, p * p * C) predictions (per-patch normalised when ``norm_pix_loss``);
                with band groups a list of G tensors (B, h * w, p * p * C_g).
            mask: (B, N) over all tokens (N = G * h * w with band groups), 1 = masked.
        """
        latent, mask, ids_restore = self.encode(images, generator)
        pred = self.decoder(latent, ids_restore)
        if self.band_groups is None:
            loss = mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
            return loss, pred, mask
        errors = [
            patch_errors(pg, patchify(images[:, list(g)], self.patch_size), self.norm_pix_loss)
            for pg, g in zip(pred, self.band_groups, strict=True)
        ]
        return masked_mean(torch.cat(errors, dim=1), mask), pred, mask

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
        if hasattr(batch, "skipped"):  # samples dropped as corrupt
            self.log_data_counts(batch, ("skipped",), images.shape[0])
        return loss

    def encoder_images(self, images: torch.Tensor) -> torch.Tensor:
        """The batch's images as the encoder takes them (as read, here)."""
        return images

    def predict_step(self, batch: object, batch_idx: int = 0) -> dict:
        """L2-normalised mean-pooled encoder features of the unmasked images, with the keys.

        Returns:
            ``keys`` (B sample keys), ``image_emb`` (B, D) and ``labels`` (B,), -1 if unknown.
        """
        images = self.encoder_images(self._images(batch))
        feats = torch.nn.functional.normalize(self.encoder.pooled_features(images, "avg"), dim=-1)
        labels = getattr(batch, "labels", None)
        if not torch.is_tensor(labels):
            labels = torch.full((images.shape[0],), -1, dtype=torch.long)
        return {"keys": list(getattr(batch, "keys", [])), "image_emb": feats, "labels": labels}

    def validation_step(
        self, batch: object, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Rank-local loss as ``val/loss`` (``val/<set>/loss``: several sets); keeps images.

        Returns:
            The loss; for a batch with some label >= 0, ``{"loss", "image_emb", "labels"}``
            where ``image_emb`` (B, D) are the unmasked images' mean-pooled encoder features
            (as ``mmpt eval probe --pool avg``), for the kNN probe of
            :class:`~mmpt.eval.callback.ZeroShotEvalCallback`.
        """
        loss = self(images := self._images(batch))[0]
        trainer = self._trainer
        key = f"{eval_prefix(trainer, 'val', dataloader_idx)}/loss"
        self.log(key, loss, batch_size=images.shape[0], sync_dist=True, add_dataloader_idx=False)
        if (
            batch_idx == 0
            and dataloader_idx == 0
            and self.log_reconstructions > 0
            and self._recon_images is None
            and trainer is not None
            and not trainer.sanity_checking
            and trainer.is_global_zero
        ):
            with torch.inference_mode(False):  # a plain tensor, usable outside validation
                self._recon_images = images[: self.log_reconstructions].detach().cpu().clone()
        labels = getattr(batch, "labels", None)
        if not torch.is_tensor(labels) or not bool((labels >= 0).any()):
            return loss
        with torch.no_grad():  # one extra pass of the whole (unmasked) image
            feats = self.encoder.pooled_features(images, "avg")
        return {"loss": loss, "image_emb": feats, "labels": labels}

    def on_validation_epoch_end(self) -> None:
        """Draw the kept images' reconstructions (rank 0; skipped in the sanity check)."""
        trainer = self._trainer
        if self.log_reconstructions <= 0 or trainer is None or trainer.sanity_checking:
            return
        root = trainer.log_dir or trainer.default_root_dir  # log_dir: every rank must call it
        if not trainer.is_global_zero or self._recon_images is None:
            return
        images = self._recon_images.to(self.device)
        generator = torch.Generator(device=images.device).manual_seed(0)
        rec, mask_images = self.reconstruct(images, generator)
        fig = reconstruction_figure(
            images, rec, mask_images, self.encoder.image_preprocess, f"epoch {self.current_epoch}"
        )
        save_figure(fig, Path(root) / "reconstructions" / f"epoch{self.current_epoch:03d}.png")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                rgb = figure_pixels(fig)
                experiment.add_image(
                    "val/reconstructions", rgb, self.global_step, dataformats="HWC"
                )

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions of (B, C, H, W) normalised images, for logging.

        With ``norm_pix_loss`` the model predicts normalised patches whose true mean and
        variance are unknown to it; as in the MAE visualisation, each masked patch is mapped
        back with the mean/std of the ORIGINAL patch (information the model never saw), so
        only the structure within a patch is the model's. Visible patches are the input, and
        so are channels in no band group.

        Returns:
            pred_images: (B, C, H, W) in [0, 1]-scaled pixel space (normalisation undone with
                ``encoder.image_preprocess`` mean/std), not clamped.
            mask_images: (B, 1, H, W), 1 = masked pixel; with band groups (B, C, H, W), each
                channel masked as its group (channels in no group never).
                ``images * (1 - mask_images)`` is the masked input.
        """
        _, pred, mask = self(images, generator)
        preds = pred if isinstance(pred, list) else [pred]
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        out, masks = images.clone(), []
        for group, pg, m in zip(self._groups(), preds, mask.chunk(len(preds), dim=1), strict=True):
            idx = list(group)
            target = patchify(images[:, idx], p)
            pg = pg.to(target.dtype)
            if self.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                pg = pg * (var + 1e-6) ** 0.5 + mean
            m = m.unsqueeze(-1).to(target.dtype)
            out[:, idx] = unpatchify(pg * m + target * (1 - m), p, grid)
            masks.append(unpatchify(m.expand(-1, -1, p * p), p, grid))
        if self.band_groups is None:
            mask_images = masks[0]
        else:
            mask_images = torch.zeros_like(images)
            for group, m in zip(self.band_groups, masks, strict=True):
                mask_images[:, list(group)] = m.expand(-1, len(group), -1, -1)
        pp = self.encoder.image_preprocess
        mean, std = (out.new_tensor(v).view(1, -1, 1, 1) for v in (pp.mean, pp.std))
        return out * std + mean, mask_images


__all__ = [
    "MAEDecoder",
    "MAEModule",
    "mae_loss",
    "masked_mean",
    "patch_errors",
    "patchify",
    "random_masking",
    "unpatchify",
]
