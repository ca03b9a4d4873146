"""The baselines of ``bench_mae.py``: a full-sequence MIM ViT and HF's ``ViTMAEForPreTraining``.

- :class:`FullSequenceMIM` (written here, SimMIM/BEiT-style): mmpt's own encoder and decoder
  weights, but the encoder runs over every patch with masked ones replaced by a mask token.
- :class:`HFViTMAE`: transformers' ``ViTMAEForPreTraining`` (its encoder also sees only the
  visible patches) built from a config with the same shapes as mmpt's model (width, depth,
  heads, MLP ratio, patch, decoder width/depth/heads, mask ratio, ``norm_pix_loss``), SDPA
  attention. Its initial weights are HF's own, so only the step time is compared.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEDecoder, mae_loss, patchify

MMPT, FULL, HF = "mmpt_mae", "full_sequence", "hf_vitmae"
LABELS = {
    MMPT: "mmpt MAE (visible only)",
    FULL: "full-seq ViT (mask tokens)",
    HF: "HF ViTMAEForPreTraining (sdpa)",
}


class FullSequenceMIM(nn.Module):
    """Masked image modelling with the encoder over every patch (SimMIM/BEiT-style input).

    Masked patch embeddings are replaced by a learned mask token before the position
    embedding; the encoder runs on all ``P + N`` tokens; an :class:`MAEDecoder` predicts every
    patch from the full latent and :func:`mae_loss` counts the masked patches only.
    """

    def __init__(
        self,
        encoder: TimmVisionTower,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        vit = encoder.model
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.num_patches = int(vit.patch_embed.num_patches)
        patch_dim = self.patch_size**2 * int(vit.patch_embed.proj.in_channels)
        self.decoder = MAEDecoder(
            self.num_patches, patch_dim, vit.embed_dim, decoder_dim, decoder_depth,
            decoder_heads, vit.num_prefix_tokens,
        )  # fmt: skip
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

    def random_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, N) float, 1 = masked; exactly ``N - int(N * (1 - ratio))`` masked per image."""
        keep = int(self.num_patches * (1 - self.mask_ratio))
        order = torch.rand(batch, self.num_patches, device=device).argsort(dim=1)
        mask = torch.ones(batch, self.num_patches, device=device)
        return mask.scatter_(1, order[:, :keep], 0.0)

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, P + N, D) normed latent of all tokens, masked patches given as the mask token."""
        vit = self.encoder.model
        x = vit.patch_embed(images)
        x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit._pos_embed(x))
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, p * p * C), mask (B, N)), as ``MAEModule.forward``."""
        b = images.shape[0]
        mask = self.random_mask(b, images.device)
        latent = self.encode(images, mask)
        # nothing to fill in: the identity order makes MAEDecoder use the latent as is
        identity = torch.arange(self.num_patches, device=images.device).expand(b, -1)
        pred = self.decoder(latent, identity)
        loss = mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
        return loss, pred, mask


class HFViTMAE(nn.Module):
    """``ViTMAEForPreTraining`` with the shapes of a timm ViT and an :class:`MAEDecoder`.

    Args:
        encoder: The timm tower whose shapes to copy (its weights are not used).
        mask_ratio: Fraction of patches masked.
        decoder_dim, decoder_depth, decoder_heads: Decoder width, blocks, heads.
        attn_implementation: transformers' attention implementation (``sdpa``, ``eager``).
    """

    def __init__(
        self,
        encoder: TimmVisionTower,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        vit = encoder.model
        block = vit.blocks[0]
        config = ViTMAEConfig(
            hidden_size=vit.embed_dim,
            num_hidden_layers=len(vit.blocks),
            num_attention_heads=block.attn.num_heads,
            intermediate_size=block.mlp.fc1.out_features,
            layer_norm_eps=1e-6,
            image_size=int(vit.patch_embed.img_size[0]),
            patch_size=int(vit.patch_embed.patch_size[0]),
            qkv_bias=block.attn.qkv.bias is not None,
            decoder_hidden_size=decoder_dim,
            decoder_num_hidden_layers=decoder_depth,
            decoder_num_attention_heads=decoder_heads,
            decoder_intermediate_size=4 * decoder_dim,
            mask_ratio=mask_ratio,
            norm_pix_loss=True,
        )
        self.model = ViTMAEForPreTraining(config)
        self.model.set_attn_implementation(attn_implementation)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + int(N * (1 - ratio)), D) latent of the visible patches (+ CLS)."""
        return self.model.vit(pixel_values=images).last_hidden_state

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, p * p * C), mask (B, N)), as ``MAEModule.forward``."""
        out = self.model(pixel_values=images)
        return out.loss, out.logits, out.mask
