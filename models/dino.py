"""DINO (Caron et al., 2021) self-distillation with multi-crop on any mmpt image tower."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.models.adapters import AdapterSpec
from mmpt.models.losses.self_distill import dino_loss, update_center
from mmpt.models.schedules import Schedule
from mmpt.models.self_distill import SelfDistillModule, check_view_size, view_step
from mmpt.models.ssl_augment import BandAugment


class DINOModule(SelfDistillModule):
    """DINO: 2 global + N local crops, centred and sharpened teacher, weight-normed head.

    The student (encoder + :class:`~mmpt.models.ssl_heads.DINOHead`) sees every crop; the
    teacher (their EMA) sees the global crops only. Teacher outputs are centred (``center``,
    an EMA of their batch mean over all ranks, momentum ``center_momentum``) and sharpened
    with ``teacher_temp``, which rises linearly from ``warmup_teacher_temp`` over the first
    ``teacher_temp_warmup_ratio`` of the run; the loss is
    :func:`~mmpt.models.losses.self_distill.dino_loss`. The last layer's gradient is dropped
    for the first ``freeze_last_layer_steps`` optimizer steps (DINO: the first epoch).

    Args:
        encoder: Image tower with ``forward`` (B, C, H, W) -> (B, D) (``embed_dim: 0``); a
            ViT needs ``model_kwargs.dynamic_img_size: true`` for local crops of another size.
        global_view: Augmentation of the 2 global crops (default: the tower's size, area
            0.4-1, jitter, blur p 0.5).
        local_view: Augmentation of the local crops (default: 3/7 of the tower's size in
            whole patches, area 0.05-0.4, jitter, blur p 0.5).
        local_crops: Local crops per image (8 in SSL4EO-S12; 0 for global crops only).
        out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer: The head
            (:class:`~mmpt.models.ssl_heads.DINOHead`; 65536, 2048, 256, 3, True).
        student_temp: Student temperature (0.1).
        teacher_temp: Teacher temperature after the warm-up (0.04 in SSL4EO-S12).
        warmup_teacher_temp: Teacher temperature at step 0 (0.04).
        teacher_temp_warmup_ratio: Fraction of the run over which the teacher temperature
            rises (DINO: 30 of 100 epochs when teacher_temp > 0.04).
        center_momentum: Momentum of the centre (0.9).
        freeze_last_layer_steps: Optimizer steps with the head's last layer frozen.
        base_momentum, final_momentum, probe_teacher: See :class:`SelfDistillModule`
            (DINO: 0.996 to 1; the teacher is probed).
        optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
            See :class:`~mmpt.models.module.MMPTModule`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        global_view: BandAugment | None = None,
        local_view: BandAugment | None = None,
        local_crops: int = 8,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_ratio: float = 0.0,
        center_momentum: float = 0.9,
        freeze_last_layer_steps: int = 0,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        probe_teacher: bool = True,
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
        from mmpt.models.ssl_heads import DINOHead

        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0 or local_crops < 0:
            raise ValueError("temperatures must be > 0 and local_crops >= 0")
        if not 0 <= teacher_temp_warmup_ratio <= 1 or not 0 <= center_momentum < 1:
            raise ValueError(
                "teacher_temp_warmup_ratio must be in [0, 1], center_momentum in [0, 1)"
            )
        size = encoder.image_preprocess.size
        self.global_view = global_view or BandAugment(size, scale=(0.4, 1.0), blur_prob=0.5)
        step = view_step(encoder)  # 96 of 224 px in DINO, in whole patches
        local_size = max(step, size * 3 // 7 // step * step)
        self.local_view = local_view or BandAugment(local_size, scale=(0.05, 0.4), blur_prob=0.5)
        check_view_size(encoder, self.global_view.size, "model.global_view")
        if local_crops:
            check_view_size(encoder, self.local_view.size, "model.local_view")
        self.local_crops = local_crops
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp_warmup_ratio = teacher_temp_warmup_ratio
        self.center_momentum = center_momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.head = DINOHead(
            int(encoder.output_dim), out_dim, hidden_dim, bottleneck_dim, head_layers,
            norm_last_layer,
        )  # fmt: skip
        self.make_teacher()
        self.register_buffer("center", torch.zeros(1, out_dim))

    def current_teacher_temp(self) -> float:
        """Teacher temperature at this optimizer step (linear warm-up, then constant)."""
        trainer = self._trainer
        if trainer is None or self.teacher_temp_warmup_ratio == 0:
            return self.teacher_temp
        warm = self.teacher_temp_warmup_ratio * float(trainer.estimated_stepping_batches)
        frac = min(1.0, self.global_step / warm) if warm > 0 else 1.0
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """DINO loss of multi-crop views of normalised (B, C, H, W) images (scalar).

        In training the centre moves towards this batch's teacher outputs.
        """
        glob = torch.cat([self.augment(self.global_view, images) for _ in range(2)])
        student = self.head(self.encoder(glob))
        if self.local_crops:
            local = [self.augment(self.local_view, images) for _ in range(self.local_crops)]
            student = torch.cat([student, self.head(self.encoder(torch.cat(local)))])
        teacher = self.teacher_forward(glob)
        temp = self.current_teacher_temp()
        loss = dino_loss(student, teacher, self.center, self.student_temp, temp)
        if self.training:
            update_center(self.center, teacher, self.center_momentum)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the head's last-layer gradient during the first ``freeze_last_layer_steps``."""
        if self.global_step < self.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None


__all__ = ["DINOModule"]
