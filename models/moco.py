"""MoCo v3 (Chen, Xie and He, 2021) on any mmpt image tower, RGB or multispectral."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.models.adapters import AdapterSpec
from mmpt.models.losses.self_distill import moco_v3_loss
from mmpt.models.schedules import Schedule
from mmpt.models.self_distill import SelfDistillModule, check_view_size
from mmpt.models.ssl_augment import BandAugment


class MoCoV3Module(SelfDistillModule):
    """MoCo v3: two views, student encoder + projector + predictor, momentum teacher.

    The student's ``head`` is the projector (:func:`~mmpt.models.ssl_heads.bn_mlp`, BN after
    every layer); ``predictor`` follows it on the student only. The teacher (encoder +
    projector, :class:`~mmpt.models.ema_teacher.EMATeacher`) gives the keys; the loss is
    :func:`~mmpt.models.losses.self_distill.moco_v3_loss` over the global batch. Use
    ``trainer.sync_batchnorm: true`` on several GPUs (MoCo v3's SyncBN).

    Args:
        encoder: Image tower with ``forward`` (B, C, H, W) -> (B, D) (``embed_dim: 0``).
        view: Augmentation of both views (default: :class:`BandAugment` at the tower's size,
            crop area 0.08-1, brightness/contrast 0.4 with p 0.8, blur p 0.5).
        dim: Output width of projector and predictor (256).
        mlp_dim: Hidden width of both MLPs (4096).
        projector_layers: Projector layers (3 for ViTs, 2 for ResNets in MoCo v3).
        predictor_layers: Predictor layers (2).
        predictor_last_bn: Batch norm after the predictor's last layer.
        temperature: InfoNCE temperature (0.2 in SSL4EO-S12).
        base_momentum, final_momentum, probe_teacher: See :class:`SelfDistillModule`
            (MoCo v3: 0.99 to 1, the student is probed).
        optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
            See :class:`~mmpt.models.module.MMPTModule`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        view: BandAugment | None = None,
        dim: int = 256,
        mlp_dim: int = 4096,
        projector_layers: int = 3,
        predictor_layers: int = 2,
        predictor_last_bn: bool = False,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        probe_teacher: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            encoder, base_momentum, final_momentum, probe_teacher,
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters,
        )  # fmt: skip
        from mmpt.models.ssl_heads import bn_mlp

        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        size = encoder.image_preprocess.size
        self.view = view or BandAugment(size, blur_prob=0.5)
        check_view_size(encoder, self.view.size, "model.view")
        self.temperature = temperature
        width = int(encoder.output_dim)
        self.head = bn_mlp(projector_layers, width, mlp_dim, dim)
        self.predictor = bn_mlp(predictor_layers, dim, mlp_dim, dim, last_bn=predictor_last_bn)
        self.make_teacher()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """MoCo v3 loss of two random views of normalised (B, C, H, W) images (scalar)."""
        x1, x2 = self.augment(self.view, images), self.augment(self.view, images)
        # each view is its own batch through the batch norms, as in MoCo v3
        q1, q2 = (self.predictor(self.head(self.encoder(x))) for x in (x1, x2))
        k1, k2 = self.teacher_forward(x1), self.teacher_forward(x2)
        return moco_v3_loss(q1, q2, k1, k2, self.temperature)


__all__ = ["MoCoV3Module"]
