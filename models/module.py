"""Base LightningModule: optimizer groups, LR schedule, freezing by pattern, init_from."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.models.adapters import AdapterSpec, adapter_parameter_names, add_adapters
from mmpt.models.init_from import load_init_from
from mmpt.models.init_from import load_matching as load_matching
from mmpt.models.rng_state import RNG_KEY, TrainingRNG
from mmpt.models.schedules import Schedule, WarmupCosine
from mmpt.safe_load import load_tensors

log = logging.getLogger("mmpt.models")

NO_DECAY_NAMES = (
    *("bias", "logit_scale", "logit_bias", "norm", "ln_", ".ln", "bn"),
    *("pos_embed", "cls_token", "reg_token", "image_newline", "group_embed"),  # embeddings
)

#: Unreadable-shard counts the shard datamodules set on every batch, logged as ``data/<name>``.
SHARD_COUNTERS = ("skipped_shards", "lost_samples")

#: Checkpoint entry describing the image tower (rebuilds it for ``mmpt eval probe`` and
#: ``init_from`` without the training config).
TOWER_KEY = "mmpt_image_tower"


class MMPTModule(L.LightningModule):
    """Shared behaviour of every mmpt training family.

    Every checkpoint records the model's image tower under :data:`TOWER_KEY`: the attribute
    holding it, the ``class_path``/``init_args`` that rebuild it (``describe()``) and its
    preprocessing (size, bands, scale, per-band mean/std), so evaluation re-applies exactly the
    pretraining preprocessing.

    Args:
        optimizer: Optimizer factory (``class_path: torch.optim.AdamW`` + ``init_args`` in YAML).
            Weight decay applies to matrices only, never to biases, norms or logit scales.
        lr_schedule: LR multiplier per step; the total comes from the Trainer.
        freeze: Parameter-name patterns (fnmatch, e.g. ``vision.*``) to freeze.
        trainable: If given, ONLY parameters matching these patterns train (applied before
            ``freeze``). Stages differ by these two lists in YAML.
        init_from: A checkpoint whose matching weights initialise this model, e.g. the
            previous stage's ``last.ckpt``; or a list of them, loaded in order (a later file
            wins where two hold the same weight), e.g. a speech encoder from one run and the
            LLM from another. Besides mmpt checkpoints: state dict and ``.safetensors`` files,
            open_clip and timm checkpoints, Hugging Face CLIP/SigLIP, transformers LLaVA and
            mmpt export folders (:mod:`mmpt.models.init_from`). Read without running code
            (:mod:`mmpt.safe_load`).
        init_from_strict: Refuse an ``init_from`` of which less than half of the weights it
            can fill would load (a checkpoint of another family); False loads what fits and
            logs a WARNING.
        adapters: peft LoRA/DoRA/(IA)^3 adapters on modules chosen by pattern
            (:mod:`mmpt.models.adapters`), added after ``init_from``. Their parameters then
            train and nothing else does, unless ``trainable`` names more.
    """

    #: Attribute holding the image tower (recorded in checkpoints when it has ``describe``).
    image_tower_attr: str = "vision"

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__()
        self.adapter_specs = list(adapters or [])
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or WarmupCosine()
        self.freeze_patterns = list(freeze or [])
        self.trainable_patterns = list(trainable) if trainable is not None else None
        self.init_from = init_from
        self.init_from_strict = init_from_strict
        self.training_rng = TrainingRNG()  # generator states saved in checkpoints

    def __deepcopy__(self, memo: dict[int, Any]) -> MMPTModule:
        """A deep copy (weights, buffers, settings) that shares the optimizer factory.

        The factory is configuration, not state: LightningCLI's closes over the CLI, and so over
        the datamodule and its ``multiprocessing.Value`` epoch counters, which cannot be copied.
        Weight averaging (:class:`mmpt.callbacks.EMA`, Lightning's SWA) deep-copies the module.
        """
        memo[id(self.optimizer_factory)] = self.optimizer_factory
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return twin

    def configure_model(self) -> None:
        """Apply ``init_from`` and the freeze/trainable lists once; shard under FSDP2.

        With :class:`mmpt.strategies.FSDP2` the strategy shards the module here, after the
        weights and the frozen/trainable split are set.
        """
        if not getattr(self, "_mmpt_configured", False):
            self._mmpt_configured = True
            paths = [self.init_from] if isinstance(self.init_from, str) else self.init_from or []
            if paths:
                load_init_from(self, paths, strict=self.init_from_strict)
            self.add_adapters()
            apply_trainable(
                self, self.trainable_patterns, self.freeze_patterns, adapter_parameter_names(self)
            )
        trainer = getattr(self, "_trainer", None)
        shard = getattr(trainer.strategy, "parallelize", None) if trainer is not None else None
        if shard is not None:
            shard(self)

    def add_adapters(self) -> None:
        """Inject ``adapters`` once: after ``init_from``, or before loading a checkpoint.

        :func:`load_checkpoint` calls it: a checkpoint of an adapted run holds peft's names.
        """
        if self.adapter_specs and not getattr(self, "_mmpt_adapted", False):
            self._mmpt_adapted = True
            add_adapters(self, self.adapter_specs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the image tower (:data:`TOWER_KEY`) and every rank's random generator states.

        The states go under :data:`~mmpt.models.rng_state.RNG_KEY` (every rank calls this).
        """
        world = self._trainer.world_size if self._trainer is not None else 1
        checkpoint[RNG_KEY] = self.training_rng.state_dict(self.global_rank, world)
        tower = getattr(self, self.image_tower_attr, None)
        if tower is not None and hasattr(tower, "describe"):
            checkpoint[TOWER_KEY] = {
                "attr": self.image_tower_attr,
                "tower": tower.describe(),
                "preprocess": dataclasses.asdict(tower.image_preprocess),
            }

    def on_train_start(self) -> None:
        """Tell the datamodule where the run starts (epoch, and batches of it already done).

        Lightning skips ``on_train_epoch_start`` when it resumes mid-epoch. A checkpoint's
        saved stream position, when it fits the run, then takes over at the first batch
        (:mod:`mmpt.datamodules.resume`); when it does not (other shards or worker count),
        the offset keeps the mixture schedule on the right batch.
        """
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            dm.set_epoch(self.current_epoch, offset=int(done))
        self.training_rng.apply(self.global_rank, self.trainer.world_size)  # a resumed run's

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep the checkpoint's random generator states until training starts."""
        self.training_rng.load_state_dict(checkpoint.get(RNG_KEY))

    def on_validation_model_eval(self) -> None:
        """Validation runs on a fork of the random states: it never moves the training draws."""
        self.training_rng.fork()
        super().on_validation_model_eval()

    def on_validation_end(self) -> None:
        """Back to the training random states (after callbacks, which may save a checkpoint)."""
        self.training_rng.join()

    def on_train_epoch_start(self) -> None:
        """Tell the datamodule the epoch (shard order and shuffles follow it)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Log the batch's source mixture as ``data/mix/<name>`` (share of its items), per step.

        Only batches of a mixing stream carry ``mix`` (``{source name: items}``, see
        :class:`~mmpt.datamodules.streams.ShardStream`); others log nothing.
        """
        mix: dict[str, int] = getattr(batch, "mix", None) or {}
        total = sum(mix.values())
        if total <= 0:
            return
        for name, count in mix.items():
            self.log(
                f"data/mix/{name}", count / total, on_step=True, on_epoch=False, batch_size=total
            )

    def log_data_counts(self, batch: object, names: tuple[str, ...], batch_size: int) -> None:
        """Log ``batch.<name>`` counts as ``data/<name>``: per epoch, summed over ranks.

        The unreadable-shard counts the datamodule sets on every batch (``skipped_shards``,
        ``lost_samples``) are logged too.
        """
        shards = tuple(n for n in SHARD_COUNTERS if hasattr(batch, n) and n not in names)
        for name in names + shards:
            self.log(
                f"data/{name}",
                float(getattr(batch, name)),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=batch_size,
            )

    def configure_optimizers(self) -> dict:
        """Optimizer over trainable parameters + per-step schedule.

        Two parameter groups, named ``decay`` (matrices) and ``no_decay`` (biases, norms, logit
        scales, embeddings; weight decay 0), an empty one left out. The schedule is named
        ``lr``, so ``LearningRateMonitor`` logs ``lr/decay`` and ``lr/no_decay``.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
        if not decay and not no_decay:
            raise ValueError("no trainable parameters: check model.trainable / model.freeze")
        groups = [
            {"params": decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        opt = self.optimizer_factory([g for g in groups if g["params"]])
        self.lr_schedule.bind(opt.defaults["lr"])  # a re-warm needs the new peak LR
        total = _total_steps(self.trainer.estimated_stepping_batches, self.lr_schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: self.lr_schedule.factor(step, total)
        )
        schedule = {"scheduler": sched, "interval": "step", "name": "lr"}
        return {"optimizer": opt, "lr_scheduler": schedule}


def _total_steps(estimated: float, schedule: Schedule) -> int:
    """The run's optimizer steps; an unknown length is an error for a schedule that needs it.

    Lightning cannot know the length of a stream without sample counts (``pipe:``/remote shards
    or folders without ``index.json`` in plain mode) unless ``trainer.max_steps`` is set; a
    cosine schedule over a guessed length would silently decay the LR to its floor.
    """
    if estimated == 0:
        raise ValueError(
            "the training data gives no batch on this rank: in plain mode every rank needs "
            "shards of its own (at least world_size shards) with at least batch_size samples; "
            "check trainer.limit_train_batches, or use data.train.resampled: true with "
            "data.train.epoch_samples"
        )
    finite = math.isfinite(estimated) and estimated > 0
    if not finite and schedule.needs_total:
        raise ValueError(
            f"the run length is unknown, but model.lr_schedule ({type(schedule).__name__}) "
            "needs it: set trainer.max_steps, or write the shards' index.json with `mmpt data "
            "index <shard folder>` (not enough for packed VLM streams: their row count is "
            "known only after packing), or use "
            "data.train.resampled: true with data.train.epoch_samples"
        )
    return max(1, int(estimated)) if finite else 1


def apply_trainable(
    model: nn.Module,
    trainable: list[str] | None,
    freeze: list[str],
    adapter_params: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Set ``requires_grad`` from pattern lists and log what trains.

    With ``adapter_params`` (names of peft adapter parameters) those train, and besides them
    only what ``trainable`` names (``freeze`` still applies last).

    Raises:
        ValueError: A pattern matches no parameter (a typo would otherwise train everything).
    """
    names = [n for n, _ in model.named_parameters()]
    if adapter_params and trainable is None:
        trainable = []
    for pattern in [*(trainable or []), *freeze]:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"pattern {pattern!r} in model.trainable/freeze matches no parameter")
    for name, p in model.named_parameters():
        # without a trainable list a parameter keeps its own setting (e.g. a fixed logit scale)
        train = (
            p.requires_grad
            if trainable is None
            else name in adapter_params or any(fnmatch.fnmatch(name, pat) for pat in trainable)
        )
        p.requires_grad_(train and not any(fnmatch.fnmatch(name, pat) for pat in freeze))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s / %s", f"{n_train:,}", f"{n_all:,}")


def load_checkpoint(model: nn.Module, ckpt: str) -> None:
    """Load a checkpoint of exactly this model (``mmpt eval``, ``mmpt export``).

    Args:
        model: The model built from the training config.
        ckpt: Lightning checkpoint, state dict or ``.safetensors`` file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Weights of the model are missing from it (another config was used), or
            the file needs more than plain data to unpickle.
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {ckpt!r}")
    if hasattr(model, "add_adapters"):  # the checkpoint holds the adapted layers' names
        model.add_adapters()
    obj = load_tensors(ckpt)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{ckpt} does not match the model of the given config: {len(result.missing_keys)} "
            f"weights missing (first: {result.missing_keys[:3]}). "
            "Pass the config it was trained with."
        )


def trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` trains."""
    return any(p.requires_grad for p in module.parameters())
