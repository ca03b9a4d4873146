"""Contrastive losses (CLIP InfoNCE, SigLIP sigmoid) and the autograd all-gather they share."""

from mmpt.models.losses.clip import ClipLoss
from mmpt.models.losses.gather import gather_with_grad, world_info
from mmpt.models.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "gather_with_grad", "world_info"]
