"""Contrastive losses (CLIP InfoNCE, SigLIP sigmoid, EgoNCE) and the all-gather they share."""

from mmpt.models.losses.clip import ClipLoss
from mmpt.models.losses.egonce import EgoNCELoss
from mmpt.models.losses.gather import gather_with_grad, world_info
from mmpt.models.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "EgoNCELoss", "SigLipLoss", "gather_with_grad", "world_info"]
