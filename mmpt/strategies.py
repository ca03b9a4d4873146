"""Distributed training from YAML: FSDP wrapping and activation checkpointing by layer class.

Both take layer classes as dotted import paths, so a recipe names them without Python::

    trainer:
      strategy:
        class_path: mmpt.strategies.FSDP
        init_args:
          layers: [transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer]
          activation_checkpointing: true
      precision: bf16-mixed

For DDP (or one device), activation checkpointing is the
:class:`ActivationCheckpointing` callback with the same ``layers`` list.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.constants import default_pg_timeout

from mmpt.safe_load import allowed_globals, check_pickle


def resolve_layers(layers: list[str], field: str = "layers") -> set[type[nn.Module]]:
    """Import layer classes named by dotted paths.

    Args:
        layers: Dotted class paths, e.g. ``timm.models.vision_transformer.Block``.
        field: The config field named in error messages.

    Returns:
        The classes, as a set (what FSDP's wrap policies take).

    Raises:
        ValueError: A path is not ``module.Class``, its module does not import, it has no
            such attribute, or the attribute is not an ``nn.Module`` subclass; the message
            names the path.
    """
    classes: set[type[nn.Module]] = set()
    for path in layers:
        module_name, _, name = path.rpartition(".")
        if not module_name or not name:
            raise ValueError(f"{field}: {path!r} is not a dotted class path (module.Class)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{field}: cannot import module {module_name!r} of {path!r}") from err
        cls = getattr(module, name, None)
        if cls is None:
            raise ValueError(f"{field}: module {module_name!r} has no class {name!r} ({path!r})")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{field}: {path!r} is not a torch.nn.Module subclass")
        classes.add(cls)
    return classes


def strategy_layers(
    layers: list[str] | None, activation_checkpointing: bool
) -> set[type[nn.Module]]:
    """A strategy's ``layers`` as classes; checkpointing needs at least one.

    Raises:
        ValueError: A path does not resolve, or checkpointing is asked with no layers.
    """
    classes = resolve_layers(list(layers or []), "trainer.strategy.layers")
    if activation_checkpointing and not classes:
        raise ValueError("trainer.strategy.activation_checkpointing needs layers to recompute")
    return classes


class FSDP(FSDPStrategy):
    """Lightning's FSDP strategy, configured by layer class paths (works with every module).

    Each instance of a listed layer class becomes its own FSDP unit (``auto_wrap_policy``);
    with ``activation_checkpointing`` the same layers recompute their activations in
    backward (``activation_checkpointing_policy``). The mixed-precision policy comes from
    ``trainer.precision`` (``bf16-mixed``: bf16 compute and gradient reduction, fp32 master
    weights).

    Checkpoints: ``state_dict_type: full`` (the default here) gathers the whole model and
    optimizer state on rank 0 and writes ``last.ckpt`` as one ordinary file, so ``mmpt
    eval``, ``mmpt export``, ``mmpt merge``, ``model.init_from`` and resuming read it as
    they read a DDP checkpoint. ``sharded`` writes a folder per checkpoint (one shard per
    rank; faster and lighter on rank 0's memory for large models) that only a Lightning
    resume with the same strategy reads.

    Args:
        layers: Dotted class paths of the blocks to shard as units, e.g.
            ``transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer`` and
            ``timm.models.vision_transformer.Block``. Empty: one unit for the whole model
            (no memory saving beyond the optimizer state).
        activation_checkpointing: Recompute the ``layers``' activations in backward.
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2),
            ``NO_SHARD``, ``HYBRID_SHARD`` (shard within a node, replicate across nodes).
        cpu_offload: Keep parameters and gradients on the CPU between uses.
        state_dict_type: ``full`` (one file; see above) or ``sharded``.
        process_group_backend: ``nccl`` on GPUs (the default there), ``gloo`` on CPUs.
        **kwargs: Passed on to :class:`~lightning.pytorch.strategies.FSDPStrategy` and from
            there to ``FullyShardedDataParallel`` (``limit_all_gathers``,
            ``forward_prefetch``, ``timeout``, ...).

    Raises:
        ValueError: A layer path does not name an importable module class.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        activation_checkpointing: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        classes = strategy_layers(layers, activation_checkpointing)
        super().__init__(
            auto_wrap_policy=classes or None,
            activation_checkpointing_policy=set(classes) if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.layer_classes = classes

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """Lightning's load, refusing pickles that name globals outside mmpt's allow-list."""
        return _safe_strategy_load(super().load_checkpoint, checkpoint_path, weights_only)


class ActivationCheckpointing(L.Callback):
    """Recompute the activations of chosen layers in backward, under DDP or on one device.

    Wraps every instance of the listed classes in torch's non-reentrant
    ``checkpoint_wrapper`` before the strategy wraps the model (the wrapper strips its own
    prefix from ``state_dict`` keys, so checkpoints are unchanged). Works for every
    LightningModule and tower, whatever its own options. With :class:`FSDP` use its
    ``activation_checkpointing`` instead (this callback then does nothing).

    Args:
        layers: Dotted class paths, e.g. ``timm.models.vision_transformer.Block`` or
            ``open_clip.transformer.ResidualAttentionBlock``.

    Raises:
        ValueError: A layer path does not name an importable module class.
    """

    def __init__(self, layers: list[str]) -> None:
        self.layer_classes = tuple(resolve_layers(layers, "ActivationCheckpointing.layers"))
        if not self.layer_classes:
            raise ValueError("ActivationCheckpointing.layers: name at least one layer class")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Wrap the layers (once; before DDP wraps the module)."""
        if isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
            return
        apply_checkpointing(pl_module, self.layer_classes)


def apply_checkpointing(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> int:
    """Wrap every submodule of the given classes in a non-reentrant checkpoint wrapper.

    Args:
        model: Module to change in place.
        classes: Layer classes to recompute in backward.

    Returns:
        The number of layers wrapped now (0 when ``model`` was already wrapped).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    if any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        return 0
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, classes))
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())


class FSDP2(ModelParallelStrategy):
    """Fully sharded data parallel with torch's per-parameter sharding (``fully_shard``).

    Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` with a
    data-parallel mesh over all processes: each instance of the ``layers`` classes becomes
    one sharded unit, then the whole module. Unlike :class:`FSDP` (torch's first FSDP,
    GPU-only), it also runs on CPU processes (gloo), and frozen parameters may share a unit
    with trained ones. Every mmpt module takes it: ``MMPTModule.configure_model`` calls
    :meth:`parallelize`.

    Args:
        layers: Dotted class paths of the blocks to shard as units (as for :class:`FSDP`).
        activation_checkpointing: Recompute the ``layers``' activations in backward.
        reshard_after_forward: Free the gathered parameters after forward (ZeRO-3); False
            keeps them until backward (ZeRO-2: more memory, one all-gather less).
        param_dtype: Compute dtype of the sharded parameters, e.g. ``bfloat16`` (None: as
            stored; ``trainer.precision: bf16-mixed`` autocasts instead).
        reduce_dtype: Gradient reduce-scatter dtype, e.g. ``float32`` (None: param dtype).
        save_distributed_checkpoint: False (default) gathers one full ``last.ckpt`` on rank 0
            that every mmpt tool reads; True writes a folder with one shard per rank.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs (default: by device).
        timeout: Collective timeout.

    Raises:
        ValueError: A layer path does not name an importable module class.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.layer_classes = tuple(strategy_layers(layers, activation_checkpointing))
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.dtypes = {"param_dtype": _dtype(param_dtype), "reduce_dtype": _dtype(reduce_dtype)}

    def setup_environment(self) -> None:
        """One data-parallel mesh dimension over every process (no tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def parallelize(self, module: nn.Module) -> None:
        """Checkpoint and shard ``module``'s layers, then the module itself (once)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if any(isinstance(m, FSDPModule) for m in module.modules()):
            return
        if self.activation_checkpointing:
            apply_checkpointing(module, self.layer_classes)
        mesh = self.device_mesh["data_parallel"]
        # Scalars (a CLIP logit scale, a SigLIP bias) cannot be split along a dimension: they
        # stay whole on every rank, their gradients averaged over the ranks after backward.
        scalars = {p for p in module.parameters() if p.ndim == 0}
        for param in scalars:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_GradAverage(mesh.get_group()))
        options = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(**self.dtypes),
            "ignored_params": scalars or None,
        }
        layers = [m for m in module.modules() if isinstance(m, self.layer_classes)]
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(module, **options)
        rank_zero_info(
            f"FSDP2: {len(layers)} layers sharded as units over {options['mesh'].size()} "
            f"processes{', activation checkpointing' if self.activation_checkpointing else ''}"
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """Lightning's load, refusing pickles that name globals outside mmpt's allow-list."""
        return _safe_strategy_load(super().load_checkpoint, checkpoint_path, weights_only)


class _GradAverage:
    """Post-accumulate-grad hook: average a parameter's gradient over a process group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=self.group)
            param.grad /= torch.distributed.get_world_size(self.group)


def _dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16`` (None stays None)."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"trainer.strategy: {name!r} is not a torch dtype (e.g. bfloat16)")
    return dtype


def _safe_strategy_load(load: Any, path: Any, weights_only: bool | None) -> dict:
    """Run a strategy's checkpoint load behind :func:`mmpt.safe_load.check_pickle`.

    Lightning's FSDP resume unpickles a full checkpoint without ``weights_only``; FSDP2's uses
    torch's default allow-list, which lacks mmpt's (paths in hyper-parameters).
    """
    check_pickle(path)
    meta = os.path.join(str(path), "meta.pt")
    if os.path.isdir(str(path)) and os.path.isfile(meta):
        check_pickle(meta)
    with torch.serialization.safe_globals(list(allowed_globals())):
        return load(path, weights_only)
