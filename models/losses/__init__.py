"""Contrastive losses (CLIP InfoNCE, SigLIP sigmoid, EgoNCE, MIL-NCE) and their all-gather."""

from mmpt.models.losses.clip import ClipLoss
from mmpt.models.losses.egonce import EgoNCELoss
from mmpt.models.losses.gather import gather_with_grad, world_info
from mmpt.models.losses.milnce import MILNCELoss
from mmpt.models.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "EgoNCELoss", "MILNCELoss", "SigLipLoss", "gather_with_grad", "world_info"]
