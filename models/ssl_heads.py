"""Projection and prediction heads of MoCo v3 (BN MLPs) and DINO (weight-normed last layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def bn_mlp(
    layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's MLP: ``(Linear -> BN -> ReLU) x (layers - 1) -> Linear [-> BN(affine=False)]``.

    Linear layers have no bias (the batch norm that follows has one).

    Args:
        layers: Linear layers (>= 1).
        in_dim, hidden, out_dim: Input, hidden and output widths.
        last_bn: A non-affine batch norm after the last layer (projector: yes; predictor of
            a ResNet: no).

    Returns:
        Module mapping (B, in_dim) -> (B, out_dim).
    """
    if layers < 1:
        raise ValueError(f"an MLP needs >= 1 layer, got {layers}")
    mods: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == layers - 1 else hidden
        mods.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2 normalisation -> weight-normed linear to K prototypes.

    ``MLP = (Linear -> GELU) x (layers - 1) -> Linear`` to a ``bottleneck`` width; the last
    layer is ``weight_norm(Linear(bottleneck, out_dim, bias=False))`` with its magnitude
    ``g`` fixed at 1 when ``norm_last_layer`` (DINO's default for ViT-S), so the logits are
    cosines between the normalised bottleneck and the normalised prototypes.

    Args:
        in_dim: Backbone feature width.
        out_dim: Prototypes K (65536 in DINO and SSL4EO-S12).
        hidden: MLP hidden width (2048).
        bottleneck: Width before the last layer (256).
        layers: MLP layers (3).
        norm_last_layer: Freeze the last layer's weight-norm magnitude at 1.

    Attributes:
        last_layer: The weight-normed ``Linear``; its direction is
            ``last_layer.parametrizations.weight.original1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden: int = 2048,
        bottleneck: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a DINO head needs >= 1 MLP layer, got {layers}")
        mods: list[nn.Module] = []
        for i in range(layers):
            d_in = in_dim if i == 0 else hidden
            d_out = bottleneck if i == layers - 1 else hidden
            mods.append(nn.Linear(d_in, d_out))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) features -> (B, out_dim) logits (before any temperature)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


__all__ = ["DINOHead", "bn_mlp"]
