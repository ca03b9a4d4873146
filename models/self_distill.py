"""Shared base of the momentum-teacher objectives (MoCo v3, DINO) on any mmpt image tower.

The student is ``encoder`` (any tower whose ``forward`` gives (B, D) pooled features:
:class:`~mmpt.models.encoders.TimmVisionTower` ViTs and ResNets, RGB or multispectral, with
``embed_dim: 0``) plus a head; the teacher is an :class:`~mmpt.models.ema_teacher.EMATeacher`
copy of both, moved after every optimizer step with a cosine momentum schedule. Views are
drawn on the device from the normalised batch (:mod:`mmpt.models.ssl_augment`), so the usual
:class:`~mmpt.datamodules.images.ImageDataModule` feeds these objectives unchanged.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.ema_teacher import EMATeacher, cosine_momentum
from mmpt.models.module import TOWER_KEY, MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.models.ssl_augment import BandAugment
from mmpt.preprocess import Preprocess

#: Checkpoint path of the teacher's copy of the encoder (``teacher.module[0]``).
TEACHER_TOWER = "teacher.module.0"


def view_step(encoder: nn.Module) -> int:
    """Pixels a view's side must be a multiple of: the patch side of a ViT, else 1."""
    patch_embed = getattr(getattr(encoder, "model", None), "patch_embed", None)
    size = getattr(patch_embed, "patch_size", 1)
    return int(size[0] if isinstance(size, tuple | list) else size)


def check_view_size(encoder: nn.Module, size: int, name: str) -> None:
    """Refuse views a ViT cannot take (local crops need a dynamic image size and whole patches).

    Raises:
        ValueError: ``size`` is not a multiple of the patch side, or differs from the tower's
            input size while its timm model does not accept other sizes.
    """
    pre = getattr(encoder, "image_preprocess", None)
    model = getattr(encoder, "model", None)
    step = view_step(encoder)
    if size % step:
        raise ValueError(f"{name}.size={size} must be a multiple of the patch side {step}")
    fixed = hasattr(model, "patch_embed") and not getattr(model, "dynamic_img_size", False)
    if pre is not None and size != pre.size and fixed:
        raise ValueError(
            f"{name} makes {size} px views but the tower takes only {pre.size} px: set "
            "model.encoder.init_args.model_kwargs.dynamic_img_size: true (or use the tower's size)"
        )


class SelfDistillModule(MMPTModule):
    """Student tower + head, EMA teacher, device-side views, kNN features for validation.

    Subclasses build ``self.head`` (the student's head after the encoder) before calling
    :meth:`make_teacher`, and implement ``forward(images) -> loss``.

    Args:
        encoder: Image tower (``forward``: (B, C, H, W) -> (B, D)); recorded in checkpoints
            for ``mmpt eval probe`` (the teacher's copy with ``probe_teacher``).
        base_momentum, final_momentum: Teacher momentum from ``base`` to ``final`` on a half
            cosine over the run's optimizer steps (:func:`cosine_momentum`).
        probe_teacher: Record the teacher's encoder as the checkpoint's tower and use it for
            the validation kNN (DINO evaluates the teacher; MoCo v3 the student).
        optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
            See :class:`MMPTModule` (``freeze: [encoder.model.patch_embed.*]`` is MoCo v3's
            stop-gradient on the patch projection).
    """

    image_tower_attr = "encoder"

    def __init__(
        self,
        encoder: nn.Module,
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
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        cosine_momentum(0, 1, base_momentum, final_momentum)  # checks the range
        self.encoder = encoder
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.probe_teacher = probe_teacher
        self._teacher_step = 0

    def student(self) -> nn.ModuleList:
        """The modules the teacher follows, in the teacher's order: [encoder, head]."""
        return nn.ModuleList([self.encoder, self.head])

    def make_teacher(self) -> None:
        """Create the teacher as a copy of the student (call once the head exists)."""
        self.teacher = EMATeacher(self.student())

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher encoder + head of (B, C, H, W) views: (B, K), no gradient."""
        with torch.no_grad():
            encoder, head = self.teacher.module
            return head(encoder(images))

    @property
    def preprocess(self) -> Preprocess:
        """The encoder's image preprocessing (no tokenizer)."""
        return Preprocess(image=self.encoder.image_preprocess, tokenizer=None)

    def augment(self, view: BandAugment, images: torch.Tensor) -> torch.Tensor:
        """One random view of normalised images, jittered in the tower's scaled units."""
        pre = self.encoder.image_preprocess
        return view(images, pre.mean, pre.std)

    def add_adapters(self) -> None:
        """Adapters (base) on the student, then the teacher again a copy of the student.

        The teacher keeps the student's structure (peft layers included), so it follows the
        adapted student and a checkpoint of an adapted run loads into it.
        """
        fresh = bool(self.adapter_specs) and not getattr(self, "_mmpt_adapted", False)
        super().add_adapters()
        if fresh:
            self.make_teacher()

    def configure_model(self) -> None:
        """Load ``init_from`` / freeze (base), then restart the teacher from the student."""
        fresh = not getattr(self, "_mmpt_configured", False)
        super().configure_model()
        if fresh:
            self.teacher.update(self.student(), 0.0)  # init_from reached the student only
            self.teacher.requires_grad_(False)

    def momentum(self, step: int) -> float:
        """Teacher momentum after optimizer step ``step`` (0-based) of this run."""
        trainer = self._trainer
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 1
        return cosine_momentum(step, max(total, 1), self.base_momentum, self.final_momentum)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        """Move the teacher after each optimizer step (not after accumulation-only batches)."""
        step = self.trainer.global_step
        if step > self._teacher_step:
            m = self.momentum(step - 1)
            self.teacher.update(self.student(), m)
            self.log("train/teacher_momentum", m, on_step=True, on_epoch=False, batch_size=1)
            self._teacher_step = step

    def on_train_start(self) -> None:
        """Resume: the teacher has already followed the steps done (base), then start."""
        super().on_train_start()
        self._teacher_step = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the tower (base); with ``probe_teacher`` point the record at the teacher."""
        super().on_save_checkpoint(checkpoint)
        if self.probe_teacher and TOWER_KEY in checkpoint:
            checkpoint[TOWER_KEY]["attr"] = TEACHER_TOWER

    @staticmethod
    def _images(batch: object) -> torch.Tensor:
        images = getattr(batch, "images", batch)
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError("self-distillation expects normalised float images (B, C, H, W)")
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features for the kNN probe: (B, C, H, W) -> (B, D), as ``mmpt eval probe``."""
        encoder = self.teacher.module[0] if self.probe_teacher else self.encoder
        pooled = getattr(encoder, "pooled_features", None)
        return pooled(images) if pooled is not None else encoder(images)

    def training_step(self, batch: object, batch_idx: int = 0) -> torch.Tensor:
        """Loss on an ``ImageBatch``/``ImageTextBatch`` (text ignored) or a (B, C, H, W) tensor."""
        loss = self(images := self._images(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        if hasattr(batch, "skipped"):
            self.log_data_counts(batch, ("skipped",), images.shape[0])
        return loss

    def validation_step(
        self, batch: object, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss as ``val/loss``; with labels also pooled features for the kNN probe.

        Returns:
            The loss, or ``{"loss", "image_emb", "labels"}`` (``image_emb`` (B, D) from
            :meth:`features` of the whole images) for :class:`ZeroShotEvalCallback`.
        """
        loss = self(images := self._images(batch))
        key = f"{eval_prefix(self._trainer, 'val', dataloader_idx)}/loss"
        self.log(key, loss, batch_size=images.shape[0], sync_dist=True, add_dataloader_idx=False)
        labels = getattr(batch, "labels", None)
        if not torch.is_tensor(labels) or not bool((labels >= 0).any()):
            return loss
        return {"loss": loss, "image_emb": self.features(images), "labels": labels}


__all__ = ["TEACHER_TOWER", "SelfDistillModule", "check_view_size", "view_step"]
